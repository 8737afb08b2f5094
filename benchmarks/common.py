"""Shared by the benchmark scripts: machine description, medians, writing results/NAME.json, and the
server helpers of the serving benchmarks."""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def cpu_kind() -> str:
    """The CPU kinds speed figures differ between (vendor and the widest matrix ISA): intel-amx,
    amd-avx512bf16, amd-avx2, ...; a results file of speed is one per kind (NAME-KIND.json)."""
    import torch

    from gptn.runtime import cpu_vendor_and_flags
    vendor_id, flags = cpu_vendor_and_flags()
    vendor = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(vendor_id, platform.machine())
    isa = ("amx" if "amx_bf16" in flags else "avx512bf16" if "avx512_bf16" in flags
           else torch.backends.cpu.get_cpu_capability().lower())
    return f"{vendor}-{isa}"


def machine() -> dict:
    import numpy
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    try:
        info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    # "AMD EPYC" names CPUs from AVX2-only to AVX512-BF16 here: the vector ISA torch uses tells them apart
    info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    info["cpu_kind"] = cpu_kind()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    for pkg in ("transformers", "tiktoken", "tokenizers", "lm_eval"):
        try:
            info[pkg] = __import__(pkg).__version__
        except ImportError:
            pass
    try:
        info["gptn_commit"] = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                             cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        pass
    return info


def median(xs):
    return statistics.median(xs)


def write_results(name: str, results: dict, merge: bool = False) -> Path:
    """Write results/NAME.json; with merge=True keep keys of an earlier run (e.g. GPU figures)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    if merge and path.exists():
        results = {**json.loads(path.read_text()), **results}
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def table(rows: list[tuple], header: tuple) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*map(str, r)) for r in [header, *rows])


def rss_mb(pid: int) -> float:
    """Resident memory of a process, MiB."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    """A loopback port nothing listens on now, for a server the benchmark starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int) -> None:
    """Wait for a `gptn serve` on this port to answer /health."""
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


def seconds_per_step(config, batch: int, optimizer: str = "adamw") -> float:
    """Time a few real fp32 training steps of a model, to size a pretraining schedule to a time budget."""
    import torch

    from gptn.model import GPT
    from gptn.optim import make_optimizer
    torch.manual_seed(0)
    model = GPT(config)
    opt = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cpu", optimizer)
    x = torch.randint(0, config.vocab_size, (batch, config.n_ctx))
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[1]
