"""Does pretraining transfer? GPT-1's ablation (Table 5), small, on real corpora, on a CPU.

1. Pretrain a 4 x 256 GPT (context 128, Muon) for --pretrain-seconds (default 45 min) on IMDB's
   unlabeled + train reviews (never test: 23.5M tokens), normalised like SST-2 (`gptn prepare
   --normalize sst`: `<br />` out, lower case, Penn Treebank punctuation); four weight snapshots on
   the way give the gain as a function of pretraining tokens. --books-seconds N pretrains on
   Gutenberg first and continues on IMDB from it (`init_from`), GPT-1's books-then-domain order.
2. Fine-tune on 2,000 labels, from the pretrained weights and from a random initialisation of the
   same shape, with and without the auxiliary LM loss (λ = 0.5 / 0), 3 seeds each: SST-2 whole
   sentences (reported on all 872 dev sentences) and IMDB train reviews (reported on a fixed 5,000 of
   IMDB's test reviews). The epoch kept is the best on 500 labeled examples held out of the training
   data, never on what is reported. Each arm runs its own best recipe (RECIPES, and the one-seed
   probes that chose it in the comment above it).
3. In the same run: TF-IDF + logistic regression on the same 2,000 labels (what a practitioner tries
   first), and logistic regression on the frozen model's mean-pooled features (a floor for fine-tuning).
4. The label curve: SST-2 with 250 / 500 / 1,000 / 2,000 labels, pretrained vs scratch, 3 seeds
   (the seed picks the subset), epochs scaled to the same number of optimizer steps.
5. GPT-1's table: rows pretrained / scratch x aux / no aux; columns SST-2, IMDB, RTE, MRPC F1, STS-B r
   (GLUE: 2,000 training examples, one seed, dev).

Writes benchmarks/results/transfer.json: `pretrained_minus_scratch` (SST-2, best λ of each arm,
points), `pretrained_minus_bow`, `imdb_pretrained_minus_scratch`, `gain_vs_pretraining_tokens`,
`label_curve`, `ablation`.

Every fine-tuning result is kept in WORK/finetunes.json (keyed by the source weights' checksum and the
options), so `--reuse` after an interrupted run, or `--sections` one part at a time, redoes nothing.

    python benchmarks/transfer.py [--pretrain-seconds 2700] [--books-seconds 0] [--reuse] [--work /tmp/gptn-transfer]
                                  [--seeds 3] [--imdb-seeds 3] [--curve-seeds 3] [--sections sst2,imdb,curve,tokens,glue]
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED, machine, seconds_per_step, table, write_results  # noqa: E402

from gptn.config import GPTConfig  # noqa: E402
from gptn.data import Corpus, prepare, read_records  # noqa: E402
from gptn.finetune import FinetuneConfig, finetune  # noqa: E402
from gptn.pretrain import PretrainConfig, pretrain  # noqa: E402

GLUE = SHARED / "glue"
N_LABELED = 2000


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


IMDB = SHARED / "imdb"
GUTENBERG = SHARED / "gutenberg"
# 4 x 256, context 128 (IMDB reviews are long; SST-2's sentences fit in 64), no biases: ~2.8k tokens/s
# on two EPYC cores with Muon, so 45 minutes see ~7.5M tokens, a third of IMDB's unlabeled + train text.
LM = dict(n_layer=4, n_head=4, d_model=256, n_ctx=128, dropout=0.0, bias=False)
LM_BATCH, LM_LR, LM_MUON_LR = 16, 3e-3, 0.02


def pretrain_stage(work: Path, seconds: float, books_seconds: float = 0.0, snapshots: int = 4,
                   steps: int | None = None) -> dict:
    """Prepare IMDB's unlabeled + train reviews (never test) normalised like SST-2, optionally pretrain
    on Gutenberg first and continue on IMDB through init_from; keeps `snapshots` weight snapshots for
    the gain-vs-tokens curve. `steps` pins the IMDB stage's length (reproduces an earlier run whatever
    else the machine is doing) instead of estimating it from `seconds`. Skips whatever is already in `work`."""
    corpus = work / "imdb-corpus"
    if not (corpus / "manifest.json").exists():
        t0 = time.time()
        prepare([str(IMDB / "unsup.jsonl"), str(IMDB / "train.jsonl")], "bpe:8192", corpus, val_fraction=0.01,
                normalize="sst", progress=False)
        print(f"IMDB corpus prepared in {time.time() - t0:.0f} s", flush=True)
    stages = []
    init_from = None
    if books_seconds > 0:
        books = work / "books-corpus"
        if not (books / "manifest.json").exists():
            prepare([str(GUTENBERG)], str(corpus / "tokenizer"), books, val_fraction=0.02, progress=False)
        stages.append(("books", books, books_seconds))
    stages.append(("imdb", corpus, seconds))
    summary = {}
    for name, data, budget in stages:
        run = work / f"pretrained-{name}"
        if not (run / "checkpoint").is_dir():
            config = GPTConfig(vocab_size=Corpus(data).tokenizer.vocab_size, **LM)
            pinned = steps if name == "imdb" else None
            n_steps = pinned or int(budget / seconds_per_step(config, LM_BATCH, "muon"))
            pretrain(PretrainConfig(
                corpus=str(data), out=str(run), init_from=init_from, overrides=dict(LM) if not init_from else {},
                steps=n_steps, batch_tokens=LM_BATCH * LM["n_ctx"], lr=LM_LR, min_lr=LM_LR / 10, optimizer="muon",
                muon_lr=LM_MUON_LR, warmup_steps=100, eval_interval=max(1, n_steps // 8), eval_batches=40,
                checkpoint_interval=max(1, n_steps // 8),
                snapshot_interval=max(1, n_steps // snapshots) if name == "imdb" else None,
                max_seconds=None if pinned else budget * 1.1, progress=False))
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
        train = [r for r in records if "loss" in r]
        val = [r for r in records if "val_loss" in r]
        summary[name] = {"steps": train[-1]["step"], "tokens": train[-1]["tokens"], "seconds": round(train[-1]["time"]),
                         "tokens_per_s": round(train[-1]["tokens"] / train[-1]["time"]), "val_loss": val[-1]["val_loss"],
                         "val_ppl": val[-1]["val_ppl"], "corpus": str(data.name)}
        init_from = str(run)
    return summary


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def labeled_sets(work: Path) -> dict:
    """Train (2,000) / selection (500) / report sets: SST-2 whole sentences (report: all 872 dev
    sentences) and IMDB train reviews (report: a fixed 5,000 of IMDB's test reviews)."""
    sst = read_records(GLUE / "SST-2" / "train.tsv")
    whole = full_sentences([r["sentence"].strip() for r in sst])
    random.Random(0).shuffle(whole)
    rows = lambda idx: [{"text": sst[i]["sentence"].strip(), "label": sst[i]["label"]} for i in idx]  # noqa: E731
    imdb_train = [json.loads(line) for line in open(IMDB / "train.jsonl")]
    imdb_test = [json.loads(line) for line in open(IMDB / "test.jsonl")]
    random.Random(0).shuffle(imdb_train)
    random.Random(0).shuffle(imdb_test)
    review = lambda rs: [{"text": r["text"], "label": r["label"]} for r in rs]  # noqa: E731
    dev = [{"text": r["sentence"].strip(), "label": r["label"]} for r in read_records(GLUE / "SST-2" / "dev.tsv")]
    return {
        "SST-2": {"train": _write_jsonl(work / "sst2_train.jsonl", rows(whole[:N_LABELED])),
                  "select": _write_jsonl(work / "sst2_select.jsonl", rows(whole[N_LABELED:N_LABELED + 500])),
                  "report": _write_jsonl(work / "sst2_dev.jsonl", dev)},
        "IMDB": {"train": _write_jsonl(work / "imdb_train.jsonl", review(imdb_train[:N_LABELED])),
                 "select": _write_jsonl(work / "imdb_select.jsonl", review(imdb_train[N_LABELED:N_LABELED + 500])),
                 "report": _write_jsonl(work / "imdb_test5000.jsonl", review(imdb_test[:5000]))},
    }


def tfidf_baseline(train: Path, report: Path, normalize_steps) -> float:
    """TF-IDF (words and bigrams) + logistic regression, C chosen by 5-fold cross-validation on the
    training set: what a practitioner tries first."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline

    from gptn.normalize import normalize
    load = lambda p: [(normalize(r["text"], normalize_steps), str(r["label"])) for r in read_records(p)]  # noqa: E731
    tr, te = load(train), load(report)
    clf = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),
                        LogisticRegressionCV(Cs=[0.3, 1, 3, 10, 30], cv=5, max_iter=2000))
    clf.fit([t for t, _ in tr], [y for _, y in tr])
    return float(clf.score([t for t, _ in te], [y for _, y in te]))


@torch.no_grad()
def frozen_probe(source: Path, train: Path, report: Path, from_scratch: bool = False) -> float:
    """Logistic regression on the frozen model's h_n averaged over each input (the fine-tuned model
    should end at or above it): how much of the task the pretrained features already hold."""
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
    clf = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=[0.001, 0.01, 0.1, 1], cv=5, max_iter=3000))
    return float(clf.fit(xtr, ytr).score(xte, yte))


def tune(work: Path, name: str, source: Path, train: Path, select: Path, report: Path | None, **options) -> dict:
    """Fine-tune, keep the epoch that scores best on `select`, and report that checkpoint on `report`.
    Results are kept in WORK/finetunes.json, keyed by the source's weights and the options, so a run
    cut short (or one section at a time) picks up where it stopped."""
    return cached(work, {"name": name, "source": source, "train": train, **options},
                  lambda: _tune(work, name, source, train, select, report, **options))


def cached(work: Path, key: dict, compute):
    """compute(), or its result from WORK/finetunes.json under `key` plus the source's weights checksum."""
    path = work / "finetunes.json"
    cache = json.loads(path.read_text()) if path.exists() else {}
    meta = Path(key["source"]) / "checkpoint" / "meta.json"
    weights = json.loads(meta.read_text()).get("weights_sha256") if meta.exists() else None
    key = json.dumps({**key, "weights": weights}, sort_keys=True, default=str)
    if key not in cache:
        cache[key] = compute()
        path.with_suffix(".tmp").write_text(json.dumps(cache, indent=1))
        path.with_suffix(".tmp").replace(path)
    return cache[key]


def _tune(work: Path, name: str, source: Path, train: Path, select: Path, report: Path | None, **options) -> dict:
    from gptn.finetune import evaluate_task, load_task_model
    from gptn.tasks import read_task_file
    out = work / "ft" / name
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    r = finetune(FinetuneConfig(run=str(source), out=str(out), train=str(train), val=str(select), progress=False,
                                **options))
    result = {"metric": r["metric"], "select": r["best"]["value"], "epoch": r["best"]["epoch"]}
    if report is not None:
        model, tokenizer = load_task_model(out)
        metrics = evaluate_task(model, tokenizer, read_task_file(report, r["task"]).examples, batch_size=64)
        result.update(value=metrics[r["metric"]], metrics={k: round(v, 4) for k, v in metrics.items()})
    else:
        result.update(value=r["best"]["value"], metrics=r["best"]["metrics"])
    result["seconds"] = round(time.time() - t0, 1)
    shutil.rmtree(out, ignore_errors=True)  # keeps /tmp small: dozens of runs
    print(f"  {name}: {result['metric']} {result['value']:.4f} (select {result['select']:.4f}, "
          f"epoch {result['epoch']}, {result['seconds']:.0f} s)", flush=True)
    return result


def mean_se(values: list[float]) -> dict:
    m = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return {"mean": m, "se": se, "values": values}


# Fine-tuning recipes, one per arm. One-seed probes on SST-2 (2,000 whole sentences, 7.5M tokens of
# pretraining, dev accuracy): pretrained, AdamW 6.25e-4, mean pooling λ 0.5 77.6% / extract token
# 77.9% / Muon fine-tuning 77.5% (10x GPT-1's 6.25e-5: Muon pretraining leaves weights 7-20x the
# init's RMS, so GPT-1's rate barely moves them); scratch: mean pooling λ 0 71.2%. Mean pooling for
# both: one recipe, within a seed's noise of the best of each.
RECIPES = {
    "pretrained": dict(pooling="mean", lr=6.25e-4),
    "scratch": dict(pooling="mean", lr=6.25e-4),
}
LAMBDAS = {"aux": 0.5, "no aux": 0.0}


SECTIONS = ("sst2", "imdb", "curve", "tokens", "glue")


def earlier_results(pre: dict, sections: list[str]) -> dict:
    """results/transfer.json, for --merge. Measured on the same pretrained weights (same steps, tokens
    and validation loss), every cell it holds is kept; on other weights (the same recipe rerun: BPE
    training and CPU threads do not reproduce bit for bit), only whole sections this run does not redo,
    recorded as carried over with that pretraining's figures."""
    from common import RESULTS
    path = RESULTS / "transfer.json"
    if not path.exists():
        sys.exit(f"--merge: {path} does not exist")
    old = json.loads(path.read_text())
    mine, theirs = pre["imdb"], old.get("pretraining", {}).get("imdb", {})
    if any(mine[k] != theirs.get(k) for k in ("steps", "tokens", "val_loss")):
        ran = [x for x in SECTIONS if x not in old.get("sections_not_run", [])]
        keep = [x for x in old.get("sections_run", ran) if x not in sections]
        print(f"--merge: {path} was measured on other pretrained weights (validation loss {theirs.get('val_loss')}, "
              f"this run {mine['val_loss']}): keeping its sections {', '.join(keep) or 'none'} only", flush=True)
        carried = {"sections": keep, "pretraining": old.get("pretraining"), "machine": old.get("machine")}
        old = {k: v for k, v in old.items() if k in ("label_curve", "gain_vs_pretraining_tokens") and
               {"label_curve": "curve", "gain_vs_pretraining_tokens": "tokens"}[k] in keep}
        old["sections_run"], old["carried_from_other_pretraining"] = keep, carried
        return old
    old.setdefault("sections_run", [x for x in SECTIONS if x not in old.get("sections_not_run", [])])
    return old


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/gptn-transfer")
    ap.add_argument("--pretrain-seconds", type=float, default=2700, help="IMDB pretraining budget (default 45 min)")
    ap.add_argument("--books-seconds", type=float, default=0,
                    help="pretrain on Gutenberg this long first, then on IMDB from it (--init-from)")
    ap.add_argument("--pretrain-steps", type=int, default=None,
                    help="pin the IMDB pretraining's steps (reproduces an earlier run) instead of timing --pretrain-seconds")
    ap.add_argument("--merge", action="store_true",
                    help="keep what results/transfer.json holds that this run does not redo (refused unless its "
                         "pretraining has the same steps, tokens and validation loss as this run's)")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse the corpus, the pretrained runs and the fine-tuning results already in --work")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per cell of the SST-2 grid")
    ap.add_argument("--imdb-seeds", type=int, default=3, help="seeds per cell of the IMDB grid")
    ap.add_argument("--imdb-lambdas", default="0.5,0", help="the λ values of the IMDB grid (default both)")
    ap.add_argument("--curve-seeds", type=int, default=3, help="seeds per point of the label curve and token curve")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"which fine-tuning sections to run, of {','.join(SECTIONS)} (curve and tokens need sst2)")
    args = ap.parse_args()
    sections = [x for x in args.sections.split(",") if x]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or (("curve" in sections or "tokens" in sections) and "sst2" not in sections and not args.merge):
        ap.error(f"--sections: {', '.join(unknown) or 'curve and tokens need sst2'}")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    work = Path(args.work)
    t_all = time.time()
    if not args.reuse:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    reused = (work / "pretrained-imdb" / "checkpoint").is_dir()
    pre = pretrain_stage(work, args.pretrain_seconds, args.books_seconds, steps=args.pretrain_steps)
    source = work / "pretrained-imdb"
    print("pretraining: " + json.dumps(pre), flush=True)
    earlier = earlier_results(pre, sections) if args.merge else {}
    t_ft = time.time()
    sets = labeled_sets(work)
    steps = Corpus(work / "imdb-corpus").tokenizer.normalize
    seeds = {"SST-2": list(range(1, args.seeds + 1)), "IMDB": list(range(1, args.imdb_seeds + 1))}
    curve_seeds = list(range(1, args.curve_seeds + 1))
    tasks = [t for t, sec in (("SST-2", "sst2"), ("IMDB", "imdb")) if sec in sections]
    bow = {**earlier.get("tfidf_logreg", {}), **{task: cached(work, {"name": "tfidf", "source": source, "train": sets[task]["train"]},
                        lambda: tfidf_baseline(sets[task]["train"], sets[task]["report"], steps)) for task in tasks}}
    print("TF-IDF + logistic regression: " + json.dumps(bow), flush=True)
    probes = [(task, init) for task in tasks for init in ("pretrained", "random init")
              if init == "pretrained" or task == "SST-2"]
    probe = {**earlier.get("frozen_probe", {}), **{f"{task}: {init}": cached(work, {"name": f"probe {init}", "source": source, "train": sets[task]["train"]},
                                       lambda: frozen_probe(source, sets[task]["train"], sets[task]["report"],
                                                            init == "random init"))
             for task, init in probes}}
    print("frozen features + logistic regression: " + json.dumps(probe), flush=True)

    def arm(init: str, task: str, lm_weight: float, tag: str, seeds: list[int], run: Path = source, **extra) -> dict:
        s = sets[task]
        runs = [tune(work, f"{tag}_{init}_{lm_weight:g}_s{seed}", run, s["train"], s["select"], s["report"],
                     from_scratch=init == "scratch", lm_weight=lm_weight, seed=seed, **{**RECIPES[init], **extra})
                for seed in seeds]
        return {**mean_se([r["value"] for r in runs]), "runs": runs}

    imdb_lambdas = {float(x) for x in args.imdb_lambdas.split(",")}
    grid = {}
    for task in tasks:
        for init in RECIPES:
            for aux, lm_weight in LAMBDAS.items():
                if task == "IMDB" and lm_weight not in imdb_lambdas:
                    continue
                print(f"{task}, {init}, {aux}:", flush=True)
                grid[(task, init, aux)] = arm(init, task, lm_weight, task.lower(), seeds[task])
    for key, cell in earlier.get("ablation", {}).items():
        task, init, aux = key.replace(", ", ": ").split(": ")
        if task in ("SST-2", "IMDB"):
            grid.setdefault((task, init, aux), cell)
    tasks = [t for t in ("SST-2", "IMDB") if any((t, init, aux) in grid for init in RECIPES for aux in LAMBDAS)]
    best = {(task, init): max((a for a in LAMBDAS if (task, init, a) in grid), key=lambda a: grid[(task, init, a)]["mean"])
            for task in tasks for init in RECIPES}
    top = {(task, init): grid[(task, init, best[(task, init)])]["mean"] for task, init in best}
    results = {k: v for k, v in earlier.items() if k in ("label_curve", "gain_vs_pretraining_tokens")}
    pm = lambda r: f"{100 * r['mean']:.1f} ± {100 * r['se']:.1f}"  # noqa: E731
    if tasks:
        print(f"\n{N_LABELED:,} labels, mean ± s.e. over seeds")
        print(table([(f"{init}, {aux}", *(pm(grid[(t, init, aux)]) if (t, init, aux) in grid else "not run" for t in tasks))
                     for init in RECIPES for aux in LAMBDAS],
                    ("model", *(f"{t} acc" for t in tasks))))
        print("TF-IDF + logistic regression: " + ", ".join(f"{t} {100 * v:.1f}" for t, v in bow.items())
              + "; frozen features + logistic regression: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in probe.items()))
    for task, prefix in (("SST-2", ""), ("IMDB", "imdb_")):
        if task in tasks:
            results[f"{prefix}pretrained_minus_scratch"] = round(100 * (top[(task, "pretrained")] - top[(task, "scratch")]), 2)
            results[f"{prefix}pretrained_minus_bow"] = round(100 * (top[(task, "pretrained")] - bow[task]), 2)

    if "curve" in sections:
        # Fewer labels: a random subset of the 2,000 per seed, epochs scaled to the same number of steps.
        curve = {}
        for n in (250, 500, 1000):
            for init in RECIPES:
                print(f"SST-2, {n} labels, {init}:", flush=True)
                curve[f"{n} labels: {init}"] = arm(init, "SST-2", LAMBDAS[best[("SST-2", init)]], f"sst2_{n}",
                                                   curve_seeds, max_train_examples=n, epochs=round(3 * N_LABELED / n))
        for init in RECIPES:
            curve[f"{N_LABELED} labels: {init}"] = grid[("SST-2", init, best[("SST-2", init)])]
        curve_gain = {n: round(100 * (curve[f"{n} labels: pretrained"]["mean"] - curve[f"{n} labels: scratch"]["mean"]), 2)
                      for n in (250, 500, 1000, N_LABELED)}
        print("\nSST-2 with fewer labels (pretrained - scratch, points): "
              + ", ".join(f"{n}: {g:+.1f}" for n, g in curve_gain.items()))
        results["label_curve"] = {**curve, "gain_points": curve_gain}

    if "tokens" in sections:
        # The gain against pretraining tokens: the snapshots taken along the pretraining run.
        by_tokens = []
        for snap in sorted((source / "snapshots").glob("step-*")):
            meta = json.loads((snap / "checkpoint" / "meta.json").read_text())
            if meta["step"] >= pre["imdb"]["steps"]:
                continue
            print(f"SST-2 from the snapshot at {meta['tokens']:,} tokens:", flush=True)
            r = arm("pretrained", "SST-2", LAMBDAS[best[("SST-2", "pretrained")]], f"sst2_{snap.name}", curve_seeds,
                    run=snap)
            by_tokens.append({"tokens": meta["tokens"], "seconds": round(meta["train_seconds"]), "accuracy": r,
                              "gain_points": round(100 * (r["mean"] - top[("SST-2", "scratch")]), 2)})
        by_tokens.append({"tokens": pre["imdb"]["tokens"], "seconds": pre["imdb"]["seconds"],
                          "accuracy": grid[("SST-2", "pretrained", best[("SST-2", "pretrained")])],
                          "gain_points": results["pretrained_minus_scratch"]})
        print("SST-2 gain against pretraining tokens: "
              + ", ".join(f"{b['tokens'] / 1e6:.1f}M: {b['gain_points']:+.1f}" for b in by_tokens))
        results["gain_vs_pretraining_tokens"] = by_tokens

    glue = {}
    for key, cell in earlier.get("ablation", {}).items():
        task, init, aux = key.replace(", ", ": ").split(": ")
        if task not in ("SST-2", "IMDB") and "glue" not in sections:
            glue[(task, init, aux)] = cell
    if "glue" in sections:
        # GPT-1's Table 5, small: rows pretrained / scratch x aux / no aux (GLUE tasks: one seed, dev).
        for init in RECIPES:
            for aux, lm_weight in LAMBDAS.items():
                for task in ("RTE", "MRPC", "STS-B"):
                    glue[(task, init, aux)] = tune(work, f"{task.lower()}_{init}_{lm_weight:g}", source,
                                                   GLUE / task / "train.tsv", GLUE / task / "dev.tsv", None,
                                                   from_scratch=init == "scratch", lm_weight=lm_weight,
                                                   max_train_examples=N_LABELED, **RECIPES[init])
    if glue:
        print(f"\nGLUE, {N_LABELED:,} training examples, one seed, dev")
        print(table([(f"{init}, {aux}", f"{100 * glue[('RTE', init, aux)]['value']:.1f}",
                      f"{glue[('MRPC', init, aux)]['value']:.3f}", f"{glue[('STS-B', init, aux)]['value']:.3f}")
                     for init in RECIPES for aux in LAMBDAS], ("model", "RTE acc", "MRPC F1", "STS-B r")))

    # GPT-1's Table 5 layout: one row per arm, one column per task (mean over seeds where there are several).
    columns = [(t, m) for t, m in (("SST-2", "acc"), ("IMDB", "acc"), ("RTE", "acc"), ("MRPC", "F1"), ("STS-B", "r"))
               if any((t, i, a) in {**grid, **glue} for i in RECIPES for a in LAMBDAS)]
    cells = {**grid, **glue}
    gpt1_table = {f"{init}, {aux}": {f"{t} {m}": round(cells[(t, init, aux)].get("mean", cells[(t, init, aux)].get("value")), 4)
                                     for t, m in columns if (t, init, aux) in cells}
                  for init in RECIPES for aux in LAMBDAS}
    if columns:
        print("\nGPT-1's Table 5, small")
        print(table([(row, *(f"{v[f'{t} {m}']:.3f}" if f"{t} {m}" in v else "not run" for t, m in columns))
                     for row, v in gpt1_table.items()], ("model", *(f"{t} {m}" for t, m in columns))))
    results.update({
        "gpt1_table": gpt1_table,
        "ablation": {f"{task}: {init}, {aux}": v for (task, init, aux), v in {**grid, **glue}.items()},
        "best_lambda": {f"{task}: {init}": b for (task, init), b in best.items()},
        "tfidf_logreg": bow,
        "frozen_probe": probe,
        "recipes": RECIPES,
        "pretraining": {**pre, "model": LM, "batch_tokens": LM_BATCH * LM["n_ctx"], "optimizer": "muon",
                        "corpus": "IMDB unsup + train reviews (never test), normalised like SST-2 (html, lower, punct)",
                        "tokenizer": "bpe:8192"},
        "protocol": (f"{N_LABELED:,} labels; the epoch kept is the best on a 500-example selection set held out of "
                     "the training data, and that checkpoint is reported on SST-2 dev (872) / 5,000 IMDB test "
                     "reviews; 3 epochs, batch 32, warm-up 0.2% then linear decay, dropout 0.1; each cell's seeds are "
                     "its `values`; GLUE tasks one seed, reported on dev"),
        "sections_run": sorted(set(sections) | set(earlier.get("sections_run", [])), key=SECTIONS.index),
        "sections_not_run": [x for x in SECTIONS if x not in sections and x not in earlier.get("sections_run", [])],
        **({"carried_from_other_pretraining": earlier["carried_from_other_pretraining"]}
           if "carried_from_other_pretraining" in earlier else {}),
        **({"earlier_run": earlier.get("earlier_run") or {k: earlier[k] for k in ("sections_run", "finetune_seconds",
                                                                                   "total_seconds", "machine")}}
           if earlier and "carried_from_other_pretraining" not in earlier else {}),
        "finetune_seconds": round(time.time() - t_ft), "total_seconds": round(time.time() - t_all),
        "pretraining_reused": reused, "machine": machine()})
    print(f"\nwrote {write_results('transfer', results)} ({time.time() - t_all:.0f} s)")


if __name__ == "__main__":
    main()
