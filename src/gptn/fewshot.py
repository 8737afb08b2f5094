"""GPT-3 in-context learning: zero-, one- and few-shot evaluation with no gradient update.

A prompt is a task description, K solved demonstrations and the new query (GPT-3 §2, Figure 2.1):

    Translate English to French:          <- description
                                          <- separator ("\\n\\n")
    sea otter => loutre de mer            <- demonstration: query + target delimiter (" ") + answer
                                          <- separator
    cheese =>                             <- the query; the model continues it

Multiple-choice tasks compare the log-likelihood of each answer after the prompt (summed, per token,
per character, or GPT-3's unconditional normalisation); free-form tasks generate greedily up to a
stop string (exact match, token F1); cloze tasks (LAMBADA) check that greedy decoding produces the
whole last word.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .config import GptnError, check_output
from .inference import DecodeOptions
from .options import option, positive
from .data import read_records
from .scoring import fit_window, loglikelihood_tokens
from .model import GPT

KINDS = ("multiple_choice", "generate", "cloze")
NORMALIZATIONS = ("sum", "per_token", "per_char", "unconditional")
UNCONDITIONAL_CONTEXT = "Answer:"  # GPT-3 §2.4: P(completion | context) / P(completion | "Answer:")


# ----------------------------------------------------------------------------------------------
# Tasks


@dataclass
class Doc:
    """One item: the query text, and either choices + gold index or acceptable answers."""

    query: str
    choices: list[str] | None = None
    gold: int | None = None
    answers: list[str] | None = None

    def target(self) -> str:
        """The answer a demonstration shows."""
        return self.choices[self.gold] if self.choices is not None else self.answers[0]


@dataclass
class Task:
    name: str
    kind: str  # multiple_choice | generate | cloze
    docs: list[Doc]  # evaluated items
    pool: list[Doc] | None = None  # demonstrations are drawn from here (default: the other docs)
    description: str = ""
    separator: str = "\n\n"  # between description, demonstrations and query
    target_delimiter: str = " "  # between a query and its answer
    stop: list[str] = field(default_factory=lambda: ["\n"])
    normalization: str = "sum"
    max_gen_tokens: int = 32
    chance: float | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise GptnError(f"task {self.name}: type {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.normalization not in NORMALIZATIONS:
            raise GptnError(f"task {self.name}: normalization {self.normalization!r} is not one of "
                            f"{', '.join(NORMALIZATIONS)}")
        if not self.docs:
            raise GptnError(f"task {self.name} has no examples")


def _placeholders(template: str) -> list[str]:
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f]
    except ValueError as e:
        raise GptnError(f"template {template!r} is not valid: {e}") from None


def _render(template: str, record: dict, where: str) -> str:
    try:
        return template.format_map(record)
    except KeyError as e:
        raise GptnError(f"{where}: the template needs field {e.args[0]!r}; the record has {sorted(record)}") from None


def docs_from_records(records: list[dict], spec: dict, where: str) -> list[Doc]:
    """Docs from data rows and a task spec (template, choices, label, answer)."""
    kind, template = spec["type"], spec["template"]
    docs = []
    for n, rec in enumerate(records, 1):
        at = f"{where}: example {n}"
        query = _render(template, rec, at)
        if kind == "multiple_choice":
            choices = spec["choices"]
            if isinstance(choices, str):
                if choices not in rec:
                    raise GptnError(f"{at} has no choices field {choices!r} (fields: {sorted(rec)})")
                choices = rec[choices]
            if not isinstance(choices, list) or len(choices) < 2:
                raise GptnError(f"{at}: choices must be a list of at least two answers")
            if spec["label"] not in rec:
                raise GptnError(f"{at} has no label field {spec['label']!r} (fields: {sorted(rec)})")
            label = rec[spec["label"]]
            choices = [str(c) for c in choices]
            if str(label) in choices and not str(label).lstrip("-").isdigit():
                gold = choices.index(str(label))
            else:
                try:
                    gold = int(label)
                except (TypeError, ValueError):
                    raise GptnError(f"{at}: label {label!r} is neither a choice nor an index") from None
                if not 0 <= gold < len(choices):
                    raise GptnError(f"{at}: label {gold} is outside 0..{len(choices) - 1}")
            docs.append(Doc(query, choices, gold))
        else:
            answer = spec["answer"]
            answers = rec[answer] if answer in rec and isinstance(rec[answer], list) else [_render(answer, rec, at)]
            docs.append(Doc(query, answers=[str(a) for a in answers]))
    return docs


TASK_FIELDS = {"name", "type", "data", "labels", "pool", "template", "choices", "label", "answer", "description",
               "separator", "target_delimiter", "stop", "normalization", "max_gen_tokens", "chance"}


def join_labels(records: list[dict], labels_file: Path, field: str) -> list[dict]:
    """Records with a label each from a separate file, one per line in the same order (PIQA's layout)."""
    try:
        lines = [ln.strip() for ln in labels_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise GptnError(f"cannot read the labels file {labels_file}: {e}") from None
    if len(lines) != len(records):
        raise GptnError(f"{labels_file} has {len(lines)} labels for {len(records)} examples; they must pair up line by line")
    return [{**r, field: y} for r, y in zip(records, lines)]


def load_task_file(path: str | Path) -> Task:
    """A task from a JSON or YAML file; data paths are relative to the file's folder.

    Fields: name, type (multiple_choice | generate | cloze), data, template ("{field}" placeholders),
    choices (a field holding a list, or a literal list) and label (multiple choice), answer (a field
    or template: generate and cloze); optional: pool, description, separator, target_delimiter, stop,
    normalization, max_gen_tokens, chance.
    """
    path = Path(path)
    if not path.is_file():
        raise GptnError(f"task file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise GptnError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or write the task as JSON") \
                from None
        spec = yaml.safe_load(text)
    else:
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise GptnError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(spec, dict):
        raise GptnError(f"{path}: a task file holds one object with the fields {sorted(TASK_FIELDS)}")
    unknown = sorted(set(spec) - TASK_FIELDS)
    if unknown:
        raise GptnError(f"{path}: unknown field(s) {unknown}; known: {sorted(TASK_FIELDS)}")
    kind = spec.get("type")
    needed = ["type", "data", "template"] + (["choices", "label"] if kind == "multiple_choice" else ["answer"])
    missing = [k for k in needed if k not in spec]
    if missing:
        raise GptnError(f"{path}: missing field(s) {missing}")
    if kind not in KINDS:
        raise GptnError(f"{path}: type {kind!r} is not one of {', '.join(KINDS)}")
    if not _placeholders(spec["template"]):
        raise GptnError(f"{path}: the template {spec['template']!r} has no {{field}} placeholder for the query")
    base = path.parent

    def resolve(key):
        f = Path(spec[key])
        f = f if f.is_absolute() else base / f
        if not f.is_file():
            raise GptnError(f"{path}: {key} file {f} does not exist")
        return f

    def docs(key):
        records = read_records(resolve(key))
        if key == "data" and "labels" in spec:
            records = join_labels(records, resolve("labels"), spec.get("label", "label"))
        return docs_from_records(records, spec, str(resolve(key)))

    stop = spec.get("stop", ["\n"])
    return Task(name=spec.get("name", path.stem), kind=kind, docs=docs("data"),
                pool=docs("pool") if "pool" in spec else None, description=spec.get("description", ""),
                separator=spec.get("separator", "\n\n"), target_delimiter=spec.get("target_delimiter", " "),
                stop=[stop] if isinstance(stop, str) else list(stop),
                normalization=spec.get("normalization", "sum"), max_gen_tokens=int(spec.get("max_gen_tokens", 32)),
                chance=spec.get("chance"))


def find_data_dir(data_dir: str | Path | None = None) -> Path:
    """Where the built-in tasks' files live: --data-dir, $GPTN_DATA_DIR, or a shared/data folder above."""
    if data_dir or os.environ.get("GPTN_DATA_DIR"):
        d = Path(data_dir or os.environ["GPTN_DATA_DIR"])
        if not d.is_dir():
            raise GptnError(f"data folder {d} does not exist")
        return d
    for parent in [Path.cwd(), *Path.cwd().parents]:
        for d in (parent / "shared" / "data", parent / "data"):
            if (d / "lambada").is_dir() or (d / "hellaswag").is_dir():
                return d
    raise GptnError("no data folder for the built-in tasks: pass --data-dir (holding lambada/, hellaswag/, "
                    "glue/, en-fr/) or set GPTN_DATA_DIR")


def _lambada(d: Path) -> Task:
    docs = []
    for rec in read_records(d / "lambada" / "lambada_test.jsonl"):
        context, word = rec["text"].rsplit(" ", 1)
        docs.append(Doc(context, answers=[word]))
    return Task("lambada", "cloze", docs, stop=[], max_gen_tokens=8, chance=0.0)


def _hellaswag(d: Path) -> Task:
    from .tasks import read_task_file
    data = read_task_file(d / "hellaswag" / "hellaswag_val_full.txt")
    docs = [Doc(x.segments[0], list(x.choices), x.label) for x in data.examples]
    # lm-evaluation-harness's acc_norm: GPT-3-sized models prefer the per-character normalisation here.
    return Task("hellaswag", "multiple_choice", docs, normalization="per_char", chance=0.25)


def _piqa(d: Path) -> Task:
    """PIQA (Bisk et al. 2020): which of two solutions reaches a physical goal — the commonsense GPT-3
    is weakest at. lm-evaluation-harness's prompt; labels come from the separate labels file."""
    records = join_labels(read_records(d / "piqa" / "valid.jsonl"), d / "piqa" / "valid-labels.lst", "label")
    spec = {"type": "multiple_choice", "template": "Question: {goal}\nAnswer:", "choices": "solutions", "label": "label"}
    records = [{**r, "solutions": [r["sol1"], r["sol2"]]} for r in records]
    return Task("piqa", "multiple_choice", docs_from_records(records, spec, "PIQA valid"), normalization="per_char",
                chance=0.5)


def _sst2(d: Path) -> Task:
    spec = {"type": "multiple_choice", "template": "{sentence}\nQuestion: Is this sentence positive or negative?\n"
            "Answer:", "choices": ["negative", "positive"], "label": "label"}
    glue = d / "glue" / "SST-2"
    return Task("sst2", "multiple_choice", docs_from_records(read_records(glue / "dev.tsv"), spec, "SST-2 dev"),
                pool=docs_from_records(read_records(glue / "train.tsv"), spec, "SST-2 train"), chance=0.5)


def _en_fr(d: Path) -> Task:
    translations: dict[str, list[str]] = {}
    for rec in read_records(d / "en-fr" / "en-fr.tsv"):
        translations.setdefault(rec["english"], []).append(rec["french"])
    docs = [Doc(f"{en} =>", answers=fr) for en, fr in translations.items()]
    return Task("en-fr", "generate", docs, description="Translate English to French:", max_gen_tokens=16,
                chance=0.0)


BUILTIN_TASKS = {"lambada": _lambada, "hellaswag": _hellaswag, "piqa": _piqa, "sst2": _sst2, "en-fr": _en_fr}


def load_task(name_or_file: str, data_dir: str | Path | None = None) -> Task:
    """A built-in task by name (lambada, hellaswag, piqa, sst2, en-fr) or a task file."""
    if name_or_file in BUILTIN_TASKS:
        return BUILTIN_TASKS[name_or_file](find_data_dir(data_dir))
    if Path(name_or_file).suffix in (".json", ".yaml", ".yml") or Path(name_or_file).exists():
        return load_task_file(name_or_file)
    raise GptnError(f"unknown task {name_or_file!r}: a built-in ({', '.join(BUILTIN_TASKS)}) or a task file "
                    "(.json / .yaml)")


# ----------------------------------------------------------------------------------------------
# Prompts


def build_prompt(task: Task, doc: Doc, demos: list[Doc]) -> str:
    """Description, demonstrations (query + delimiter + answer) and the query, joined by the separator."""
    parts = ([task.description] if task.description else []) + \
        [d.query + task.target_delimiter + d.target() for d in demos] + [doc.query]
    return task.separator.join(parts)


def sample_demos(task: Task, index: int, k: int, seed: int) -> list[Doc]:
    """K demonstrations for docs[index], drawn with a seed from the pool, never the query itself."""
    if k == 0:
        return []
    doc = task.docs[index]
    if task.pool is None:
        candidates = [d for i, d in enumerate(task.docs) if i != index and d != doc]
    else:
        candidates = [d for d in task.pool if d != doc]
    if k > len(candidates):
        raise GptnError(f"task {task.name}: K={k} demonstrations asked for, but the pool has only "
                        f"{len(candidates)} examples besides the query")
    return random.Random(seed * 1_000_003 + index).sample(candidates, k)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a context and its continuation, split the way lm-evaluation-harness does: trailing
    spaces move to the continuation, the pair is encoded whole, and an empty context reads end-of-text."""
    if not context:
        return [tokenizer.eot_id], tokenizer.encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


def fit_prompt(task: Task, doc: Doc, demos: list[Doc], tokenizer, n_ctx: int) -> tuple[str, int]:
    """The prompt with as many demonstrations as fit the context window beside the longest answer
    (the demonstrations farthest from the query are dropped first); returns (prompt, demos used)."""
    longest = max((doc.choices or doc.answers or [""]), key=len)
    reserve = len(tokenizer.encode(task.target_delimiter + longest)) + (task.max_gen_tokens if task.kind == "generate" else 0)
    for used in range(len(demos), -1, -1):
        prompt = build_prompt(task, doc, demos[len(demos) - used:])
        if used == 0 or len(tokenizer.encode(prompt)) + reserve <= n_ctx:
            return prompt, used
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------------------------
# Scoring


_PUNCTUATION = set(string.punctuation)


def _normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, answer: str) -> float:
    p, a = _normalize_answer(prediction).split(), _normalize_answer(answer).split()
    common = sum((Counter(p) & Counter(a)).values())
    if not p or not a:
        return float(p == a)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(a)
    return 2 * precision * recall / (precision + recall)


def choose(loglik: list[float], n_tokens: list[int], choices: list[str], normalization: str,
           unconditional: list[float] | None = None) -> int:
    """The chosen answer's index under a normalisation of the log-likelihoods."""
    if normalization == "sum":
        scores = loglik
    elif normalization == "per_token":
        scores = [ll / n for ll, n in zip(loglik, n_tokens)]
    elif normalization == "per_char":  # lm-evaluation-harness's acc_norm: characters of the answer text
        scores = [ll / max(1, len(c)) for ll, c in zip(loglik, choices)]
    elif normalization == "unconditional":
        scores = [ll - u for ll, u in zip(loglik, unconditional)]
    else:
        raise GptnError(f"normalization {normalization!r} is not one of {', '.join(NORMALIZATIONS)}")
    return max(range(len(scores)), key=lambda i: scores[i])


@dataclass
class ShotResult:
    k: int
    metric: str
    value: float
    stderr: float
    examples: int
    demos_used: float  # mean demonstrations that fit
    metrics: dict  # every metric computed, e.g. accuracy under each normalisation
    records: list[dict]
    truncated: int = 0  # examples whose prompt (or answer) lost tokens to fit the context window


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def evaluate_fewshot(model: GPT, tokenizer, task: Task, k: int, limit: int | None = None, seed: int = 1234,
                     batch_size: int = 32, normalization: str | None = None) -> ShotResult:
    """Evaluate `task` with K demonstrations per query (no gradient update)."""
    if k < 0:
        raise GptnError(f"K must be >= 0, got {k}")
    normalization = normalization or task.normalization
    if normalization not in NORMALIZATIONS:
        raise GptnError(f"normalization {normalization!r} is not one of {', '.join(NORMALIZATIONS)}")
    model.eval()
    n_ctx = model.config.n_ctx
    indices = list(range(len(task.docs)))
    if limit is not None and limit < len(indices):
        indices = sorted(random.Random(seed).sample(indices, limit))
    prompts, used = [], []
    for i in indices:
        prompt, n = fit_prompt(task, task.docs[i], sample_demos(task, i, k, seed), tokenizer, n_ctx)
        prompts.append(prompt)
        used.append(n)
    docs = [task.docs[i] for i in indices]
    records = [{"index": i, "prompt": p, "demos_used": n} for i, p, n in zip(indices, prompts, used)]
    if task.kind == "multiple_choice":
        metrics, per_example, truncated = _score_multiple_choice(model, tokenizer, task, docs, prompts, records,
                                                                 batch_size, normalization)
        metric = f"accuracy ({normalization})"
    elif task.kind == "cloze":
        reqs = [encode_pair(tokenizer, p, task.target_delimiter + d.answers[0]) for p, d in zip(prompts, docs)]
        scored = loglikelihood_tokens(model, reqs, batch_size)
        truncated = sum(fit_window(c, a, n_ctx)[2] for c, a in reqs)
        per_example = [float(greedy) for _, greedy, _ in scored]
        lls = [ll for ll, _, _ in scored]
        for rec, d, (ll, greedy, n) in zip(records, docs, scored):
            rec.update(answer=d.answers[0], loglik=ll, correct=greedy)
        metrics = {"accuracy": sum(per_example) / len(per_example), "perplexity": math.exp(-sum(lls) / len(lls))}
        metric = "last-word accuracy"
    else:
        from .generate import generate
        from .sampling import SamplingConfig
        sampling = SamplingConfig(max_new_tokens=task.max_gen_tokens, greedy=True, stop=task.stop)
        truncated = sum(len(tokenizer.encode(p)) > n_ctx - 1 for p in prompts)  # generate reads the last n_ctx - 1
        outputs = []
        for s in range(0, len(prompts), batch_size):
            outputs += [texts[0] for texts in generate(model, tokenizer, prompts[s:s + batch_size], sampling)]
        per_example, f1s = [], []
        for rec, d, out in zip(records, docs, outputs):
            em = max(float(_normalize_answer(out) == _normalize_answer(a)) for a in d.answers)
            f1 = max(token_f1(out, a) for a in d.answers)
            per_example.append(em)
            f1s.append(f1)
            rec.update(output=out, answers=d.answers, exact_match=em, f1=f1)
        metrics = {"exact_match": sum(per_example) / len(per_example), "f1": sum(f1s) / len(f1s)}
        metric = "exact match"
    value, stderr = _mean_stderr(per_example)
    return ShotResult(k, metric, value, stderr, len(docs), sum(used) / len(used), metrics, records, truncated)


def _score_multiple_choice(model, tokenizer, task, docs, prompts, records, batch_size, normalization):
    reqs, owners = [], []
    for j, (p, d) in enumerate(zip(prompts, docs)):
        for c in d.choices:
            reqs.append(encode_pair(tokenizer, p, task.target_delimiter + c))
            owners.append(j)
    scored = loglikelihood_tokens(model, reqs, batch_size)
    n_ctx = model.config.n_ctx
    truncated = len({j for j, (c, a) in zip(owners, reqs) if fit_window(c, a, n_ctx)[2]})
    uncond = None
    if normalization == "unconditional":
        ureqs = [encode_pair(tokenizer, UNCONDITIONAL_CONTEXT, task.target_delimiter + c) for d in docs for c in d.choices]
        uncond = [ll for ll, _, _ in loglikelihood_tokens(model, ureqs, batch_size)]
    per_norm = {n: [] for n in NORMALIZATIONS if n != "unconditional" or uncond is not None}
    pos = 0
    chosen_main = []
    for rec, d in zip(records, docs):
        m = len(d.choices)
        lls = [scored[pos + c][0] for c in range(m)]
        ntok = [scored[pos + c][2] for c in range(m)]
        u = uncond[pos:pos + m] if uncond is not None else None
        pos += m
        for n in per_norm:
            per_norm[n].append(float(choose(lls, ntok, d.choices, n, u) == d.gold))
        pick = choose(lls, ntok, d.choices, normalization, u)
        chosen_main.append(float(pick == d.gold))
        rec.update(choices=d.choices, gold=d.gold, loglik=lls, chosen=pick, correct=pick == d.gold)
    metrics = {f"accuracy_{n}": sum(v) / len(v) for n, v in per_norm.items()}
    return metrics, chosen_main, truncated


def plot_metric_vs_shots(results: list[ShotResult], task: Task, path: str | Path) -> Path:
    """A PNG of the metric against K (matplotlib, the `plot` extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise GptnError("plotting needs matplotlib: pip install 'gptn[plot]'") from None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ks = [r.k for r in results]
    ax.errorbar(ks, [r.value for r in results], yerr=[r.stderr for r in results], marker="o", capsize=3,
                label="gptn")
    if task.chance is not None:
        ax.axhline(task.chance, color="grey", linestyle="--", label="chance")
    ax.set_xlabel("K (demonstrations in the prompt)")
    ax.set_ylabel(results[0].metric)
    ax.set_title(task.name)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _shots(text: str) -> list[int]:
    import argparse
    try:
        shots = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shots takes comma-separated integers like 0,1,8, not {text!r}") from None
    if not shots or min(shots) < 0:
        raise argparse.ArgumentTypeError(f"--shots needs one or more integers >= 0, got {text!r}")
    return shots


@dataclass(kw_only=True)
class FewshotOptions(DecodeOptions):
    """`gptn fewshot`."""

    task: str = option(help=f"a built-in task ({', '.join(BUILTIN_TASKS)}) or a task file (.json / .yaml)")
    shots: list[int] = option(help="values of K, e.g. 0,1,8", factory=lambda: [0, 1, 8], parse=_shots,
                              nargs=None)  # one text, parsed into the list
    limit: int | None = option(None, "evaluate a seeded random subset of this many examples", parse=positive(int))
    normalization: str | None = option(None, "multiple choice: how answers' log-likelihoods are compared (default: "
                                             "the task's)", choices=NORMALIZATIONS)
    seed: int = option(1234, "seed for drawing demonstrations")
    batch_size: int = option(32, "requests scored per forward pass", parse=positive(int))
    data_dir: str | None = option(None, "folder with the built-in tasks' data (default $GPTN_DATA_DIR or a "
                                        "shared/data folder above the current one)")
    records: str | None = option(None, "write every example's prompt, scores and answer here (JSONL)")
    plot: str | None = option(None, "write a PNG of the metric against K here")
    json: bool = option(False, "print one JSON object per K")


def report_fewshot(o: FewshotOptions) -> list[ShotResult]:
    """`gptn fewshot`: evaluate at each K, printing a table row (or a JSON line) as each K finishes, then
    what the rows hide (demonstrations that did not fit, truncated prompts); write the records and the plot."""
    import sys
    for flag, path in (("--records", o.records), ("--plot", o.plot)):
        if path:
            check_output(path, flag)  # before the evaluation, not after it
    task = load_task(o.task, o.data_dir)
    model, tokenizer = o.load()
    if not o.json:
        print(f"{task.name} ({task.kind}); chance {task.chance if task.chance is not None else 'n/a'}")
        print(f"{'K':>3}  {'metric':<28} {'value':>8}  {'± stderr':>9}  {'examples':>8}  {'demos used':>10}  "
              f"{'truncated':>9}")
    results = []
    for k in o.shots:
        r = evaluate_fewshot(model, tokenizer, task, k, limit=o.limit, seed=o.seed, batch_size=o.batch_size,
                             normalization=o.normalization)
        results.append(r)
        if o.json:
            print(json.dumps({"k": k, "metric": r.metric, "value": r.value, "stderr": r.stderr, "examples": r.examples,
                              "demos_used": r.demos_used, "truncated": r.truncated, "metrics": r.metrics,
                              "chance": task.chance}))
        else:
            print(f"{k:>3}  {r.metric:<28} {r.value:>8.4f}  {r.stderr:>9.4f}  {r.examples:>8}  {r.demos_used:>10.2f}  "
                  f"{r.truncated:>9}")
    n_ctx = model.config.n_ctx
    for r in results:
        if r.demos_used < r.k:
            print(f"gptn fewshot: K={r.k}: on average only {r.demos_used:.2f} of {r.k} demonstrations fit the "
                  f"context window of {n_ctx} tokens; this row is not {r.k}-shot", file=sys.stderr)
    if any(r.truncated for r in results):
        print(f"gptn fewshot: 'truncated' counts examples whose prompt (or answer) lost its start to fit the "
              f"context window of {n_ctx} tokens, as lm-evaluation-harness does", file=sys.stderr)
    if o.records:
        with open(o.records, "w") as f:
            f.writelines(json.dumps({"k": r.k, **rec}, ensure_ascii=False) + "\n" for r in results for rec in r.records)
    if o.plot:
        path = plot_metric_vs_shots(results, task, Path(o.plot))
        if not o.json:
            print(f"plot: {path}")
    return results


__all__ = ["Doc", "Task", "load_task", "load_task_file", "build_prompt", "sample_demos", "encode_pair",
           "fit_prompt", "loglikelihood_tokens", "choose", "token_f1", "evaluate_fewshot", "ShotResult",
           "BUILTIN_TASKS", "NORMALIZATIONS", "plot_metric_vs_shots", "report_fewshot"]
