"""A one-row fp32 product (GEMV) for CPU decoding at batch 1: kernels/gemv_avx2.c, compiled with the
machine's C compiler on first use (as torch.compile's CPU backend compiles its kernels) and cached under
~/.cache/gptn. At one row a product is the time it takes to read W; this kernel reads it near the rate of a
plain sum, faster than oneDNN's kernel (the default fp32 path, inference.py) on the AVX2 EPYC, where it is
chosen (the README's benchmark rows).

`available()` is False where the kernel cannot run here: no AVX2 + FMA, no compiler, or a build that failed.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from .runtime import cpu_vendor_and_flags

SOURCE = Path(__file__).parent / "kernels" / "gemv_avx2.c"
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")


@functools.cache
def _kernel():
    if not {"avx2", "fma"} <= cpu_vendor_and_flags()[1]:
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptn"
    for folder in (cache, Path(tempfile.gettempdir()) / f"gptn-kernels-{os.getuid()}"):
        path = folder / f"gemv_avx2-{key}.so"
        try:
            if not path.exists():
                folder.mkdir(parents=True, exist_ok=True)
                # then renamed: processes (or threads) may build it at once
                built = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}")
                subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], check=True, capture_output=True,
                               timeout=120)
                os.replace(built, path)
            # PyTorch has loaded its libgomp.so.1, so the kernel's OpenMP is PyTorch's: one thread pool
            fn = ctypes.CDLL(str(path)).gptn_gemv_f32
        except (OSError, subprocess.SubprocessError):
            continue
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
        fn.restype = None
        return fn
    return None


def available() -> bool:
    return _kernel() is not None


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b for x (..., in) holding one contiguous fp32 row and W (out, in) contiguous fp32."""
    out, n = weight.shape
    y = x.new_empty(*x.shape[:-1], out)
    _kernel()(weight.data_ptr(), x.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(), out, n,
              torch.get_num_threads())
    return y
