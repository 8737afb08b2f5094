"""Can gptn tell generated text from human text? GLTR-style detection (`gptn detect`), measured.

1. Two small English models, pretrained in the run: the generator (books-00 of the Gutenberg corpus,
   BPE 4,096) and a second scorer trained on other text (IMDB reviews, its own BPE) — the realistic case,
   where the detector's model is not the generator.
2. Human passages: 128-token stretches of held-out books (books-01, never trained on). Machine passages:
   the generator continues each human passage's first 16 tokens to 128 tokens with greedy decoding, top-k 40,
   top-p 0.9 and temperature 1.0 (one sampler per passage set, the same prompts).
3. Each passage is scored by each scorer (`gptn.detect.token_stats`: GLTR's rank buckets, mean
   log-probability, mean entropy). For every (sampler, scorer) cell a detector is fitted on half of the
   prompts (human and machine passages of the same prompts together) and its AUROC reported on the other
   half, beside the AUROC of the top-10 share alone (GLTR's main signal, nothing fitted).

Writes benchmarks/results/detect.json: `auroc[sampler][scorer]`, `auroc_top10_share`, the pretraining
figures, and the same-model detector fitted on every sampler's passages (the default `gptn detect` uses).
Target: AUROC >= 0.95 for top-k 40 text scored by the same model.

    python benchmarks/detect.py [--minutes 6] [--other-minutes 4] [--passages 120] [--work /tmp/gptn-detect]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, machine, table, write_results  # noqa: E402

from gptn.checkpoint import load_model  # noqa: E402
from gptn.data import prepare  # noqa: E402
from gptn.detect import FEATURES, Detector, token_stats  # noqa: E402
from gptn.generate import generate  # noqa: E402
from gptn.sampling import SamplingConfig  # noqa: E402
from gptn.pretrain import PretrainConfig, pretrain  # noqa: E402

SAMPLERS = {"greedy": dict(greedy=True), "top-k 40": dict(top_k=40), "top-p 0.9": dict(top_p=0.9),
            "temperature 1.0": dict(temperature=1.0)}
MODEL = dict(n_layer=4, n_head=4, d_model=256, n_ctx=256, dropout=0.0, bias=False)
LENGTH, PROMPT = 128, 16


def auroc(human: list[float], machine_: list[float]) -> float:
    """P(a machine passage scores above a human one), ties counting half: the area under the ROC curve."""
    wins = sum((m > h) + 0.5 * (m == h) for m in machine_ for h in human)
    return wins / (len(human) * len(machine_))


def train_model(work: Path, name: str, sources: list[str], minutes: float, text_field: str = "text") -> dict:
    corpus, run = work / f"{name}-corpus", work / f"{name}-run"
    if not (corpus / "manifest.json").exists():
        prepare(sources, "bpe:4096", corpus, val_fraction=0.01, text_field=text_field, progress=False)
    pretrain(PretrainConfig(corpus=str(corpus), out=str(run), overrides=dict(MODEL), steps=10 ** 7,
                            max_seconds=60 * minutes, batch_tokens=16 * MODEL["n_ctx"], lr=3e-3, min_lr=3e-4,
                            optimizer="muon", warmup_steps=50, eval_interval=1000, checkpoint_interval=1000,
                            progress=False))
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_loss" in r]
    return {"run": str(run), "val_loss": val[-1]["val_loss"], "steps": val[-1]["step"],
            "tokens": val[-1]["step"] * 16 * MODEL["n_ctx"], "minutes": minutes}


def human_passages(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    """n passages of LENGTH tokens from held-out books (books-01), one stretch per book at a time."""
    books = [json.loads(line)["text"] for line in open(SHARED / "gutenberg" / "books-01.jsonl")]
    rng = random.Random(seed)
    out = []
    for book in itertools.cycle(books):
        ids = tokenizer.encode(book[len(book) // 10:len(book) // 10 + 200_000])  # past the front matter
        start = rng.randrange(0, max(1, len(ids) - LENGTH))
        if len(ids) >= start + LENGTH:
            out.append(ids[start:start + LENGTH])
        if len(out) == n:
            return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/gptn-detect")
    ap.add_argument("--minutes", type=float, default=6.0, help="the generator's pretraining budget")
    ap.add_argument("--other-minutes", type=float, default=4.0, help="the second scorer's pretraining budget")
    ap.add_argument("--passages", type=int, default=120, help="human passages (and machine passages per sampler)")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    runs = {"same model": train_model(work, "books", [str(SHARED / "gutenberg" / "books-00.jsonl")], args.minutes),
            "other model": train_model(work, "reviews", [str(SHARED / "imdb" / "unsup.jsonl")], args.other_minutes)}
    print("pretrained: " + json.dumps(runs), flush=True)
    generator, gen_tok = load_model(runs["same model"]["run"])
    generator.eval()
    humans = human_passages(gen_tok, args.passages)
    prompts = [gen_tok.decode(p[:PROMPT]) for p in humans]
    texts = {"human": [gen_tok.decode(p) for p in humans]}
    for name, options in SAMPLERS.items():
        torch.manual_seed(0)
        outs = generate(generator, gen_tok, prompts, SamplingConfig(max_new_tokens=LENGTH - PROMPT, seed=0, **options))
        texts[name] = [p + o[0] for p, o in zip(prompts, outs)]
    print(f"{len(texts['human'])} human passages, {len(SAMPLERS)} x {args.passages} machine passages", flush=True)
    features = {}
    for scorer, info in runs.items():
        model, tok = load_model(info["run"])
        model.eval()
        features[scorer] = {k: [token_stats(model, tok, t).features() for t in v] for k, v in texts.items()}
    half = args.passages // 2
    results, single, rows = {}, {}, []
    for sampler in SAMPLERS:
        results[sampler], single[sampler] = {}, {}
        for scorer in runs:
            f = features[scorer]
            detector = Detector.fit(f["human"][:half], f[sampler][:half])
            p_h = [detector.probability(x) for x in f["human"][half:]]
            p_m = [detector.probability(x) for x in f[sampler][half:]]
            results[sampler][scorer] = round(auroc(p_h, p_m), 4)
            single[sampler][scorer] = round(auroc([x["top10"] for x in f["human"][half:]],
                                                  [x["top10"] for x in f[sampler][half:]]), 4)
            rows.append((sampler, scorer, f"{results[sampler][scorer]:.3f}", f"{single[sampler][scorer]:.3f}"))
    print(table(rows, ("sampler", "scorer", "AUROC (fitted, held-out half)", "AUROC top-10 share alone")))
    same = features["same model"]
    # Balanced classes: each prompt's machine passage from one sampler in turn, as many as the human ones.
    machine_mix = [same[s][i] for i, s in zip(range(args.passages), itertools.cycle(SAMPLERS))]
    default = Detector.fit(same["human"], machine_mix,
                           fitted_on="benchmarks/detect.py: its generator's own passages (the four samplers in turn) "
                                     "against held-out human text")
    means = {k: {f: round(sum(x[f] for x in v) / len(v), 4) for f in FEATURES} for k, v in same.items()}
    target = results["top-k 40"]["same model"]
    print(f"top-k 40, same model: AUROC {target:.3f} (target >= 0.95: {'met' if target >= 0.95 else 'NOT met'})")
    out = write_results("detect", {
        "auroc": results, "auroc_top10_share": single, "target": {"top-k 40, same model": 0.95, "measured": target},
        "feature_means_same_model": means, "default_detector": {k: v for k, v in vars(default).items()},
        "pretraining": runs, "passages": args.passages, "length_tokens": LENGTH, "prompt_tokens": PROMPT,
        "protocol": "detector fitted on the first half of the prompts' passages, AUROC on the second half",
        "seconds": round(time.time() - t0), "command": " ".join(["python", *sys.argv]), "machine": machine()})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
