"""Where a command runs, resolved once for all of them (pretraining, fine-tuning, generation,
serving, evaluation, benchmarks): the device, torch.distributed under torchrun, autocast precision,
and the peak FLOP/s that MFU is measured against."""

from __future__ import annotations

import contextlib
import functools
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import GptnError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(pref: str) -> torch.device:
    """`auto` (CUDA when there is one), `cpu`, `cuda` or `cuda:N`, checked once for every command."""
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref != "cpu" and not (pref == "cuda" or pref.startswith("cuda:") and pref[5:].isdigit()):
        raise GptnError(f"--device {pref}: expected auto, cpu, cuda or cuda:N")
    if pref != "cpu" and not torch.cuda.is_available():
        raise GptnError(f"--device {pref}: this machine has no CUDA device (torch {torch.__version__})")
    return torch.device(pref)


def setup_distributed(device_pref: str) -> tuple[Dist, torch.device]:
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE > 1): one GPU per process,
    the local rank's, or gloo on CPU."""
    device = resolve_device(device_pref)
    cuda = device.type == "cuda"
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Dist(), torch.device("cuda", torch.cuda.current_device()) if cuda and device.index is None else device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local), device


@functools.cache
def cpu_vendor_and_flags() -> tuple[str, frozenset[str]]:
    """This CPU's vendor ("GenuineIntel", "AuthenticAMD"; "" when unknown) and feature flags, from
    /proc/cpuinfo (empty elsewhere): what the CPU speed paths are chosen by."""
    vendor, flags = "", ""
    try:
        for line in open("/proc/cpuinfo"):
            key = line.split(":", 1)[0].strip()
            if key == "vendor_id" and not vendor:
                vendor = line.split(":", 1)[1].strip()
            elif key == "flags":
                flags = line.split(":", 1)[1]
                break
    except OSError:
        pass
    return vendor, frozenset(flags.split())


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX or AVX512-BF16)."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_vendor_and_flags()[1])


@functools.cache
def cpu_bf16_is_faster() -> bool:
    """Whether bf16 matmuls beat fp32 ones by 1.5x on this CPU, measured (about half a second): the flags
    say a CPU has bf16 units, not that PyTorch's kernels use them well (on the 2-core machines here:
    AMX Xeon ~1,650 vs ~300 GFLOP/s; AVX512-BF16 EPYC ~800 vs ~195)."""
    if not native_bf16():
        return False
    cpu = torch.device("cpu")
    return measure_matmul_peak(cpu, torch.bfloat16, 512, 0.2) > 1.5 * measure_matmul_peak(cpu, torch.float32, 512, 0.2)


# Below this width bf16's casts cost more than its products save on a CPU (EPYC with AVX512-BF16,
# training steps fp32 / bf16: d_model 32: 0.68x, 128: 1.28x, 256: 1.86x, 384: 2.71x; Muon's
# orthogonalisation on an AMX Xeon likewise loses below ~96).
CPU_BF16_MIN_WIDTH = 128


def cpu_bf16_pays(width: int | None = None) -> bool:
    """Whether bf16 products of this width (a model's d_model, a matrix's smaller side; None: any) beat
    float32 ones on this CPU."""
    return (width is None or width >= CPU_BF16_MIN_WIDTH) and cpu_bf16_is_faster()


PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # training autocast (--precision)
STRATEGIES = ("ddp", "fsdp")  # how torchrun's ranks share the model (--strategy)


def autocast(precision: str, device: torch.device, d_model: int | None = None):
    """The autocast context of training at `precision` (autocast_dtype): also what its validation, and a
    benchmark scoring the result, run under."""
    dtype = autocast_dtype(precision, device, d_model)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def autocast_dtype(precision: str, device: torch.device, d_model: int | None = None) -> torch.dtype | None:
    """The autocast dtype of training: `auto` is bf16 on GPUs that have it (else fp16 with a gradient
    scaler), and on a CPU bf16 where it measures faster than fp32 and the model is wide enough for it
    to pay, else fp32 (None)."""
    if precision not in PRECISIONS:
        raise GptnError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if device.type != "cuda":
        if precision == "fp16":
            raise GptnError("--precision fp16 is for GPUs; on a CPU use bf16 or fp32")
        return torch.bfloat16 if precision == "bf16" or precision == "auto" and cpu_bf16_pays(d_model) else None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


GPU_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
                 "L40S": 362e12, "L4": 121e12, "A10G": 125e12, "4090": 165e12, "3090": 71e12}


def measure_matmul_peak(device: torch.device, dtype=torch.float32, n: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s of the fastest of repeated large square matmuls on this device: the practical peak MFU
    is measured against. The fastest, not the mean: on a shared machine a slow moment while measuring
    would otherwise understate the peak and show MFU above 100%. Its own generator: a draw from the
    global one would shift a seeded run's initialisation and dropout by whether this was measured (cached
    per process) before it."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype | None) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_BF16_PEAK.items():
            if key in name:
                return value if dtype in (torch.bfloat16, torch.float16) else value / 2
        return measure_matmul_peak(device, dtype or torch.float32, n=8192)
    return measure_matmul_peak(device, dtype or torch.float32)
