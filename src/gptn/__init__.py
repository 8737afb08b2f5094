"""gptn: the GPT-n family of language models, end to end."""

from .config import PRESETS, GPTConfig, GptnError, get_preset
from .model import GPT, KVCache

__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "GptnError", "KVCache", "PRESETS", "get_preset", "__version__"]
