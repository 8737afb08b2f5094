"""Does pretraining transfer? GPT-1's ablation (Table 5), small and on a CPU.

1. Pretrain a small GPT on unlabeled in-domain text: the SST-2 training rows with their labels
   removed (except the two labeled sets below, which are left out), plus the sentences of the RTE,
   MRPC and STS-B training sets (text only).
2. Fine-tune on 2,000 labeled SST-2 examples and evaluate on the SST-2 dev set: from the pretrained
   weights and from a random initialisation, each with and without the auxiliary LM loss (λ = 0.5 /
   0), at 10x GPT-1's learning rate (a model this small, and above all one trained from scratch, is
   handicapped by GPT-1's 6.25e-5; --gpt1-lr adds the runs at that rate too): the comparison is best
   against best. Two labeled sets: 2,000 random training rows (most of SST-2's rows are phrases cut
   from the parse trees, 28% of them three words or fewer) and 2,000 whole sentences (rows no
   other row contains), which are what the dev set holds.
3. The same pretrained model fine-tuned on 2,000 training examples each of RTE, MRPC and STS-B
   (dev results, the better SST-2 λ), which keeps the whole benchmark under 20 minutes on two cores.
4. With --label-curve (about 10 minutes more): pretrained vs scratch on 250, 500 and 1,000 of the random
   rows, two seeds each (the seed picks the subset and the initialisation), epochs scaled so that every
   run takes as many optimizer steps as 3 epochs of 2,000. Whether pretraining helps when labels are scarcer.

Writes benchmarks/results/transfer.json; `pretrained_minus_scratch` is the best pretrained SST-2 dev
accuracy minus the best from-scratch accuracy, in points, on the random rows
(`pretrained_minus_scratch_whole_sentences` on the whole sentences).

    python benchmarks/transfer.py [--pretrain-seconds 360] [--gpt1-lr] [--label-curve] [--work /tmp/gptn-transfer]
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, machine, table, write_results  # noqa: E402

from gptn.config import GPTConfig  # noqa: E402
from gptn.data import Corpus, prepare, read_records  # noqa: E402
from gptn.finetune import FinetuneConfig, finetune  # noqa: E402
from gptn.pretrain import PretrainConfig, pretrain  # noqa: E402
from gptn.quickstart import _seconds_per_step  # noqa: E402

GLUE = SHARED / "glue"
# Small enough to see ~4M tokens (2-3 passes over the corpus) in 9 minutes on two cores; the
# sentences are short, so a 64-token window loses little and runs faster than 128 per token.
MODEL = dict(n_layer=4, n_head=4, d_model=128, n_ctx=64, dropout=0.0)
BATCH_SEQUENCES, PRETRAIN_LR = 16, 2e-3  # measured best of (16, 8) x (1e-3, 2e-3) in a 4-minute budget
N_LABELED = 2000
GPT1_LR = 6.25e-5


def full_sentences(phrases: list[str]) -> list[int]:
    """Indices of the SST-2 rows that are whole sentences: phrases no other row contains (SST-2's
    67,349 training rows are every phrase of the parse trees of ~6,900 sentences; dev is whole sentences)."""
    words = [p.split() for p in phrases]
    df = collections.Counter(w for ws in words for w in set(ws))
    rows_with = collections.defaultdict(list)
    for i, ws in enumerate(words):
        for w in set(ws):
            rows_with[w].append(i)
    out = []
    for i, ws in enumerate(words):
        if ws:
            rarest, padded = min(set(ws), key=df.__getitem__), f" {phrases[i]} "
            if not any(len(phrases[j]) > len(phrases[i]) and padded in f" {phrases[j]} " for j in rows_with[rarest]):
                out.append(i)
    return out


def _write_tsv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w") as f:
        f.write("sentence\tlabel\n")
        for r in rows:
            f.write(f"{r['sentence']}\t{r['label']}\n")
    return path


def build_data(work: Path, seed: int = 0) -> tuple[Path, dict[str, Path]]:
    """(unlabeled corpus JSONL, {"random rows": TSV, "whole sentences": TSV} of 2,000 labeled SST-2 examples)."""
    sst = read_records(GLUE / "SST-2" / "train.tsv")
    order = list(range(len(sst)))
    random.Random(seed).shuffle(order)
    rows = order[:N_LABELED]
    taken = set(rows)
    whole = [i for i in full_sentences([r["sentence"].strip() for r in sst]) if i not in taken]
    random.Random(seed).shuffle(whole)
    sentences = whole[:N_LABELED]
    taken |= set(sentences)
    labeled = {"random rows": _write_tsv(work / "sst2_train_2000.tsv", [sst[i] for i in rows]),
               "whole sentences": _write_tsv(work / "sst2_sentences_2000.tsv", [sst[i] for i in sentences])}
    texts = [sst[i]["sentence"].strip() for i in order if i not in taken]
    for r in read_records(GLUE / "RTE" / "train.tsv"):
        texts += [r["sentence1"], r["sentence2"]]
    for r in read_records(GLUE / "MRPC" / "train.tsv"):
        texts += [r["#1 String"], r["#2 String"]]
    for r in read_records(GLUE / "STS-B" / "train.tsv"):
        texts += [r["sentence1"], r["sentence2"]]
    corpus_jsonl = work / "unlabeled.jsonl"
    with open(corpus_jsonl, "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return corpus_jsonl, labeled


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/gptn-transfer")
    # Measured: 4 and 12 minutes of pretraining (val loss 5.6 vs 4.5) fine-tuned to the same accuracy.
    ap.add_argument("--pretrain-seconds", type=float, default=360)
    ap.add_argument("--reuse", action="store_true", help="reuse a pretrained run already in --work")
    ap.add_argument("--lr", type=float, default=6.25e-4, help="fine-tuning learning rate (10x GPT-1's)")
    ap.add_argument("--gpt1-lr", action="store_true", help="also fine-tune SST-2 at GPT-1's 6.25e-5")
    ap.add_argument("--label-curve", action="store_true", help="also pretrained vs scratch on 250/500/1,000 labels")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    work = Path(args.work)
    t_all = time.time()
    run = work / "pretrained"
    if not args.reuse:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    corpus_jsonl, labeled = build_data(work)

    reused = (run / "checkpoint").is_dir()
    if not reused:
        t0 = time.time()
        texts = [json.loads(line)["text"] for line in open(corpus_jsonl)]
        prepare([str(corpus_jsonl)], "bpe:4096", work / "corpus", val_fraction=0.02, progress=False)
        print(f"corpus: {len(texts):,} unlabeled sentences, prepared in {time.time() - t0:.0f} s", flush=True)
        config = GPTConfig(vocab_size=Corpus(work / "corpus").tokenizer.vocab_size, **MODEL)
        # A cosine schedule that ends when the time budget does.
        steps = int(args.pretrain_seconds / _seconds_per_step(config, BATCH_SEQUENCES))
        summary = pretrain(PretrainConfig(
            corpus=str(work / "corpus"), out=str(run), overrides=dict(MODEL), steps=steps,
            batch_tokens=BATCH_SEQUENCES * MODEL["n_ctx"], lr=PRETRAIN_LR, min_lr=PRETRAIN_LR / 10,
            warmup_steps=100, eval_interval=500,
            eval_batches=10, checkpoint_interval=1000, max_seconds=args.pretrain_seconds * 1.2, progress=False))
        pre = {"steps": summary["steps"], "val_loss": summary["val"]["val_loss"], "seconds": round(summary["train_seconds"]),
               "tokens_per_s": summary["tokens_per_s"]}
        (work / "pretrain.json").write_text(json.dumps(pre))
    pre = json.loads((work / "pretrain.json").read_text())
    print(f"pretrained: {pre['steps']} steps, val loss {pre['val_loss']:.3f}, {pre['seconds']:.0f} s", flush=True)

    def tune(name, train, val, **kw):
        cfg = FinetuneConfig(run=str(run), out=str(work / name), train=str(train), val=str(val),
                             progress=False, **{"lr": args.lr, **kw})
        t0 = time.time()
        r = finetune(cfg)
        best = r["best"]
        print(f"{name}: {r['metric']} {best['value']:.4f} ({time.time() - t0:.0f} s)", flush=True)
        return {"metric": r["metric"], "value": best["value"], "metrics": best["metrics"], "epoch": best["epoch"],
                "seconds": round(time.time() - t0, 1), "lr": cfg.lr, "lm_weight": cfg.lm_weight}

    sst_dev = GLUE / "SST-2" / "dev.tsv"
    sst, diffs = {}, {}
    for labeled_set, tsv in labeled.items():
        cells = {}
        for init in ("pretrained", "scratch"):
            for lr_name, lr in [(f"lr {args.lr:g}", args.lr)] + ([("GPT-1 lr", GPT1_LR)] if args.gpt1_lr else []):
                for aux, lm_weight in (("aux LM", 0.5), ("no aux", 0.0)):
                    name = f"sst2_{labeled_set.split()[0]}_{init}_{'aux' if lm_weight else 'noaux'}_{lr:g}"
                    cells[(init, aux, lr_name)] = tune(name, tsv, sst_dev, lr=lr, lm_weight=lm_weight,
                                                       from_scratch=init == "scratch")
        best_of = {init: max(v["value"] for k, v in cells.items() if k[0] == init) for init in ("pretrained", "scratch")}
        diffs[labeled_set] = round(100 * (best_of["pretrained"] - best_of["scratch"]), 2)
        sst.update({f"{labeled_set}: {', '.join(k)}": v for k, v in cells.items()})
    best = max((v["value"], v["lr"], v["lm_weight"]) for k, v in sst.items() if k.startswith("random rows: pretrained"))
    glue = {task: tune(task.lower(), GLUE / task / "train.tsv", GLUE / task / "dev.tsv", lr=best[1],
                       lm_weight=best[2], max_train_examples=N_LABELED)
            for task in ("RTE", "MRPC", "STS-B")}
    curve = {}
    if args.label_curve:
        for n in (250, 500, 1000):
            for init in ("pretrained", "scratch"):
                runs = [tune(f"sst2_{n}_{init}_seed{seed}", labeled["random rows"], sst_dev, lr=args.lr, lm_weight=0.0,
                             from_scratch=init == "scratch", max_train_examples=n, epochs=round(3 * N_LABELED / n),
                             seed=seed) for seed in (1, 2)]
                curve[f"{n} labels: {init}"] = {"accuracy": [r["value"] for r in runs],
                                                "mean": sum(r["value"] for r in runs) / len(runs)}
    chance = {"SST-2": 0.5, "RTE": 0.5, "MRPC": "F1 0.81 if always 'paraphrase'", "STS-B": "Pearson 0"}

    rows = [(k, f"{100 * v['value']:.1f}", v["lr"], v["lm_weight"], v["seconds"]) for k, v in sst.items()]
    print("\nSST-2 dev accuracy (%), 2,000 labeled training examples")
    print(table(rows, ("setting", "accuracy", "lr", "λ", "s")))
    for labeled_set, d in diffs.items():
        print(f"pretrained minus scratch (best of each), {labeled_set}: {d:+.1f} points (target >= +5)")
    if curve:
        print("\nSST-2 dev accuracy (%) with fewer labels (random rows, no aux, two seeds)")
        print(table([(k, f"{100 * v['mean']:.1f}", " / ".join(f"{100 * a:.1f}" for a in v["accuracy"]))
                     for k, v in curve.items()], ("labels: init", "mean", "seeds")))
    rows = [(k, v["metric"], f"{v['value']:.4f}", json.dumps({m: round(x, 4) for m, x in v["metrics"].items()}))
            for k, v in glue.items()]
    print(f"\nGLUE dev, the same pretrained model, {N_LABELED:,} training examples each")
    print(table(rows, ("task", "metric", "value", "all metrics")))
    results = {"pretrained_minus_scratch": diffs["random rows"],
               "pretrained_minus_scratch_whole_sentences": diffs["whole sentences"], "sst2_dev": sst,
               **({"label_curve": curve} if curve else {}), "glue_dev": glue, "glue_train_examples": N_LABELED,
               "chance": chance,
               "pretraining": {**pre, "model": MODEL, "corpus": "SST-2 train minus both 2,000-example labeled "
                               "sets + RTE/MRPC/STS-B train sentences, labels removed", "tokenizer": "bpe:4096"},
               "finetune_defaults": "GPT-1: 3 epochs, batch 32, warm-up 0.2% then linear decay, dropout 0.1",
               "total_seconds": round(time.time() - t_all), "pretraining_reused": reused, "machine": machine()}
    print(f"\nwrote {write_results('transfer', results)} ({time.time() - t_all:.0f} s)")


if __name__ == "__main__":
    main()
