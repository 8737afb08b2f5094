"""Telling generated text from human text by how a language model scores it — an answer to the
misuse the lecture warns about (GPT-3's human-like text used for fake news).

GLTR (Gehrmann, Strobelt & Rush, 2019): a sampler draws most tokens from the top of the model's
distribution, while people choose rarer words more often. For every token of a document the model
gives its rank (1 = the token the model found most likely), its log-probability and the entropy of
the distribution it was drawn from; a document is summarised by the share of tokens ranked in the
top 10 / top 100 / top 1,000 / below, the mean log-probability and the mean entropy, and a logistic
regression over those six figures gives P(machine-generated).

The regression is fitted with `gptn detect RUN --fit HUMAN MACHINE` (saved as RUN/detector.json); a
run without one uses DEFAULT_DETECTOR, fitted by benchmarks/detect.py on its own model's samples
(greedy, top-k 40, top-p 0.9 and temperature 1 text against held-out human text), which carries over
to other models only roughly: fit one for yours.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import GptnError, require_one_input
from .inference import RunOptions
from .options import option
from .model import require_decoder

BUCKETS = (10, 100, 1000)  # GLTR's colours: green, yellow, red, and purple for the rest
FEATURES = ("top10", "top100", "top1000", "rest", "mean_logprob", "mean_entropy")
DETECTOR_FILE = "detector.json"


@dataclass
class TokenStats:
    tokens: list[int]
    ranks: list[int]  # 1 = the model's most likely token
    logprobs: list[float]
    entropies: list[float]  # nats, of the distribution each token was drawn from

    def features(self) -> dict[str, float]:
        n = max(1, len(self.ranks))
        buckets = [bucket(r) for r in self.ranks]
        shares = [buckets.count(name) / n for name in FEATURES[:len(BUCKETS) + 1]]
        return dict(zip(FEATURES, [*shares, sum(self.logprobs) / n, sum(self.entropies) / n]))


def bucket(rank: int) -> str:
    """GLTR's colour of a token's rank: "top10", "top100", "top1000" or "rest"."""
    return next((f"top{b}" for b in BUCKETS if rank <= b), "rest")


@torch.no_grad()
def token_stats(model, tokenizer, text: str) -> TokenStats:
    """Rank, log-probability and entropy of every token of `text` (read after end-of-text); a text
    longer than the context is read in windows half a context apart, each token scored once."""
    require_decoder(model, "score a text left to right")
    ids = [tokenizer.eot_id] + tokenizer.encode(text)
    if len(ids) < 2:
        raise GptnError("nothing to score: the text is empty")
    n_ctx, device = model.config.n_ctx, model.wte.weight.device
    stride = max(1, n_ctx // 2)
    ranks, logprobs, entropies, done, start = [], [], [], 1, 0
    while done < len(ids):
        window = ids[start:start + n_ctx + 1]
        logits = model(torch.tensor([window[:-1]], device=device))[0].float()  # predicts window[1:]
        first = done - start - 1  # the first prediction not scored by an earlier window
        logits, targets = logits[first:], torch.tensor(window[1:][first:], device=device)
        logp = F.log_softmax(logits, -1)
        chosen = logp.gather(1, targets[:, None])[:, 0]
        ranks += ((logp > chosen[:, None]).sum(1) + 1).tolist()
        logprobs += chosen.tolist()
        entropies += (-(logp.exp() * logp).sum(1)).tolist()
        done = start + len(window)
        start += stride
    return TokenStats(ids[1:], ranks, logprobs, entropies)


@dataclass
class Detector:
    """Logistic regression over FEATURES (standardised): P(machine) = sigmoid(coef · (x - mean) / scale + bias)."""

    mean: list[float]
    scale: list[float]
    coef: list[float]
    bias: float
    fitted_on: str = ""

    def probability(self, features: dict[str, float]) -> float:
        z = sum(c * (features[f] - m) / s for f, c, m, s in zip(FEATURES, self.coef, self.mean, self.scale))
        return 1 / (1 + math.exp(-max(-60.0, min(60.0, z + self.bias))))

    @classmethod
    def fit(cls, human: list[dict], machine: list[dict], fitted_on: str = "", l2: float = 1e-2) -> "Detector":
        """Fitted by L-BFGS on human (label 0) and machine (label 1) feature rows, L2-regularised."""
        if not human or not machine:
            raise GptnError("--fit needs at least one human and one machine-generated document")
        x = torch.tensor([[r[f] for f in FEATURES] for r in human + machine], dtype=torch.float64)
        y = torch.tensor([0.0] * len(human) + [1.0] * len(machine), dtype=torch.float64)
        mean, scale = x.mean(0), x.std(0, unbiased=False).clamp(min=1e-6)
        z = (x - mean) / scale
        w = torch.zeros(len(FEATURES), dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * (w ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return cls(mean.tolist(), scale.tolist(), w.detach().tolist(), float(b.detach()), fitted_on)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"features": list(FEATURES), **asdict(self)}, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "Detector":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            if data.pop("features", list(FEATURES)) != list(FEATURES):
                raise ValueError("it was fitted on other features")
            return cls(**data)
        except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:
            raise GptnError(f"{path} is not a detector gptn wrote ({e})") from None


# benchmarks/detect.py's fit (results/detect.json, "default_detector"): a 4 x 256 model trained on Gutenberg
# books, its greedy / top-k 40 / top-p 0.9 / temperature 1 passages against held-out books, 120 of each class.
DEFAULT_DETECTOR = Detector(mean=[0.5838, 0.2577, 0.1353, 0.02328, -4.022, 4.418],
                            scale=[0.15, 0.09501, 0.07385, 0.02155, 0.7772, 0.2797],
                            coef=[0.4513, -0.01801, -0.8455, -0.1633, 0.6688, 0.6256], bias=0.3622,
                            fitted_on="the default (benchmarks/detect.py: a small books model's own samples against "
                                      "held-out books); fit your own with --fit HUMAN MACHINE")


def detector_for(run: str | Path, path: str | Path | None = None) -> Detector:
    """The detector a run uses: `path`, else RUN/detector.json (from --fit), else DEFAULT_DETECTOR."""
    if path is not None:
        return Detector.load(Path(path))
    saved = Path(run) / DETECTOR_FILE
    return Detector.load(saved) if saved.exists() else DEFAULT_DETECTOR


def read_documents(path: str | Path) -> list[str]:
    """Documents of a file: one per line of a .jsonl ({"text": ...}), else the whole file as one, or
    every .txt file of a folder."""
    path = Path(path)
    try:
        if path.is_dir():
            return [p.read_text(encoding="utf-8") for p in sorted(path.glob("*.txt"))]
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GptnError(f"cannot read {path}: {e}") from None
    if path.suffix != ".jsonl":
        return [text]
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
                docs.append(row["text"] if isinstance(row, dict) else row)
            except (json.JSONDecodeError, KeyError):
                raise GptnError(f"{path}:{n}: expected a JSON object with a \"text\" field") from None
            if not isinstance(docs[-1], str):
                raise GptnError(f"{path}:{n}: \"text\" is not a string")
    return docs


def fit_files(model, tokenizer, human: str, machine: str) -> tuple[Detector, float]:
    """A detector fitted on the documents of two files (human-written, machine-generated), and its
    accuracy on them."""
    rows = [[token_stats(model, tokenizer, d).features() for d in read_documents(f)] for f in (human, machine)]
    detector = Detector.fit(*rows, fitted_on=f"{len(rows[0])} human ({human}), {len(rows[1])} machine ({machine}) "
                                             "documents")
    right = sum(detector.probability(r) < 0.5 for r in rows[0]) + sum(detector.probability(r) >= 0.5 for r in rows[1])
    return detector, right / (len(rows[0]) + len(rows[1]))


def report(stats: TokenStats, detector: Detector, tokenizer, index: int, per_token: bool, as_json: bool) -> str:
    """What `gptn detect` prints for one document: a JSON line, or a sentence (and its ranked tokens)."""
    feats = stats.features()
    p = detector.probability(feats)
    pieces = [tokenizer.decode([t]) for t in stats.tokens]
    if as_json:
        record = {"document": index, "machine_probability": p, **feats, "tokens": len(stats.tokens)}
        if per_token:
            record["per_token"] = [{"token": piece, "rank": r, "logprob": lp}
                                   for piece, r, lp in zip(pieces, stats.ranks, stats.logprobs)]
        return json.dumps(record, ensure_ascii=False)
    text = (f"document {index}: P(machine-generated) {p:.1%}  ({len(stats.tokens)} tokens: top-10 {feats['top10']:.0%}, "
            f"top-100 {feats['top100']:.0%}, top-1000 {feats['top1000']:.0%}, rest {feats['rest']:.0%}; "
            f"mean log-prob {feats['mean_logprob']:.2f}, mean entropy {feats['mean_entropy']:.2f})")
    if per_token:
        text += "\n  " + " ".join(f"{piece!r}[{bucket(r)}]" for piece, r in zip(pieces, stats.ranks))
    return text


@dataclass(kw_only=True)
class DetectOptions(RunOptions):
    """`gptn detect` (RUN is the scoring model)."""

    file: str | None = option(None, "a text file (one document), a .jsonl of {\"text\"} (one per line) or a folder "
                                    "of .txt files", cli="positional")
    text: str | None = option(None, "the text itself instead of a file")
    fit: list[str] | None = option(None, "fit the classifier on human and machine-generated documents (same formats "
                                         "as FILE) and save it as RUN/detector.json (or --detector)", nargs=2,
                                   metavar=("HUMAN", "MACHINE"))
    detector: str | None = option(None, "the classifier to use or write (default RUN/detector.json, else the default)")
    tokens: bool = option(False, "also print every token with its rank bucket")
    json: bool = option(False, "print JSON instead of text")


def detect_command(o: DetectOptions) -> None:
    """`gptn detect`: fit a detector (--fit), or print each document's probability of being machine-generated."""
    if o.fit:
        if o.file or o.text:
            raise GptnError("--fit takes the HUMAN and MACHINE documents only")
        detector, accuracy = fit_files(*o.load(), *o.fit)
        out = Path(o.detector or Path(o.run) / DETECTOR_FILE)
        detector.save(out)
        print(f"fitted on {detector.fitted_on}: training accuracy {accuracy:.1%}; saved {out}")
        return
    require_one_input(o.file, o.text, " (or --fit HUMAN MACHINE)")
    docs = read_documents(o.file) if o.file else [o.text]
    detector = detector_for(o.run, o.detector)
    model, tokenizer = o.load()
    for i, doc in enumerate(docs):
        print(report(token_stats(model, tokenizer, doc), detector, tokenizer, i, o.tokens, o.json))
    if not o.json:
        print(f"(detector: {detector.fitted_on})")


__all__ = ["BUCKETS", "FEATURES", "bucket", "TokenStats", "token_stats", "Detector", "DEFAULT_DETECTOR", "detector_for",
           "read_documents", "fit_files", "report"]
