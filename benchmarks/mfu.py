"""Training throughput and model FLOPs utilisation (MFU) of the `gpt2` (124M) config.

CPU: fp32, batch 1 x 256 tokens, against the fp32 matmul peak measured in the same run.
GPU (when one is present): bf16 autocast, context 1024, eager and torch.compile, micro-batches of 16 and
32 sequences, and the preset's 0.5M-token batch through gradient accumulation, against the card's dense
bf16 peak (989 TFLOP/s for H100/H200 SXM). A training step is what `gptn pretrain` runs: forward,
backward, gradient clipping and a fused AdamW update. FLOPs per token = 6 N + 12 n_layer d_model T
(PaLM's accounting, as `gptn.compute.training_flops_per_token`).

Targets (issue): CPU >= 45% (reference implementation: 38%); GPU >= 50%.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, median, table, write_results  # noqa: E402

from gptn.compute import training_flops_per_token  # noqa: E402
from gptn.config import get_preset  # noqa: E402
from gptn.model import GPT  # noqa: E402
from gptn.optim import make_optimizer  # noqa: E402
from gptn.runtime import GPU_BF16_PEAK, measure_matmul_peak  # noqa: E402


def train_steps(config, device, batch, seq, steps, amp_dtype=None, compile=False, warmup=2, accumulation=1):
    """Median seconds per optimizer step of `accumulation` micro-batches of `batch` x `seq` tokens."""
    torch.manual_seed(0)
    model = GPT(config).to(device)
    model.train()
    opt = make_optimizer(model, 6e-4, 0.1, (0.9, 0.95), device.type)
    fwd = torch.compile(model, dynamic=False) if compile else model
    x = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    y = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        for _ in range(accumulation):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                _, loss = fwd(x, y)
            (loss / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return median(times), loss.item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16, help="GPU batch (sequences of 1024)")
    args = ap.parse_args()
    config = get_preset("gpt2").config.replace(dropout=0.0)
    if args.device == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
        device = torch.device("cpu")
        peak = max(measure_matmul_peak(device, n=n, seconds=1.0) for n in (1024, 2048))
        seq, batch = 256, 1
        step_s, _ = train_steps(config, device, batch, seq, args.steps)
        tok_s = batch * seq / step_s
        mfu = tok_s * training_flops_per_token(config, seq) / peak
        res = {"mfu": mfu, "tokens_per_s": tok_s, "step_seconds": step_s, "peak_flops": peak,
               "batch": batch, "seq": seq, "precision": "fp32", "target_mfu": 0.45, "reference_mfu": 0.38,
               "machine": machine()}
        print(table([("cpu fp32", f"{batch}x{seq}", f"{tok_s:,.0f}", f"{peak / 1e9:,.0f} GFLOP/s", f"{mfu:.1%}")],
                    ("device", "batch", "tokens/s", "peak (measured)", "MFU")))
        print("target >= 45%:", "met" if mfu >= 0.45 else "NOT met")
        print("wrote", write_results("mfu", res, merge=True))
        return
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in GPU_BF16_PEAK.items() if k in name), None)
    measured = measure_matmul_peak(device, torch.bfloat16, n=8192, seconds=2.0)
    peak = peak or measured
    seq = 1024
    preset_batch = get_preset("gpt2").batch_tokens // seq  # 512 sequences: GPT-3 Small's 0.5M tokens
    rows, gpu = [], {}
    runs = [(args.batch, 1, False), (args.batch, 1, True), (2 * args.batch, 1, True),
            (2 * args.batch, preset_batch // (2 * args.batch), True)]
    for batch, accumulation, compile in runs:
        torch._dynamo.reset()
        step_s, loss = train_steps(config, device, batch, seq, 3 if accumulation > 1 else args.steps + 4,
                                   torch.bfloat16, compile, warmup=3 if accumulation == 1 else 2,
                                   accumulation=accumulation)
        tokens = batch * accumulation * seq
        tok_s = tokens / step_s
        mfu = tok_s * training_flops_per_token(config, seq) / peak
        key = f"b{batch}x{accumulation}_{'compiled' if compile else 'eager'}"
        gpu[key] = {"tokens_per_s": tok_s, "mfu": mfu, "step_seconds": step_s, "batch": batch,
                    "accumulation": accumulation, "compile": compile,
                    "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9}
        torch.cuda.reset_peak_memory_stats()
        rows.append((name, f"{batch}x{seq}", accumulation, "yes" if compile else "no", f"{tok_s:,.0f}", f"{mfu:.1%}"))
    best = max(gpu.values(), key=lambda r: r["mfu"])
    res = {"gpu": {"device": name, "mfu": best["mfu"], "tokens_per_s": best["tokens_per_s"], "peak_flops": peak,
                   "measured_bf16_matmul_flops": measured, "precision": "bf16 autocast", "seq": seq,
                   "runs": gpu, "target_mfu": 0.5, "machine": machine()}}
    print(table(rows, ("device", "micro-batch", "accumulation", "compile", "tokens/s", "MFU")))
    print(f"peak {peak / 1e12:.0f} TFLOP/s (measured bf16 matmul {measured / 1e12:.0f}); best MFU {best['mfu']:.1%};"
          " target >= 50%:", "met" if best["mfu"] >= 0.5 else "NOT met")
    print("wrote", write_results("mfu", res, merge=True))


if __name__ == "__main__":
    main()
