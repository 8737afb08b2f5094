"""Training memory with and without activation checkpointing, measured beside `gptn compute`'s estimate
(gptn.compute.training_memory), on a small config in fp32 on CPU.

    python benchmarks/memory.py [--layers 6 --d-model 512 --context 512 --micro-batch 8 --vocab 8192]

Each mode runs in a fresh process: the model, its gradients and AdamW's moments are allocated first
(the resident set then is the baseline), the peak-RSS counter is reset (/proc/self/clear_refs), and one
forward + backward runs; the activation memory is the peak minus the baseline. The time of two more
steps (the faster) shows what the recomputation costs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table, write_results  # noqa: E402

from gptn.compute import training_memory  # noqa: E402
from gptn.config import GPTConfig  # noqa: E402

MiB = 2**20


def child(config: dict, micro_batch: int, checkpointing: bool) -> dict:
    """In this process: the baseline, one forward + backward, the peak."""
    import torch
    from gptn.model import GPT
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**config)).train()
    model.activation_checkpointing = checkpointing
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    opt.step()  # Adam's moments now exist
    x = torch.randint(0, config["vocab_size"], (micro_batch, config["n_ctx"]))

    def status(key):
        return next(int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith(key))

    base = status("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
    _, loss = model(x, x)
    loss.backward()
    peak = status("VmHWM:")
    times = []
    for _ in range(2):  # the time of warm steps (the first one also pays one-off set-up)
        t0 = time.perf_counter()
        model(x, x)[1].backward()
        times.append(time.perf_counter() - t0)
    return {"baseline_bytes": base, "peak_bytes": peak, "activation_bytes": peak - base,
            "step_seconds": min(times), "loss": loss.item()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    config = {"vocab_size": args.vocab, "n_ctx": args.context, "n_layer": args.layers, "n_head": args.heads,
              "d_model": args.d_model, "dropout": 0.0}
    if args.child is not None:
        print(json.dumps(child(config, args.micro_batch, args.child == "1")))
        return
    estimate = training_memory(GPTConfig(**config), args.micro_batch, precision="fp32")
    res = {}
    for name, flag in (("plain", "0"), ("checkpointed", "1")):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", flag], capture_output=True,
                             text=True, check=True)
        res[name] = json.loads(out.stdout.strip().splitlines()[-1])
    res["plain"]["estimate_bytes"] = estimate.activations
    res["checkpointed"]["estimate_bytes"] = estimate.activations_checkpointed
    states = estimate.weights + estimate.gradients + estimate.optimizer
    rows = [(name, f"{r['activation_bytes'] / MiB:.0f}", f"{r['estimate_bytes'] / MiB:.0f}",
             f"{r['activation_bytes'] / r['estimate_bytes']:.2f}", f"{r['step_seconds']:.2f}")
            for name, r in res.items() if isinstance(r, dict)]
    print(table(rows, ("mode", "activations MiB (measured)", "gptn compute's estimate MiB", "measured / estimate",
                       "forward+backward s")))
    saving = 1 - res["checkpointed"]["activation_bytes"] / res["plain"]["activation_bytes"]
    slowdown = res["checkpointed"]["step_seconds"] / res["plain"]["step_seconds"]
    print(f"checkpointing keeps {saving:.0%} less activation memory for {slowdown:.2f}x the step time; "
          f"weights + gradients + Adam: {states / MiB:.0f} MiB (baseline RSS {res['plain']['baseline_bytes'] / MiB:.0f} MiB)")
    assert abs(res["plain"]["loss"] - res["checkpointed"]["loss"]) < 1e-5  # the same function
    res.update(config=config, micro_batch=args.micro_batch, precision="fp32", activation_saving=saving,
               step_time_ratio=slowdown, states_estimate_bytes=states, machine=machine())
    print(f"wrote {write_results('memory', res)}")


if __name__ == "__main__":
    main()
