"""In-context learning on a CPU: scoring speed beside lm-evaluation-harness, and the K = 0, 1, 8 table.

1. Speed: HellaSwag items/s for the `gpt2` (124M) config (random weights, GPT-2 tokenizer), fp32 CPU,
   zero-shot. gptn's `evaluate_fewshot` beside lm-evaluation-harness's own `hf` backend on the same
   weights exported with `gptn export-hf`, on the same items (a local copy of the task: the harness's
   HellaSwag downloads its data). Key `speed_ratio_vs_harness` (target >= 1.5).
2. Accuracy: K = 0, 1, 8 on LAMBADA (last-word accuracy) and HellaSwag (accuracy, per-character
   normalisation) for the best model gptn pretrains here in a few minutes (or `--run`), with chance.

    pip install "lm-eval[hf]"   # the harness's hf backend needs accelerate
    python benchmarks/fewshot.py [--items 100] [--run RUN] [--pretrain-seconds 360] [--limit 300]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, machine, seconds_per_step, table, write_results  # noqa: E402

from gptn.checkpoint import load_model, save_checkpoint  # noqa: E402
from gptn.config import GPTConfig, get_preset  # noqa: E402
from gptn.fewshot import evaluate_fewshot, load_task  # noqa: E402
from gptn.hf import export_hf  # noqa: E402
from gptn.inference import prepare_for_inference  # noqa: E402
from gptn.model import GPT  # noqa: E402
from gptn.tokenizer import load_tokenizer  # noqa: E402

HARNESS_TASK = """task: hellaswag_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
test_split: validation
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def speed(work: Path, items: int, hf_batch: int) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    task = load_task("hellaswag", SHARED)
    task.docs = task.docs[:items]
    data = work / "hellaswag.jsonl"
    data.write_text("".join(json.dumps({"query": d.query, "choices": d.choices, "label": d.gold}) + "\n"
                            for d in task.docs))
    (work / "tasks").mkdir(exist_ok=True)
    (work / "tasks" / "hellaswag_local.yaml").write_text(HARNESS_TASK.format(data=data))
    tok = load_tokenizer(SHARED / "gpt2-bpe")
    torch.manual_seed(0)
    model = GPT(get_preset("gpt2").config.replace(dropout=0.0)).eval()
    save_checkpoint(work / "gpt2", model.config, model.state_dict(), tokenizer=tok)
    export_hf(work / "gpt2", work / "gpt2-hf")
    model, tok = load_model(work / "gpt2")
    prepare_for_inference(model)

    evaluate_fewshot(model, tok, load_task("hellaswag", SHARED), 0, limit=2)  # warm-up
    t0 = time.perf_counter()
    ours = evaluate_fewshot(model, tok, task, 0, batch_size=32)
    t_ours = time.perf_counter() - t0

    manager = TaskManager(include_path=str(work / "tasks"))
    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={work / 'gpt2-hf'},dtype=float32",
                                  tasks=["hellaswag_local"], num_fewshot=0, batch_size=hf_batch, device="cpu",
                                  task_manager=manager, bootstrap_iters=0)
    t_hf = time.perf_counter() - t0  # includes loading the model (~1 s), as a user would see it
    r = res["results"]["hellaswag_local"]
    return {"items": items, "gptn_items_per_s": items / t_ours, "harness_items_per_s": items / t_hf,
            "speed_ratio_vs_harness": t_hf / t_ours, "harness_batch_size": hf_batch,
            "gptn_acc_sum": ours.metrics["accuracy_sum"], "harness_acc": r["acc,none"],
            "gptn_acc_per_char": ours.metrics["accuracy_per_char"], "harness_acc_norm": r["acc_norm,none"]}


def pretrain_general(work: Path, seconds: float) -> Path:
    """A small GPT-2-style model on the general English text available offline."""
    from gptn.data import Corpus, prepare
    from gptn.pretrain import PretrainConfig, pretrain

    sources = [str(SHARED / "wikitext-2" / "valid.txt"), str(SHARED / "wikitext-2" / "test.txt"),
               str(SHARED / "tinyshakespeare" / "input.txt")]
    prepare(sources, "bpe:8192", work / "corpus", val_fraction=0.02, progress=False)
    model = dict(n_layer=4, n_head=4, d_model=256, n_ctx=256, dropout=0.0)
    config = GPTConfig(vocab_size=Corpus(work / "corpus").tokenizer.vocab_size, **model)
    steps = max(50, int(seconds / seconds_per_step(config, 16)))
    pretrain(PretrainConfig(corpus=str(work / "corpus"), out=str(work / "general"), overrides=model, steps=steps,
                            batch_tokens=16 * 256, lr=1e-3, min_lr=1e-4, warmup_steps=50, eval_interval=steps,
                            eval_batches=10, checkpoint_interval=steps, max_seconds=seconds * 1.2, progress=False))
    return work / "general"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100, help="HellaSwag items for the speed comparison")
    ap.add_argument("--hf-batch", type=int, default=8, help="the harness's batch size")
    ap.add_argument("--run", help="model for the K table (default: pretrain one here)")
    ap.add_argument("--pretrain-seconds", type=float, default=360)
    ap.add_argument("--limit", type=int, default=300, help="examples per task and K")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    work = Path(tempfile.mkdtemp(prefix="gptn-fewshot-"))
    results = {}
    try:
        if not args.skip_speed:
            s = speed(work, args.items, args.hf_batch)
            results["speed"] = s
            results["speed_ratio_vs_harness"] = s["speed_ratio_vs_harness"]
            print(table([("gptn", f"{s['gptn_items_per_s']:.2f}", f"{s['gptn_acc_sum']:.3f}"),
                         (f"lm-eval hf (batch {args.hf_batch})", f"{s['harness_items_per_s']:.2f}",
                          f"{s['harness_acc']:.3f}")], ("HellaSwag, gpt2 124M, CPU", "items/s", "acc")))
            print(f"speed ratio vs harness: {s['speed_ratio_vs_harness']:.2f}x (target >= 1.5)\n", flush=True)
        run = Path(args.run) if args.run else pretrain_general(work, args.pretrain_seconds)
        model, tok = load_model(run)
        prepare_for_inference(model)
        table_rows, shots = [], {}
        for name in ("lambada", "hellaswag"):
            task = load_task(name, SHARED)
            for k in (0, 1, 8):
                r = evaluate_fewshot(model, tok, task, k, limit=args.limit)
                shots[f"{name}_k{k}"] = {"metric": r.metric, "value": r.value, "stderr": r.stderr,
                                         "examples": r.examples, "demos_used": r.demos_used, "metrics": r.metrics,
                                         "chance": task.chance}
                table_rows.append((name, k, r.metric, f"{r.value:.4f} ± {r.stderr:.4f}", task.chance,
                                   f"{r.demos_used:.2f}"))
                print(table_rows[-1], flush=True)
        print(table(table_rows, ("task", "K", "metric", "value", "chance", "demos used")))
        results["shots"] = shots
        results["model"] = {"run": str(run) if args.run else "pretrained here: wikitext-2 (valid+test) + "
                            "tinyshakespeare, BPE 8192, 4 layers, d_model 256, context 256",
                            "parameters": model.num_parameters(), "n_ctx": model.config.n_ctx}
        results["machine"] = machine()
        print(f"wrote {write_results('fewshot', results, merge=args.skip_speed)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
