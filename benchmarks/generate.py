"""Decode speed of the `gpt2` (124M) config, fp32, CPU, greedy: gptn beside Hugging Face `generate`.

Prompt 16 tokens, 256 new tokens, batch 1 and batch 8, the same random weights in both (exported with
`gptn export-hf`); gptn's model is prepacked for CPU inference (oneDNN), as `gptn generate` does. The batch-1 memory-bandwidth limit is the copy bandwidth measured in this run over
the weight bytes read per token. Also: a 1 x 1024 prefill computing logits for the last position only.

Targets (issue): batch 1 >= 1.25x Hugging Face; batch 8 >= 1.5x Hugging Face.
"""

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, table, write_results  # noqa: E402

from gptn.checkpoint import save_checkpoint  # noqa: E402
from gptn.config import get_preset  # noqa: E402
from gptn.generate import SamplingConfig, generate_ids  # noqa: E402
from gptn.hf import export_hf  # noqa: E402
from gptn.model import GPT  # noqa: E402

PROMPT, NEW, REPS = 16, 256, 2


def copy_bandwidth(nbytes=512 * 2**20, reps=10) -> float:
    """Bytes moved per second (read + write) by a large tensor copy."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def best_time(fn, reps=REPS) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    import transformers
    torch.set_num_threads(min(2, torch.get_num_threads()))
    config = get_preset("gpt2").config.replace(dropout=0.0)
    torch.manual_seed(0)
    model = GPT(config).eval()
    work = Path(tempfile.mkdtemp())
    save_checkpoint(work / "run", config, model.state_dict())
    export_hf(work / "run", work / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(work / "hf").eval()

    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n != "wpe.weight")
    bandwidth = copy_bandwidth()
    limit = bandwidth / weight_bytes
    model.prepack_for_cpu_inference()  # as `gptn generate` does on CPU
    g = torch.Generator().manual_seed(1)
    rows, res = [], {}
    for batch in (1, 8):
        prompts = torch.randint(0, config.vocab_size, (batch, PROMPT), generator=g)
        sampling = SamplingConfig(max_new_tokens=NEW, greedy=True)
        ours_out = []
        ours = best_time(lambda: ours_out.append(generate_ids(model, prompts.tolist(), sampling)))
        with torch.no_grad():
            theirs_out = []
            theirs = best_time(lambda: theirs_out.append(hf.generate(
                prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=NEW,
                min_new_tokens=NEW, use_cache=True, pad_token_id=0)))
        same = ours_out[-1] == theirs_out[-1][:, PROMPT:].tolist()
        ours_tps, theirs_tps = batch * NEW / ours, batch * NEW / theirs
        res[f"batch{batch}"] = {"gptn_tokens_per_s": ours_tps, "hf_tokens_per_s": theirs_tps,
                                "ratio": ours_tps / theirs_tps, "identical_tokens": same}
        rows.append((f"batch {batch}", f"{ours_tps:.1f}", f"{theirs_tps:.1f}", f"{ours_tps / theirs_tps:.2f}x",
                     "yes" if same else "NO"))
    with torch.no_grad():
        long = torch.randint(0, config.vocab_size, (1, 1024), generator=g)
        prefill = best_time(lambda: model(long, last_only=True), reps=3)
        hf_prefill = best_time(lambda: hf(long, logits_to_keep=1), reps=3)
    res.update({
        "ratio_batch1": res["batch1"]["ratio"], "ratio_batch8": res["batch8"]["ratio"],
        "bandwidth_bytes_per_s": bandwidth, "weight_bytes_per_token": weight_bytes,
        "bandwidth_limit_tokens_per_s_batch1": limit,
        "fraction_of_bandwidth_limit_batch1": res["batch1"]["gptn_tokens_per_s"] / limit,
        "prefill_1x1024_seconds": prefill, "hf_prefill_1x1024_seconds": hf_prefill,
        "prompt_tokens": PROMPT, "new_tokens": NEW, "precision": "fp32",
        "targets": {"ratio_batch1": 1.25, "ratio_batch8": 1.5}, "machine": machine()})
    print(table(rows, ("greedy decode", "gptn tok/s", "HF tok/s", "ratio", "same tokens")))
    print(f"batch-1 bandwidth limit: {limit:.1f} tok/s ({bandwidth / 1e9:.1f} GB/s copy, {weight_bytes / 1e6:.0f} MB "
          f"of weights per token); gptn reaches {res['fraction_of_bandwidth_limit_batch1']:.0%} of it")
    print(f"prefill 1x1024 (last-position logits): gptn {prefill * 1e3:.0f} ms, HF {hf_prefill * 1e3:.0f} ms")
    print("wrote", write_results("generate", res))


if __name__ == "__main__":
    main()
