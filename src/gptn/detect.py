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

from .config import GptnError
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


__all__ = ["BUCKETS", "FEATURES", "bucket", "TokenStats", "token_stats", "Detector", "DEFAULT_DETECTOR", "detector_for",
           "read_documents"]
