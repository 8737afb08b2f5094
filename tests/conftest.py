import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TIKTOKEN_CACHE_DIR", "")
torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def require_shared() -> Path:
    """../shared/data beside the project; in CI it must be there, elsewhere its absence skips."""
    if not SHARED.is_dir():
        if os.environ.get("CI"):
            raise RuntimeError(f"{SHARED} is missing in CI")
        pytest.skip(f"{SHARED} is absent on this machine (the shared datasets folder)")
    return SHARED


@pytest.fixture
def shared_data() -> Path:
    return require_shared()


def tiny_gpt(vocab_size: int, n_ctx: int = 48, sharpen: bool = False):
    """A 2-layer, d_model 32 GPT with seeded random weights, in eval mode. `sharpen` scales W_e by 3
    for peakier distributions than at initialisation, so that greedy decoding is well defined."""
    from gptn.config import GPTConfig
    from gptn.model import GPT
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=vocab_size, n_ctx=n_ctx, n_layer=2, n_head=2, d_model=32, dropout=0.0))
    if sharpen:
        with torch.no_grad():
            m.wte.weight.mul_(3)
    return m.eval()


@pytest.fixture(scope="module")
def tok():
    """A character tokenizer over lower-case text (modules with other alphabets define their own)."""
    from gptn.tokenizer import CharTokenizer
    return CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ,.\n")


@pytest.fixture(scope="module")
def model(tok):
    """tiny_gpt over `tok`, sharpened so that greedy decoding is well defined."""
    return tiny_gpt(tok.vocab_size, n_ctx=48, sharpen=True)
