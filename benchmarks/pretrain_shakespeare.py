"""Character-level Tiny Shakespeare with the classic small CPU recipe: gptn beside Hugging Face GPT-2.

Recipe: 4 layers, 4 heads, d_model 128, context 64, batch 12, 2,000 steps, AdamW lr 1e-3 cosine to
1e-4 with 100 warm-up steps, dropout 0, evaluation every 250 steps over 20 batches; betas (0.9, 0.99),
weight decay 0.1 and gradient clipping at 1.0 as the reference recipe's config file has them. Both models get
the same batches (gptn's loader), the same AdamW (weight decay on matrices only, fused kernel) and
the same schedule; Hugging Face's GPT2LMHeadModel has biases, so gptn keeps them on here.
Then: the wall time gptn needs to reach validation loss 1.88 with the best settings it offers
(Muon, a 32-character context with 48 sequences per step, no biases, 2 layers; 4 shown too);
the validation loss of each gptn model over the whole validation text is reported beside the
recipe's 20-batch estimate, so that a shorter context cannot flatter the figure.

Targets (issue): tokens/s >= 1.7x Hugging Face with validation loss <= 1.89; 1.88 within 48 s.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import SHARED, machine, median, table, write_results  # noqa: E402

from gptn.checkpoint import load_model  # noqa: E402
from gptn.data import BatchLoader, Corpus, prepare  # noqa: E402
from gptn.scoring import score  # noqa: E402
from gptn.optim import make_optimizer  # noqa: E402
from gptn.pretrain import PretrainConfig, pretrain  # noqa: E402
from gptn.train import lr_at  # noqa: E402
from gptn.runtime import autocast_dtype, measure_matmul_peak  # noqa: E402

N_CTX, BATCH, STEPS, LR, MIN_LR, WARMUP, BETA2 = 64, 12, 2000, 1e-3, 1e-4, 100, 0.99
MODEL = dict(n_layer=4, n_head=4, d_model=128, n_ctx=N_CTX, dropout=0.0)


def gptn_recipe(corpus: Path, out: Path, steps: int, **extra) -> dict:
    cfg = PretrainConfig(corpus=str(corpus), out=str(out), preset="mini", overrides={**MODEL, **extra.pop("model", {})},
                         steps=steps, batch_tokens=BATCH * N_CTX, lr=LR, min_lr=MIN_LR, warmup_steps=WARMUP,
                         eval_interval=250, eval_batches=20, checkpoint_interval=10**9, seed=1337, beta2=BETA2,
                         peak_flops=1e12, progress=False, log_interval=10**9, precision="fp32")
    for k, v in extra.items():
        setattr(cfg, k, v)
    t0 = time.perf_counter()
    s = pretrain(cfg)
    s["wall_seconds"] = time.perf_counter() - t0
    return s


def full_val_loss(run: Path, corpus: Path) -> float:
    """Mean loss over every character of the validation text, in consecutive windows of the model's context."""
    import numpy as np
    model, tok = load_model(run)
    text = tok.decode([i for i in np.concatenate(Corpus(corpus).shards("val")).tolist() if i != tok.eot_id])
    return -score(model, tok, text, stride=model.config.n_ctx, batch_size=64).total_logprob / len(text)


@torch.no_grad()
def _hf_eval(model, loader):
    model.eval()
    total, n = 0.0, 0
    for x, y in loader.eval_batches(20, BATCH):
        logits = model(input_ids=x).logits
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).item()
        n += 1
    model.train()
    return total / n


def hf_recipe(corpus: Path, steps: int) -> dict:
    import transformers
    c = Corpus(corpus)
    vocab = c.tokenizer.vocab_size
    torch.manual_seed(1337)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=vocab, n_positions=N_CTX, n_embd=128, n_layer=4, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=vocab - 1, eos_token_id=vocab - 1))
    model.train()
    opt = make_optimizer(model, LR, 0.1, (0.9, BETA2), "cpu")
    train = BatchLoader(c, "train", N_CTX, BATCH, seed=1337)
    val = BatchLoader(c, "val", N_CTX, BATCH, seed=1338)
    step_times, val_loss = [], None
    for step in range(steps):
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, LR, MIN_LR, WARMUP)
        x, y = next(train.step_batches(step))
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        step_times.append(time.perf_counter() - t0)
        if (step + 1) % 250 == 0 or step + 1 == steps:
            val_loss = _hf_eval(model, val)
    return {"tokens_per_s": BATCH * N_CTX * len(step_times) / sum(step_times),
            "median_step_ms": median(step_times) * 1e3, "val_loss": val_loss, "train_seconds": sum(step_times)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--skip-fast", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    work = Path(tempfile.mkdtemp())
    corpus = work / "shakespeare"
    prepare([str(SHARED / "tinyshakespeare" / "input.txt")], "char", corpus, val_fraction=0.1, progress=False)

    peak = measure_matmul_peak(torch.device("cpu"))  # how fast this (shared, noisy) machine is right now
    ours = gptn_recipe(corpus, work / "gptn", args.steps)
    theirs = hf_recipe(corpus, args.steps)
    ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
    res = {"speed_ratio_vs_hf": ratio, "val_loss": ours["val"]["val_loss"],
           "gptn": {"tokens_per_s": ours["tokens_per_s"], "val_loss": ours["val"]["val_loss"],
                    "full_val_loss": full_val_loss(work / "gptn", corpus),
                    "train_seconds": ours["train_seconds"], "wall_seconds": ours["wall_seconds"]},
           "hf": theirs, "steps": args.steps, "matmul_peak_gflops": peak / 1e9,
           "targets": {"speed_ratio_vs_hf": 1.7, "val_loss": 1.89, "seconds_to_1_88": 48.0}}
    rows = [("gptn (biases on)", f"{ours['tokens_per_s']:,.0f}", f"{ours['val']['val_loss']:.4f}", f"{ours['train_seconds']:.1f}"),
            ("Hugging Face GPT2LMHeadModel", f"{theirs['tokens_per_s']:,.0f}", f"{theirs['val_loss']:.4f}",
             f"{theirs['train_seconds']:.1f}")]
    # Both above are fp32 (the same arithmetic); gptn's default, --precision auto, is bf16 autocast on a
    # CPU where bf16 measures faster and the model is wide enough (128 is the threshold: this recipe).
    auto = gptn_recipe(corpus, work / "auto", args.steps, precision="auto")
    res["precision_auto"] = {"dtype": str(autocast_dtype("auto", torch.device("cpu"), MODEL.get("d_model", 128))),
                             "tokens_per_s": auto["tokens_per_s"], "val_loss": auto["val"]["val_loss"],
                             "speed_ratio_vs_fp32": auto["tokens_per_s"] / ours["tokens_per_s"]}
    rows.append(("gptn --precision auto", f"{auto['tokens_per_s']:,.0f}", f"{auto['val']['val_loss']:.4f}",
                 f"{auto['train_seconds']:.1f}"))

    if not args.skip_fast:
        # The same recipe with --compile: tokens/s from the median logged step (compilation excluded).
        import json
        comp = gptn_recipe(corpus, work / "compiled", args.steps, compile=True, log_interval=1)
        steps_tps = sorted(json.loads(ln)["tokens_per_s"] for ln in (work / "compiled" / "metrics.jsonl").read_text().splitlines()
                           if '"loss"' in ln)
        comp_tps = steps_tps[len(steps_tps) // 2]
        res["compiled"] = {"tokens_per_s_median_step": comp_tps, "speed_ratio_vs_hf": comp_tps / theirs["tokens_per_s"],
                           "val_loss": comp["val"]["val_loss"], "wall_seconds": comp["wall_seconds"]}
        rows.append(("gptn --compile (median step)", f"{comp_tps:,.0f}", f"{comp['val']['val_loss']:.4f}",
                     f"{comp['wall_seconds']:.1f} (wall, incl. compile)"))
        # Best settings gptn offers for wall time to 1.88, measured on this machine: Muon (about half the
        # tokens AdamW needs), a 32-character context with 48 sequences per step (more, shorter windows
        # learn faster early; the Muon step's cost is per step, not per token), no biases, a cosine that
        # ends where 1.88 is due, evaluation over the recipe's 15,360 validation tokens, stopping at 1.88.
        # Two layers instead of four: at this budget the shallower model gets there sooner (measured
        # 2 / 3 / 4 layers: 1.85 in 37 s, 1.86 in 38 s, 1.88 in 55 s); the four-layer run is shown too.
        common = dict(batch_tokens=48 * 32, optimizer="muon", muon_lr=0.04, lr=5e-3, min_lr=5e-4, warmup_steps=30,
                      eval_batches=10, stop_at_val_loss=1.88)
        res["fast_runs"] = {}
        for name, n_layer, steps in (("recipe's 4 layers", 4, 280), ("2 layers", 2, 340)):
            settings = dict(common, model={"bias": False, "n_ctx": 32, "n_layer": n_layer}, eval_interval=steps // 4)
            fast = gptn_recipe(corpus, work / f"fast{n_layer}", steps, **settings)
            reached = fast["val"]["val_loss"] <= 1.88
            res["fast_runs"][name] = {
                "steps": fast["steps"], "val_loss": fast["val"]["val_loss"], "reached": reached,
                "wall_seconds": fast["wall_seconds"], "train_seconds": fast["train_seconds"],
                "tokens_per_s": fast["tokens_per_s"], "full_val_loss": full_val_loss(work / f"fast{n_layer}", corpus),
                "settings": {**settings, "steps": steps}}
            rows.append((f"gptn best settings, {name}, to 1.88", f"{fast['tokens_per_s']:,.0f}",
                         f"{fast['val']['val_loss']:.4f}", f"{fast['wall_seconds']:.1f} (wall, {fast['steps']} steps)"))
        times = [r["wall_seconds"] for r in res["fast_runs"].values() if r["reached"]]
        res["seconds_to_1_88"] = min(times) if times else None
    res["machine"] = machine()
    print(table(rows, ("model", "tokens/s", "val loss", "seconds")))
    print(f"speed ratio gptn / HF = {ratio:.2f}x (target >= 1.7); val loss {res['val_loss']:.4f} (target <= 1.89)"
          + (f"; seconds to 1.88 = {res.get('seconds_to_1_88')} (target <= 48)" if not args.skip_fast else ""))
    print("wrote", write_results("pretrain_shakespeare", res))


if __name__ == "__main__":
    main()
