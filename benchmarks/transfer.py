"""Does pretraining transfer, against what a practitioner would use? GPT-1's claim, small, on a CPU.

The protocol (also written into the JSON's `protocol`):

1. Pretrain once, at this commit, a GPT of --shape (blocks x width; default 4 x 256: d_ff 4 x the width,
   context 128, Muon) for --pretrain-seconds
   (default 40 min, ending annealed: the cosine decays over the time budget) on IMDB's unlabeled + train
   reviews (never test), normalised like SST-2 (`gptn prepare --normalize sst`), then continue it on
   SST-2's unlabeled training sentences (task-adaptive pretraining, Gururangan et al. 2020; never dev,
   never the selection set) for each of --tapt-epochs (default 1, 2, 4 epochs of their 163k tokens; about
   2 min in all), keeping the run whose loss on those sentences' held-out 2% is lowest (a fixed 5 minutes
   was 20 epochs, and that loss rose from 4.64 to 5.83). --books-seconds N pretrains on Gutenberg first.
   Every section below uses these runs; which of the two SST-2 starts from is a selection choice.
   So are the shape, the vocabulary and the corpus: each candidate (--shape, --vocab, --books-seconds)
   pretrained for the same wall clock (books + reviews) in its own --work and its SST-2 search run as in 3, the one whose
   pretrained arm scores best on the selection set is the default (--candidates puts the others beside
   a run in the JSON's `pretraining_selection`).
2. Data. SST-2: whole training sentences (dev holds whole sentences; the training rows are every phrase
   of the parse trees), shuffled once: 500 form the selection set, and label subsets of 2,000 are drawn
   from the rest (subset k: its own seeded draw). IMDB: the same from the train reviews. Reported once on
   SST-2 dev (872) and on 5,000 IMDB test reviews, minus every report item that occurs verbatim in the
   pretraining text (the JSON says how many).
3. Selection, on the selection set only. Each arm (pretrained, scratch: the same shape, randomly
   initialised) runs a grid (SEARCH: for SST-2 the pretrained arm's is source run x rate x λ, 12 points,
   the scratch arm's 6 rates x λ; for IMDB, at SST-2's recipe less what reads SST-2's own text, how long
   reviews are read x λ: all windows in every step, one window drawn per review each epoch (all of them
   at evaluation: about a quarter of the training cost), or the tail), then for SST-2 from its best point
   each of REFINE's changes (head pooling "extract" instead of "mean"; 5 epochs instead of 3; ULMFiT's
   discriminative rates, each block at 0.8 or 0.5 times the rate of the one above; self-training: the
   point, trained on its labels, labels SST-2's unlabeled training sentences, and trains again from its
   source on its labels plus the most confident half of each predicted class), one seed on label subset 0;
   every run keeps the epoch that is best on the selection set (a self-training run's teacher too). The
   best trial is frozen as the arm's recipe, with the epoch it kept as the number of epochs to train for
   from then on (`refit_epochs`).
4. Report: each frozen recipe runs --seeds seeds x --subsets label subsets, each on its label subset plus
   the selection set for the frozen epochs (what a practitioner does once the choices are made; no
   per-seed selection run: every choice, epochs included, was made in 3), scored once on the report
   set (a self-trained recipe's teacher: the same options on the same examples, its pseudo-labels for the
   unlabeled sentences outside them). TF-IDF (words + bigrams) + logistic regression (C by 5-fold
   cross-validation) is fitted on the same labeled examples. Validation and report scoring run under
   training's autocast (bf16 where the CPU has it natively and it measures faster). Differences come
   with paired bootstrap 95% intervals on the same report items (items and runs resampled).
5. The label curve: the pretrained recipe at 100 / 250 / 500 / 1,000 / 2,000 SST-2 labels (the first n
   of each subset plus the selection set, trained for as many steps as 2,000 labels plus the selection set
   are at the frozen epochs; --curve-seeds seeds per subset below 2,000), beside TF-IDF on the same labels
   plus the selection set.
6. GLUE (--sections glue): RTE, MRPC, STS-B, each training set split into 2,000 train / 500 selection;
   SST-2's recipe (less what reads SST-2's own text), its epochs chosen by one seed on the selection
   split, then as in 4, reported once on dev.

Every fine-tuning result (and TF-IDF fit) is cached in WORK/finetunes.json, keyed by the source weights'
checksum and the options, and the pretraining run resumes: a run that is interrupted picks up where it
stopped when started again with the same --work. The JSON is written as each part finishes (SST-2, the
curve, IMDB's pretrained arm against TF-IDF, IMDB's scratch arm, GLUE), its `pending` naming what is left.

    python benchmarks/transfer.py [--pretrain-seconds 2400] [--shape 4x256] [--vocab 8192] [--tapt-epochs 1,2,4] [--books-seconds 0] [--work /tmp/gptn-transfer]
                                  [--seeds 5] [--subsets 2] [--sections sst2,imdb,curve,glue] [--fresh]
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import random
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, machine, table, write_results  # noqa: E402

from gptn.config import GptnError  # noqa: E402
from gptn.data import Corpus, prepare, read_records  # noqa: E402
from gptn.finetune import FinetuneConfig, finetune  # noqa: E402
from gptn.normalize import normalize  # noqa: E402
from gptn.pretrain import PretrainConfig, pretrain  # noqa: E402
from gptn.runtime import autocast, autocast_dtype  # noqa: E402

GLUE = SHARED / "glue"
IMDB = SHARED / "imdb"
GUTENBERG = SHARED / "gutenberg"
N_LABELED, N_SELECT, N_IMDB_REPORT = 2000, 500, 5000
CURVE = (100, 250, 500, 1000, 2000)
SECTIONS = ("sst2", "imdb", "curve", "glue")
ARMS = ("pretrained", "scratch")
VOCAB = 8192  # the BPE tokenizer's size, trained on the pretraining text (--vocab)
SHAPE = "4x256"  # the pretrained model's blocks x width (--shape; lm_config), chosen as protocol point 1 says
CANDIDATE = "candidate.json"  # in each --work: its pretraining and SST-2 selection scores, for --candidates
LM_BATCH, LM_LR, LM_MUON_LR = 16, 3e-3, 0.02
TAPT_LR_SCALE = 1 / 3  # task-adaptive pretraining continues an annealed model: a gentler peak
# Fine-tuning: what is fixed for both arms, and what each arm searches on the selection set: a grid, then
# one change at a time from its best point (REFINE). The pretrained arm's SST-2 grid includes which
# pretraining to start from (IMDB only, or IMDB then SST-2's own unlabeled sentences); the scratch arm has
# no source to choose, so it gets as many grid points as rates instead.
FIXED = dict(batch_size=32)
DEFAULTS = dict(pooling="mean", epochs=3)
RATES = (2.5e-4, 6.25e-4, 1.5e-3)
LAMBDAS = (0.0, 0.5)
SEARCH = {
    ("SST-2", "pretrained"): [dict(source=src, lr=lr, lm_weight=lam) for src in ("imdb", "sst2") for lr in RATES
                              for lam in LAMBDAS],
    ("SST-2", "scratch"): [dict(lr=lr, lm_weight=lam) for lr in (1e-4, *RATES, 3e-3, 6e-3) for lam in LAMBDAS],
    # Long reviews: all windows in every step, one window drawn per review each epoch (all at evaluation), or the tail
    **{("IMDB", init): [dict(long_inputs=li, **({"train_windows": tw} if tw else {}), lm_weight=lam)
                        for li, tw in (("windows", "all"), ("windows", "one"), ("tail", None)) for lam in LAMBDAS]
       for init in ARMS},
}
# Self-training (Yarowsky 1995; Du et al. 2021 with pretrained models): the trial's options, fine-tuned on its labels
# (the teacher), label SST-2's unlabeled training sentences (never the selection set, dev or those labels); the most
# confident SELF_TRAIN share of each predicted class joins the labels and the same options train again from the source.
SELF_TRAIN = 0.5
REFINE = [dict(pooling="extract"), dict(epochs=5), dict(layer_lr_decay=0.8), dict(layer_lr_decay=0.5),
          dict(self_train=SELF_TRAIN)]
SST2_ONLY = ("source", "self_train")  # recipe keys that read SST-2's own unlabeled text: IMDB and GLUE drop them
# Part of every cache key: raised when fine-tuning gives other results for the same options and seed, so that
# cached cells are run again (2: the task model is built once, so its new token rows and head draw other numbers;
# 3: on a CPU the LM loss of λ > 0 is gptn.losses' chunked pass, its gradient rounded to bf16 in another order;
# 4: validation and report scoring under training's autocast; 5: L1's softmax layer reads only the real positions,
# rounding-level changes).
NUMERICS = 5


def lm_config(shape: str) -> dict:
    """--shape "LxD": L blocks of width D in heads of 64 (d_ff 4 x D, derived by GPTConfig), context 128
    (IMDB reviews are long; SST-2's sentences fit in 64), no biases."""
    try:
        n_layer, d_model = (int(x) for x in shape.lower().split("x"))
    except ValueError:
        n_layer = d_model = 0
    if n_layer < 1 or d_model < 64 or d_model % 64:
        raise argparse.ArgumentTypeError(f"blocks x width (the width a multiple of 64), e.g. 4x256, not {shape!r}")
    return dict(n_layer=n_layer, n_head=d_model // 64, d_model=d_model, n_ctx=128, dropout=0.0, bias=False)


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


def sst2_sentences() -> list[dict]:
    """SST-2's whole training sentences, shuffled once (seed 0): the first N_SELECT are the selection
    set, the label subsets are drawn from the rest, and the rest, unlabeled, is the task-adaptive
    pretraining text. Dev is never among them."""
    sst = read_records(GLUE / "SST-2" / "train.tsv")
    whole = full_sentences([r["sentence"].strip() for r in sst])
    random.Random(0).shuffle(whole)
    return [sst[i] for i in whole]


def sst2_unlabeled(work: Path) -> Path:
    """SST-2's whole training sentences outside the selection set, without labels: the task-adaptive pretraining
    text, and self-training's pool (less the labels of the run that reads it)."""
    path = work / "sst2_unlabeled.jsonl"
    if not path.exists():
        _write_jsonl(path, [{"text": r["sentence"].strip()} for r in sst2_sentences()[N_SELECT:]])
    return path


def pretrain_stage(work: Path, lm: dict, vocab: int, seconds: float, books_seconds: float = 0.0, tapt_epochs: tuple = ()) -> dict:
    """Prepare IMDB's unlabeled + train reviews (never test) normalised like SST-2 with a BPE tokenizer of `vocab`
    tokens, pretrain `lm` (lm_config) on them, optionally
    on Gutenberg first and continue on IMDB through init_from; with tapt_epochs, continue the IMDB run on
    SST-2's unlabeled training sentences for each of that many epochs (task-adaptive pretraining, runs of
    their own) and keep the one whose loss on its corpus's held-out sentences is lowest: both sources stay
    for the selection. The time budgets of the first start are written to WORK/plan.json, so an
    interrupted run resumes the same schedule."""
    corpus = work / "imdb-corpus"
    if not (corpus / "manifest.json").exists():
        t0 = time.time()
        prepare([str(IMDB / "unsup.jsonl"), str(IMDB / "train.jsonl")], f"bpe:{vocab}", corpus, val_fraction=0.01,
                normalize="sst", progress=False)
        print(f"IMDB corpus prepared in {time.time() - t0:.0f} s", flush=True)
    stages = []
    if books_seconds > 0:
        books = work / "books-corpus"
        if not (books / "manifest.json").exists():
            prepare([str(GUTENBERG)], str(corpus / "tokenizer"), books, val_fraction=0.02, progress=False)
        stages.append(("books", books, books_seconds))
    stages.append(("imdb", corpus, seconds))
    plan_path = work / "plan.json"
    plan = json.loads(plan_path.read_text()) if plan_path.exists() else {}
    summary, init_from = {}, None
    for name, data, budget in stages:
        if name not in plan:  # the budget of the first start (and its commit), kept for a resumed run
            plan[name] = {"seconds": budget, "commit": machine().get("gptn_commit")}
            plan_path.write_text(json.dumps(plan, indent=1))
        # The clock ends the run: the step count is only a cap, and the cosine decays over the time budget,
        # so the run ends annealed whatever the machine's speed (precision auto: bf16 where it is faster).
        summary[name] = _pretrain(work / f"pretrained-{name}", lm, data, init_from, steps=10 ** 7, warmup_steps=100,
                                  max_seconds=plan[name]["seconds"], started_at=plan[name].get("commit"))
        init_from = summary[name]["run"]
    if tapt_epochs:
        sst = work / "sst2-corpus"
        if not (sst / "manifest.json").exists():
            # never the selection set's sentences: their text seen in pretraining would favour this source there
            prepare([str(sst2_unlabeled(work))], str(corpus / "tokenizer"), sst, val_fraction=0.02, progress=False)
        per_epoch = math.ceil(json.loads((sst / "manifest.json").read_text())["tokens"]["train"] / (LM_BATCH * lm["n_ctx"]))
        runs = {e: _pretrain(work / f"pretrained-sst2-{e}ep", lm, sst, init_from, steps=e * per_epoch,
                             warmup_steps=max(1, e * per_epoch // 10), lr_scale=TAPT_LR_SCALE) for e in tapt_epochs}
        kept = min(runs, key=lambda e: runs[e]["val_loss"])
        # the kept run's figures, but the seconds of all of them: what the stage cost
        summary["sst2"] = {**runs[kept], "epochs": kept, "seconds": sum(r["seconds"] for r in runs.values()),
                           "val_loss_by_epochs": {str(e): r["val_loss"] for e, r in runs.items()}}
    return summary


def _pretrain(run: Path, lm: dict, data: Path, init_from: str | None, steps: int, warmup_steps: int, max_seconds: float | None = None,
              lr_scale: float = 1.0, started_at: str | None = None) -> dict:
    """One pretraining run of `lm` (from init_from's weights, if given; an interrupted run resumes,
    a finished one returns at once), and what it did."""
    pretrain(PretrainConfig(
        corpus=str(data), out=str(run), init_from=init_from, overrides=dict(lm) if not init_from else {},
        steps=steps, batch_tokens=LM_BATCH * lm["n_ctx"], lr=LM_LR * lr_scale, min_lr=LM_LR * lr_scale / 10,
        optimizer="muon", muon_lr=LM_MUON_LR * lr_scale, warmup_steps=warmup_steps, eval_interval=500, eval_batches=40,
        checkpoint_interval=500, max_seconds=max_seconds, progress=False))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    val = [r for r in records if "val_loss" in r]
    state = torch.load(run / "checkpoint" / "train_state.pt", weights_only=False, map_location="cpu")
    tokens = state["step"] * LM_BATCH * lm["n_ctx"]
    return {"run": str(run), "steps": state["step"], "budget": {"seconds": max_seconds} if max_seconds else {"steps": steps},
            "tokens": tokens, "started_at_commit": started_at or machine().get("gptn_commit"),
            "seconds": round(state["train_seconds"]), "tokens_per_s": round(tokens / state["train_seconds"]),
            "val_loss_step0": val[0]["val_loss"], "val_loss": val[-1]["val_loss"], "val_ppl": val[-1]["val_ppl"],
            "val_bpb": val[-1]["val_bpb"],  # bits per byte: comparable across vocabularies, unlike the loss per token
            "lr": LM_LR * lr_scale, "final_lr": [r for r in records if "lr" in r][-1]["lr"], "min_lr": LM_LR * lr_scale / 10,
            "corpus": str(data.name), "d_ff": json.loads((run / "checkpoint" / "config.json").read_text())["d_ff"]}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def verbatim_in(pool: list[str], texts: list[str], steps, whole_texts: bool) -> list[bool]:
    """Which `texts` occur verbatim in the pretraining texts `pool`, both normalised alike: equal to one
    of them (whole reviews), or found inside one (sentences)."""
    pool = [normalize(t, steps) for t in pool]
    mine = [normalize(t, steps) for t in texts]
    if whole_texts:
        seen = set(pool)
        return [t in seen for t in mine]
    joined = "\n".join(pool)
    return [f" {t} " in joined or joined.startswith(t) for t in mine]


def _verbatim_in_pretraining(texts: list[str], steps, whole_reviews: bool) -> list[bool]:
    """verbatim_in the pretraining text: IMDB's unsup + train reviews and SST-2's training sentences."""
    pool = [json.loads(line)["text"] for name in ("unsup.jsonl", "train.jsonl") for line in open(IMDB / name)]
    pool += [r["sentence"].strip() for r in sst2_sentences()]
    return verbatim_in(pool, texts, steps, whole_reviews)


def labeled_sets(work: Path, subsets: int, steps) -> dict:
    """Per task: the selection set, `subsets` label subsets of N_LABELED (disjoint from selection), and the
    report set with what occurs verbatim in the pretraining text removed."""
    cache = work / "report_overlap.json"
    overlap = json.loads(cache.read_text()) if cache.exists() else {}
    sst_rows = [{"text": r["sentence"].strip(), "label": r["label"]} for r in sst2_sentences()]
    imdb_train = [{"text": r["text"], "label": r["label"]} for r in map(json.loads, open(IMDB / "train.jsonl"))]
    imdb_test = [{"text": r["text"], "label": r["label"]} for r in map(json.loads, open(IMDB / "test.jsonl"))]
    random.Random(0).shuffle(imdb_train)
    random.Random(0).shuffle(imdb_test)
    sst_dev = [{"text": r["sentence"].strip(), "label": r["label"]} for r in read_records(GLUE / "SST-2" / "dev.tsv")]
    sets = {}
    for task, pool, report in (("SST-2", sst_rows, sst_dev), ("IMDB", imdb_train, imdb_test[:N_IMDB_REPORT])):
        if task not in overlap:
            overlap[task] = _verbatim_in_pretraining([r["text"] for r in report], steps, task == "IMDB")
            cache.write_text(json.dumps(overlap))
        kept = [r for r, seen in zip(report, overlap[task]) if not seen]
        rest = pool[N_SELECT:]
        name = task.lower().replace("-", "")
        sets[task] = {
            "select": _write_jsonl(work / f"{name}_select.jsonl", pool[:N_SELECT]),
            "subsets": [_write_jsonl(work / f"{name}_train_{k}.jsonl", random.Random(k).sample(rest, N_LABELED))
                        for k in range(subsets)],
            "report": _write_jsonl(work / f"{name}_report.jsonl", kept),
            "report_dropped_verbatim": sum(overlap[task]), "report_size": len(kept)}
    return sets


def glue_sets(work: Path, task: str) -> dict:
    """A GLUE task's training set split (seed 0) into N_LABELED train / N_SELECT selection; dev is the report."""
    rows = read_records(GLUE / task / "train.tsv")
    random.Random(0).shuffle(rows)
    header = "\t".join(rows[0].keys())
    paths = {}
    for part, chunk in (("train", rows[N_SELECT:N_SELECT + N_LABELED]), ("select", rows[:N_SELECT])):
        paths[part] = work / f"{task.lower()}_{part}.tsv"
        paths[part].write_text(header + "\n" + "".join("\t".join(r.values()) + "\n" for r in chunk))
    paths["report"] = GLUE / task / "dev.tsv"
    return paths


def tfidf_baseline(train: list[Path], report: Path, normalize_steps) -> list[int]:
    """TF-IDF (words and bigrams) + logistic regression, C chosen by 5-fold cross-validation on the
    examples of the `train` files: what a practitioner tries first. Per report item: 1 right, 0 wrong."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline

    load = lambda p: [(normalize(r["text"], normalize_steps), str(r["label"])) for r in read_records(p)]  # noqa: E731
    tr = [x for p in train for x in load(p)]
    te = load(report)
    clf = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),
                        LogisticRegressionCV(Cs=[0.3, 1, 3, 10, 30], cv=5, max_iter=2000, scoring="accuracy"))
    clf.fit([t for t, _ in tr], [y for _, y in tr])
    return [int(p == y) for p, (_, y) in zip(clf.predict([t for t, _ in te]), te)]


@torch.no_grad()
def frozen_probe(source: Path, train: Path, report: Path, from_scratch: bool = False) -> float:
    """Logistic regression on the frozen model's h_n averaged over each input (the last context's worth
    of tokens): how much of the task the pretrained features already hold, without fine-tuning."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from gptn.checkpoint import load_model
    from gptn.model import GPT
    model, tokenizer = load_model(source)
    if from_scratch:
        torch.manual_seed(0)
        model = GPT(model.config).eval()

    def features(path):
        rows = read_records(path)
        out = []
        for r in rows:
            ids = tokenizer.encode(r["text"])[-model.config.n_ctx:] or [tokenizer.eot_id]
            out.append(model.hidden_states(torch.tensor([ids]))[0].mean(0).numpy())
        return out, [str(r["label"]) for r in rows]

    (xtr, ytr), (xte, yte) = features(train), features(report)
    clf = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=[0.001, 0.01, 0.1, 1], cv=5, max_iter=3000,
                                                               scoring="accuracy"))
    return float(clf.fit(xtr, ytr).score(xte, yte))


def cached(work: Path, key: dict, compute):
    """compute(), or its result from WORK/finetunes.json under `key` plus the source's weights checksum."""
    path = work / "finetunes.json"
    cache = json.loads(path.read_text()) if path.exists() else {}
    meta = Path(key["source"]) / "checkpoint" / "meta.json"
    weights = json.loads(meta.read_text()).get("weights_sha256") if meta.exists() else None
    key = json.dumps({**key, "weights": weights, "numerics": NUMERICS}, sort_keys=True, default=str)
    if key not in cache:
        cache[key] = compute()
        path.with_suffix(".tmp").write_text(json.dumps(cache))
        path.with_suffix(".tmp").replace(path)
    return cache[key]


def tune(work: Path, source: Path, train: Path, select: Path | None, report: Path | None, **options) -> dict:
    """Fine-tune, keep the epoch that scores best on `select` (without one, the final model), and (with a
    report set) score that checkpoint item by item on `report`. Cached (see `cached`); a run without
    `select` is keyed as keeping the final model, since before 60e1c81 it kept the epoch that scored best
    on its own training examples (an earlier one in 27 of the 97 cached refits)."""
    kept = {} if select is not None else {"kept": "final"}
    return cached(work, {"source": source, "train": train, "select": select, "report": report, **options, **kept},
                  lambda: _tune(work, source, train, select, report, **options))


def with_selection(train: Path, select: Path) -> Path:
    """The refit's training file: the label subset's examples, then the selection set's (one header
    for a TSV)."""
    out = train.with_name(f"{train.stem}+{select.stem}{train.suffix}")
    if not out.exists():
        lines = select.read_text().splitlines(keepends=True)
        out.write_text(train.read_text() + "".join(lines[1:] if train.suffix == ".tsv" else lines))
    return out


def refit(work: Path, source: Path, train: Path, select: Path, report: Path, **options) -> dict:
    """A reported run: the frozen options (epochs: those the search kept) on train + select, scored on
    `report` (what a practitioner does once the choices are made)."""
    return tune(work, source, with_selection(train, select), None, report, **options)


def with_pseudo_labels(work: Path, source: Path, train: Path, select: Path | None, unlabeled: Path, keep: float,
                       **options) -> tuple[Path, dict]:
    """Self-training's training file: `train`, then the most confident `keep` share of each class that the teacher
    (`options` fine-tuned on `train`, its epoch kept as `tune` keeps it) predicts for the `unlabeled` texts not in
    `train`; and what the teacher did."""
    from gptn.finetune import example_from_texts
    out = work / "teacher"
    shutil.rmtree(out, ignore_errors=True)
    r = finetune(FinetuneConfig(run=str(source), out=str(out), train=str(train), val=select and str(select),
                                progress=False, **options))
    labeled = read_records(train)
    seen = {x["text"] for x in labeled}
    pool = [x["text"] for x in read_records(unlabeled) if x["text"] not in seen]
    spec, preds, probs = predictions(out, options, lambda spec: [example_from_texts(spec, t) for t in pool])
    shutil.rmtree(out, ignore_errors=True)
    rows = []
    for label in spec.labels:
        mine = sorted((i for i, p in enumerate(preds) if p == label), key=lambda i: -max(probs[i]))
        rows += [{"text": pool[i], "label": label} for i in mine[:int(len(mine) * keep)]]
    teacher = {"select": r["best"]["value"], "epoch": r["best"]["epoch"], "pool": len(pool), "added": len(rows)}
    return _write_jsonl(work / "self_training.jsonl", labeled + rows), teacher


def predictions(run: Path, options: dict, examples_of) -> tuple:
    """The fine-tuned `run`'s task spec, predictions and probabilities for examples_of(spec), scored under
    training's autocast, as its validation was."""
    from gptn.finetune import load_task_model, run_task_model
    model, tokenizer = load_task_model(run, "cuda" if options.get("device") == "cuda" else "cpu")
    with autocast(options.get("precision", "auto"), next(model.parameters()).device, model.gpt.config.d_model):
        preds, probs = run_task_model(model, tokenizer, examples_of(model.spec), batch_size=64)
    return model.spec, preds, probs


def _tune(work: Path, source: Path, train: Path, select: Path | None, report: Path | None, self_train: float = 0,
          unlabeled: Path | None = None, **options) -> dict:
    from gptn.finetune import compute_metrics
    from gptn.tasks import read_task_file
    out = work / "ft"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    teacher = None
    if self_train:
        train, teacher = with_pseudo_labels(work, source, train, select, unlabeled, self_train, **options)
    r = finetune(FinetuneConfig(run=str(source), out=str(out), train=str(train), val=select and str(select),
                                progress=False, **options))
    result = {"metric": r["metric"], "select": r["best"]["value"], "epoch": r["best"]["epoch"],
              **({"teacher": teacher} if teacher else {})}
    if report is not None:
        examples = read_task_file(report, r["task"]).examples
        spec, preds, _ = predictions(out, options, lambda spec: examples)
        result["value"] = compute_metrics(spec, preds, [x.label for x in examples])[r["metric"]]
        if not spec.regression:  # per item, for the paired bootstrap
            result["correct"] = [int(p == x.label) for p, x in zip(preds, examples)]
    result["seconds"] = round(time.time() - t0, 1)
    shutil.rmtree(out, ignore_errors=True)
    print(f"  {json.dumps(options, sort_keys=True)}: "
          + (f"select {result['select']:.4f} (epoch {result['epoch']})" if select else f"{result['epoch']} epochs")
          + (f", report {result['value']:.4f}" if "value" in result else "") + f", {result['seconds']:.0f} s", flush=True)
    return result


def bootstrap_difference(a: list[list[int]], b: list[list[int]], resamples: int = 10_000, seed: int = 0) -> dict:
    """Mean accuracy of runs `a` minus runs `b` on the same report items (points), with a paired
    bootstrap 95% interval: each resample draws the report items, and the runs of each side, with
    replacement, so both the item sample and the seed-to-seed spread are in the interval."""
    A, B = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    n = A.shape[1]
    diffs = []
    for start in range(0, resamples, 500):
        k = min(500, resamples - start)
        wa = np.stack([np.bincount(rng.integers(0, len(A), len(A)), minlength=len(A)) for _ in range(k)]) / len(A)
        wb = np.stack([np.bincount(rng.integers(0, len(B), len(B)), minlength=len(B)) for _ in range(k)]) / len(B)
        per_item = wa @ A - wb @ B  # (k, n): each resample's run-averaged difference per item
        items = rng.integers(0, n, (k, n))
        diffs.append(np.take_along_axis(per_item, items, axis=1).mean(1))
    diffs = np.concatenate(diffs)
    return {"points": round(100 * float(A.mean() - B.mean()), 2),
            "ci95": [round(100 * float(np.percentile(diffs, 2.5)), 2), round(100 * float(np.percentile(diffs, 97.5)), 2)]}


def summary(runs: list[dict]) -> dict:
    values = [r["value"] for r in runs]
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "values": values, "epochs": runs[0]["epoch"], "seconds": sum(r["seconds"] for r in runs)}


def epoch_counts(text: str) -> tuple[int, ...]:
    """--tapt-epochs: a comma list of epoch counts (0 or nothing: no task-adaptive stage)."""
    try:
        counts = {int(x) for x in text.split(",") if x.strip()} - {0}
    except ValueError:
        counts = {-1}
    if min(counts, default=1) < 1:
        raise argparse.ArgumentTypeError(f"a comma list of epoch counts >= 1 (0: none), not {text!r}")
    return tuple(sorted(counts))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/gptn-transfer")
    ap.add_argument("--pretrain-seconds", type=float, default=2400, help="IMDB pretraining budget (default 40 min)")
    ap.add_argument("--shape", default=SHAPE, type=lm_config,
                    help=f"the pretrained model: blocks x width, in heads of 64 (default {SHAPE})")
    ap.add_argument("--vocab", type=int, default=VOCAB, help=f"BPE tokens (default {VOCAB})")
    ap.add_argument("--candidates", default="", metavar="WORK[,WORK]",
                    help="the --work folders of runs of another --shape, --vocab or --books-seconds (their SST-2 "
                         "search done): the JSON's pretraining_selection compares them with this run on the selection set")
    ap.add_argument("--tapt-epochs", type=epoch_counts, default="1,2,4",
                    help="then continue on SST-2's unlabeled training sentences for each of these many epochs, keeping "
                         "the run with the lowest loss on their held-out sentences (default 1,2,4; 0: none)")
    ap.add_argument("--books-seconds", type=float, default=0.0,
                    help="pretrain on Gutenberg this long first, then on IMDB from it (--init-from)")
    ap.add_argument("--fresh", action="store_true", help="delete --work first (default: resume what it holds)")
    ap.add_argument("--seeds", type=int, default=5, help="seeds per label subset of every reported cell")
    ap.add_argument("--subsets", type=int, default=2, help="label subsets per reported cell")
    ap.add_argument("--curve-seeds", type=int, help="seeds per label subset of the curve's points below 2,000 labels "
                                                   "(default --seeds; the 2,000 point is the headline cell)")
    ap.add_argument("--sections", default="sst2,imdb,curve", help=f"of {','.join(SECTIONS)} (curve needs sst2)")
    args = ap.parse_args()
    sections = [x for x in args.sections.split(",") if x]
    if set(sections) - set(SECTIONS) or ("curve" in sections and "sst2" not in sections) or min(args.seeds, args.subsets) < 1:
        ap.error(f"--sections: a comma list of {', '.join(SECTIONS)} (curve needs sst2); --seeds, --subsets >= 1")
    candidates = [Path(w) / CANDIDATE for w in args.candidates.split(",") if w]
    if missing := [str(c.parent) for c in candidates if not c.exists()]:
        ap.error(f"--candidates: no finished SST-2 search in {', '.join(missing)} (its {CANDIDATE})")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    warnings.filterwarnings("ignore", category=FutureWarning, module="sklearn")  # its 1.10 / 1.11 default changes
    work = Path(args.work)
    t_all, started_on = time.time(), machine()  # the commit the run started from, before any later edit
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    manifest = work / "imdb-corpus" / "manifest.json"
    if manifest.exists() and (have := json.loads(manifest.read_text())["tokenizer"]["vocab_size"]) != args.vocab:
        ap.error(f"--vocab {args.vocab}: {work} holds a corpus of {have} tokens (another --work, or --fresh)")
    config = work / "pretrained-imdb" / "checkpoint" / "config.json"
    lm, shape = args.shape, "{n_layer}x{d_model}".format(**args.shape)
    if config.exists() and (have := "{n_layer}x{d_model}".format(**json.loads(config.read_text()))) != shape:
        ap.error(f"--shape {shape}: {work} holds a {have} model (another --work, or --fresh)")
    plan = work / "plan.json"  # pretrain_stage's: each stage's budget
    if plan.exists() and (have := json.loads(plan.read_text()).get("books", {}).get("seconds", 0)) != args.books_seconds:
        ap.error(f"--books-seconds {args.books_seconds:g}: {work} was pretrained with {have:g} (another --work, or --fresh)")
    starts_path = work / "starts.json"  # every start of this run: the cached cells of one may be another's
    starts = json.loads(starts_path.read_text()) if starts_path.exists() else []
    starts.append({"commit": started_on.get("gptn_commit"), "command": " ".join(sys.argv[1:]),
                   "time": time.strftime("%Y-%m-%d %H:%M:%S")})
    starts_path.write_text(json.dumps(starts, indent=1))
    try:
        pre = pretrain_stage(work, lm, args.vocab, args.pretrain_seconds, args.books_seconds, args.tapt_epochs)
    except GptnError as e:  # gptn's own one-line refusals (e.g. a --vocab no BPE can have)
        ap.error(str(e))
    sources = {name: Path(pre[name]["run"]) for name in ("imdb", "sst2") if name in pre}
    print("pretraining: " + json.dumps(pre), flush=True)
    t_ft = time.time()
    steps = Corpus(work / "imdb-corpus").tokenizer.normalize
    sets = labeled_sets(work, args.subsets, steps)
    runs_of = [(seed, k) for k in range(args.subsets) for seed in range(1, args.seeds + 1)]
    curve_runs = [(seed, k) for k in range(args.subsets) for seed in range(1, (args.curve_seeds or args.seeds) + 1)]
    results, recipes, refit_epochs, searches, cells, bow = {}, {}, {}, {}, {}, {}

    def arm(init: str, recipe: dict, change: dict) -> tuple[Path, dict]:
        """An arm's source run (the scratch arm reads only the shape from IMDB's) and fine-tuning options."""
        options = {**FIXED, **DEFAULTS, **recipe, **change}
        source = sources[options.pop("source", "imdb") if init == "pretrained" else "imdb"]
        if options.get("self_train"):
            options["unlabeled"] = sst2_unlabeled(work)
        return source, {**options, "from_scratch": init == "scratch"}

    def run(init: str, recipe: dict, train: Path, select: Path, report: Path | None, seed: int, **change) -> dict:
        source, options = arm(init, recipe, change)
        return tune(work, source, train, select, report, seed=seed, **options)

    def reported(init: str, recipe: dict, train: Path, select: Path, report: Path, seed: int, epochs: int) -> dict:
        source, options = arm(init, recipe, {"epochs": epochs})
        return refit(work, source, train, select, report, seed=seed, **options)

    def search(task: str, base: dict, arms: tuple = ARMS) -> None:
        """Each arm's grid, then REFINE's changes one at a time from its best point: one seed on subset 0,
        scored on the selection set; the best of everything tried is frozen as the arm's recipe, and the epoch
        that trial kept as the epochs of its reported runs."""
        s = sets[task]
        for init in arms:
            print(f"{task}, {init}: search on the selection set", flush=True)

            def trial(point: dict) -> dict:
                scored = run(init, point, s["subsets"][0], s["select"], None, seed=1)
                return {"options": point, **{k: scored[k] for k in ("select", "epoch", "seconds")}}

            grid = [point for point in SEARCH[(task, init)] if sources.get(point.get("source", "imdb"))]
            tried = [trial({**base.get(init, {}), **point}) for point in grid]
            best = max(tried, key=lambda t: t["select"])["options"]
            tried += [trial({**best, **change}) for change in REFINE if task == "SST-2"]
            searches[f"{task}: {init}"] = tried
            best = max(tried, key=lambda t: t["select"])
            recipes[f"{task}: {init}"], refit_epochs[f"{task}: {init}"] = best["options"], best["epoch"]

    def labels(task: str, k: int, n: int) -> Path:
        """The first n examples of label subset k: what the model and TF-IDF both learn from."""
        full = sets[task]["subsets"][k]
        return full if n == N_LABELED else _write_jsonl(full.with_name(f"{full.stem}_n{n}.jsonl"), read_records(full)[:n])

    def report(task: str, init: str, n: int = N_LABELED, runs: list | None = None) -> list[dict]:
        s, recipe = sets[task], recipes[f"{task}: {init}"]
        # as many optimizer steps as at 2,000 labels: a reported run trains on its labels plus the selection set
        epochs = max(1, round(refit_epochs[f"{task}: {init}"] * (N_LABELED + N_SELECT) / (n + N_SELECT)))
        runs = runs or runs_of
        print(f"{task}, {init}, {n} labels: {len(runs)} runs of {json.dumps(recipe)}", flush=True)
        return [reported(init, recipe, labels(task, k, n), s["select"], s["report"], seed, epochs=epochs)
                for seed, k in runs]

    def probe_source(task: str) -> Path:
        """The pretrained run the frozen probe reads: the one the task's pretrained recipe starts from."""
        return sources[recipes[f"{task}: pretrained"].get("source", "imdb")]

    def tfidf(task: str, n: int = N_LABELED) -> list[list[int]]:
        s = sets[task]
        return [cached(work, {"name": "tfidf", "source": sources["imdb"], "train": labels(task, k, n)},
                       lambda: tfidf_baseline([labels(task, k, n), s["select"]], s["report"], steps))
                for k in range(args.subsets)]

    def compute_seconds() -> dict:
        """What the finished parts cost from an empty --work, whichever start ran each cell (the
        *_seconds above time this start only): pretraining, the searches' trials, the reported runs."""
        out = {"pretraining": sum(p["seconds"] for p in pre.values()),
               "search": round(sum(t["seconds"] for tried in searches.values() for t in tried)),
               "reported": round(sum(r["seconds"] for runs in cells.values() for r in runs)),
               "curve_below_2000": round(sum(c["pretrained"]["seconds"] for n, c in results.get("label_curve", {}).items()
                                             if int(n) != N_LABELED))}
        return {**out, "total": sum(out.values())}

    def write(pending: list[str]) -> None:
        """transfer.json with every cell finished so far; `pending` names what this run has still to do."""
        results.update({
            "tfidf_logreg": {task: {"mean": float(np.mean(v)), "per_subset": [float(np.mean(x)) for x in v]}
                             for task, v in bow.items()},
            "cells": {f"{task}: {init}": summary(runs) for (task, init), runs in cells.items()},
            "recipes": recipes, "refit_epochs": refit_epochs, "scratch_search": {k: v for k, v in searches.items() if "scratch" in k},
            "pretrained_search": {k: v for k, v in searches.items() if "pretrained" in k}, "fixed": FIXED,
            "defaults_before_refine": DEFAULTS, "refine": REFINE,
            "frozen_probe": {task: cached(work, {"name": "probe", "source": probe_source(task), "train": sets[task]["subsets"][0]},
                                          lambda: frozen_probe(probe_source(task), sets[task]["subsets"][0], sets[task]["report"]))
                             for task in bow},
            "report_sets": {task: {"items": sets[task]["report_size"], "dropped_verbatim_in_pretraining":
                                   sets[task]["report_dropped_verbatim"]} for task in ("SST-2", "IMDB")},
            "pretraining": {**pre, "shape": shape, "model": lm, "batch_tokens": LM_BATCH * lm["n_ctx"],
                            "optimizer": "muon", "precision": str(autocast_dtype("auto", torch.device("cpu"), lm["d_model"]) or "fp32"),
                            "corpus": "IMDB unsup + train reviews (never test), normalised like SST-2 (html, lower, punct)",
                            "tokenizer": f"bpe:{args.vocab}"},
            "protocol": __doc__.split("The protocol (also written into the JSON's `protocol`):", 1)[1].split("Every fine-tuning")[0].strip(),
            "search_grid": {f"{task}: {init}": grid for (task, init), grid in SEARCH.items()}, "seeds": args.seeds,
            "curve_seeds": args.curve_seeds or args.seeds, "subsets": args.subsets, "sections": sections,
            "pending": pending, "command": " ".join(["python", *sys.argv]), "starts": starts,
            "finetune_seconds": round(time.time() - t_ft), "total_seconds": round(time.time() - t_all),
            "compute_seconds": compute_seconds(), "machine": started_on})
        print(f"\nwrote {write_results('transfer', results)} ({time.time() - t_all:.0f} s)"
              + (f"; still to run: {', '.join(pending)}" if pending else ""), flush=True)

    # In the order of what the targets read, the JSON written after each: SST-2, its label curve, IMDB's
    # pretrained arm against TF-IDF, IMDB's scratch arm (an IMDB run costs ~20 SST-2 runs), GLUE.
    todo = [step for step, section in (("SST-2", "sst2"), ("curve", "curve"), ("IMDB: pretrained", "imdb"),
                                       ("IMDB: scratch", "imdb"), ("GLUE", "glue")) if section in sections]

    def done(step: str) -> None:
        todo.remove(step)
        write(todo)

    def compare(task: str, prefix: str, *against: str) -> None:
        """The task's table, and the paired differences pretrained - each of `against` ("bow": TF-IDF, "scratch")."""
        print(f"\n{task}, {N_LABELED:,} labels, {len(runs_of)} runs per arm ({args.seeds} seeds x {args.subsets} label "
              f"subsets), reported on {sets[task]['report_size']:,} items")
        print(table([(init, f"{100 * summary(cells[(task, init)])['mean']:.1f}", f"{100 * summary(cells[(task, init)])['sd']:.1f}",
                      f"{json.dumps(recipes[f'{task}: {init}'])}, trained {refit_epochs[f'{task}: {init}']} epochs")
                     for init in ARMS if (task, init) in cells]
                    + [("TF-IDF + LR", f"{100 * np.mean(bow[task]):.1f}", "", "C by 5-fold CV")],
                    ("arm", "accuracy %", "sd", "recipe (chosen on the selection set)")))
        pre_c = [r["correct"] for r in cells[(task, "pretrained")]]
        for other in against:
            diff = bootstrap_difference(pre_c, bow[task] if other == "bow" else [r["correct"] for r in cells[(task, other)]])
            results[f"{prefix}pretrained_minus_{other}"], results[f"{prefix}pretrained_minus_{other}_ci95"] = diff["points"], diff["ci95"]
            print(f"pretrained - {'TF-IDF' if other == 'bow' else other} {diff['points']:+.2f} points {diff['ci95']}", flush=True)

    def candidate() -> dict:
        """This run's pretraining (shape, vocabulary, corpus) and what its arms' best trials scored on SST-2's
        selection set: WORK/CANDIDATE, what another run's --candidates reads."""
        return {"shape": shape, "vocab": args.vocab, "books_seconds": args.books_seconds, "work": str(work), "pretrained_at": starts[0]["commit"],
                "pretrain_seconds": sum(pre[stage]["budget"]["seconds"] for stage in ("books", "imdb") if stage in pre),
                **{k: pre["imdb"][k] for k in ("tokens", "tokens_per_s", "val_loss", "val_bpb")},
                "tapt_val_loss": pre.get("sst2", {}).get("val_loss"),
                **{f"select_{init}": max(t["select"] for t in searches[f"SST-2: {init}"]) for init in ARMS}}

    if "sst2" in sections:
        search("SST-2", {})
        this = candidate()
        (work / CANDIDATE).write_text(json.dumps(this, indent=1))
        if candidates:
            trials = [json.loads(c.read_text()) for c in candidates] + [this]
            results["pretraining_selection"] = {
                "chosen_by": "the pretrained arm's best SST-2 selection-set accuracy, each candidate pretrained "
                             "for the same wall clock (--books-seconds + --pretrain-seconds)", "candidates": trials}
            print(table([(t["shape"], t["vocab"], f"{t['books_seconds']:g}", f"{t['tokens'] / 1e6:.1f}M", f"{t['val_bpb']:.3f}",
                          f"{t['select_pretrained']:.3f}", f"{t['select_scratch']:.3f}" if t["select_scratch"] else "not run") for t in trials],
                        ("shape", "vocab", "books s", "tokens", "val bits/byte", "select pretrained", "select scratch")), flush=True)
            best = max(trials, key=lambda t: t["select_pretrained"])
            if best["select_pretrained"] > this["select_pretrained"]:
                print(f"note: {best['work']} ({best['shape']}, vocab {best['vocab']}, books {best['books_seconds']} s) "
                      f"scored higher on the selection set than this run")
        for init in ARMS:
            cells[("SST-2", init)] = report("SST-2", init)
        bow["SST-2"] = tfidf("SST-2")
        compare("SST-2", "", "bow", "scratch")
        done("SST-2")

    if "curve" in sections:
        curve = {}
        for n in CURVE:
            runs = cells[("SST-2", "pretrained")] if n == N_LABELED else report("SST-2", "pretrained", n, curve_runs)
            diff = bootstrap_difference([r["correct"] for r in runs], tfidf("SST-2", n))
            curve[str(n)] = {"pretrained": summary(runs), "tfidf": float(np.mean(tfidf("SST-2", n))), **diff}
        results["label_curve_vs_bow"] = {n: c["points"] for n, c in curve.items()}
        results["label_curve"] = curve
        print("\nSST-2, pretrained - TF-IDF by labels: "
              + ", ".join(f"{n}: {c['points']:+.1f} {c['ci95']}" for n, c in curve.items()))
        done("curve")

    if "imdb" in sections:
        if "SST-2: pretrained" not in recipes:
            search("SST-2", {})
        # IMDB starts from SST-2's recipe of each arm (all but λ and what reads SST-2's own text) and searches the rest;
        # the pretrained arm first, so that its comparison with TF-IDF is written before the scratch arm's search
        base = {init: {k: v for k, v in recipes[f"SST-2: {init}"].items() if k not in (*SST2_ONLY, "lm_weight")}
                for init in ARMS}
        search("IMDB", base, ("pretrained",))
        cells[("IMDB", "pretrained")] = report("IMDB", "pretrained")
        bow["IMDB"] = tfidf("IMDB")
        compare("IMDB", "imdb_", "bow")
        done("IMDB: pretrained")
        search("IMDB", base, ("scratch",))
        cells[("IMDB", "scratch")] = report("IMDB", "scratch")
        compare("IMDB", "imdb_", "bow", "scratch")
        done("IMDB: scratch")

    if "glue" in sections:
        glue = {}
        for task in ("RTE", "MRPC", "STS-B"):
            paths = glue_sets(work, task)
            for init in ARMS:
                recipe = {k: v for k, v in (recipes.get(f"SST-2: {init}") or SEARCH[("SST-2", init)][0]).items()
                          if k not in SST2_ONLY}  # SST-2's unlabeled text is not GLUE's
                kept = run(init, recipe, paths["train"], paths["select"], None, seed=1)["epoch"]  # epochs: GLUE's own
                runs = [reported(init, recipe, paths["train"], paths["select"], paths["report"], seed, kept)
                        for seed in range(1, args.seeds + 1)]
                glue[f"{task}: {init}"] = {"metric": runs[0]["metric"], **summary(runs)}
        results["glue"] = glue
        print("\nGLUE (2,000 train, 500 selection, dev): " + ", ".join(f"{k} {v['metric']} {v['mean']:.3f}" for k, v in glue.items()))
        done("GLUE")

if __name__ == "__main__":
    main()
