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
