"""Fine-tuning task types: what GPT-1 (§3.3, Figure 1) does differently for each kind of task.

Each type says how an example becomes token sequences framed by start s, delimiter $ and extract e
(the input transformation), how those sequences' features become one input to the linear head, what
the head's outputs are, and which metric chooses the best checkpoint. The rest of fine-tuning (the
model, L3 = L2 + λ·L1, the loop) is the same for every type, so a new type is one class here, added
to TASK_TYPES.

    classification    s text e                                   -> linear -> softmax over labels
    entailment        s premise $ hypothesis e                   -> linear -> softmax
    similarity        s A $ B e  and  s B $ A e, h_n(e) summed   -> linear (classes or a score)
    multiple choice   s context $ answer_k e, for each k         -> linear -> one score each -> softmax

Any type whose label is a number (`regression`, e.g. STS-B's similarity 0-5) has one output, trained
with squared error and chosen by Pearson's r.
"""

from __future__ import annotations

import math

import torch

MAX_WINDOWS = 32  # per input: a longer text is read by 32 evenly spaced windows (gaps between them)


def _truncate(segments: list[list[int]], budget: int, context_first: bool, keep: str = "tail") -> list[list[int]]:
    """Drop tokens from the start of the longest segment (or of segment 0 first) until all fit;
    keep="head" drops them from the end instead."""
    if keep == "head":
        flipped = _truncate([s[::-1] for s in segments], budget, context_first)
        return [s[::-1] for s in flipped]
    segments = [list(s) for s in segments]
    excess = sum(map(len, segments)) - budget
    if excess > 0 and context_first:
        cut = min(excess, len(segments[0]))
        segments[0] = segments[0][cut:]
        excess -= cut
    while excess > 0:
        i = max(range(len(segments)), key=lambda j: len(segments[j]))
        longest, others = len(segments[i]), [len(s) for j, s in enumerate(segments) if j != i]
        cut = min(excess, max(1, longest - max(others, default=0)))
        segments[i] = segments[i][cut:]
        excess -= cut
    return segments


def windows(tokens: list[int], size: int) -> list[list[int]]:
    """Overlapping windows of `size` tokens covering `tokens`: each starts half a window after the one
    before (more apart when MAX_WINDOWS would be exceeded), the last ends at the last token."""
    if len(tokens) <= size:
        return [tokens]
    span = len(tokens) - size
    count = min(MAX_WINDOWS, math.ceil(span / max(1, size // 2)) + 1)
    starts = sorted({round(i * span / (count - 1)) for i in range(count)})
    return [tokens[i:i + size] for i in starts]


class TaskType:
    """One kind of task. `texts`: text segments an example has (1, or 2 for A and B); `choices`: examples
    carry answers to choose among, the label being the right one's index; `windows`: a long input may
    be read in overlapping windows (long_inputs="windows"), the head reading their features' mean."""

    name = ""
    texts = 1
    choices = False
    windows = False

    def sequences(self, segments: list[list[int]], choices: list[list[int]], marks: tuple[int, int, int],
                  n_ctx: int, long_inputs: str) -> list[list[int]]:
        """The token sequences of one example, each at most n_ctx tokens."""
        raise NotImplementedError

    def features(self, h: torch.Tensor, groups: list[int]) -> torch.Tensor:
        """(N, C) head inputs from (S, C) per-sequence features; groups: sequences per example."""
        if len(groups) == len(h):
            return h
        counts = torch.tensor(groups, device=h.device)  # windows: their mean
        example = torch.repeat_interleave(torch.arange(len(counts), device=h.device), counts)
        summed = h.new_zeros(len(counts), h.size(-1)).index_add(0, example, h)
        return summed / counts[:, None].to(h.dtype)

    def outputs(self, out: torch.Tensor, groups: list[int], regression: bool) -> torch.Tensor:
        """The head's (N, n_outputs) as the loss reads them: logits over labels, or (N,) scores."""
        return out.squeeze(-1) if regression else out

    def n_outputs(self, labels: list[str], regression: bool) -> int:
        return 1 if regression else len(labels)

    def metric(self, labels: list[str], regression: bool) -> str:
        """The validation metric the best checkpoint is chosen by."""
        return "pearson" if regression else "accuracy"

    def roles(self, n: int) -> list[str]:
        """What each of an example's n sequences is, for a reader (`gptn predict --show-inputs`)."""
        return [f"window {i + 1}/{n}" for i in range(n)] if n > 1 else [""]


class Classification(TaskType):
    name, windows = "classification", True

    def sequences(self, segments, choices, marks, n_ctx, long_inputs):
        s, _, e = marks
        if long_inputs == "windows":
            return [[s, *w, e] for w in windows(segments[0], n_ctx - 2)]
        (text,) = _truncate(segments[:1], n_ctx - 2, False, _keep(long_inputs))
        return [[s, *text, e]]


class Entailment(TaskType):
    name, texts, windows = "entailment", 2, True

    def sequences(self, segments, choices, marks, n_ctx, long_inputs):
        s, d, e = marks
        if long_inputs == "windows":  # the hypothesis whole (at most half the context), windows over the premise
            (b,) = _truncate(segments[1:2], (n_ctx - 3) // 2, False)
            return [[s, *w, d, *b, e] for w in windows(segments[0], n_ctx - 3 - len(b))]
        a, b = _truncate(segments[:2], n_ctx - 3, False, _keep(long_inputs))
        return [[s, *a, d, *b, e]]


class Similarity(TaskType):
    """No natural order of A and B: both orderings, their features added (GPT-1)."""

    name, texts = "similarity", 2

    def sequences(self, segments, choices, marks, n_ctx, long_inputs):
        s, d, e = marks
        a, b = _truncate(segments[:2], n_ctx - 3, False, _keep(long_inputs))
        return [[s, *a, d, *b, e], [s, *b, d, *a, e]]

    def features(self, h, groups):
        return h.view(-1, 2, h.size(-1)).sum(1)

    def metric(self, labels, regression):
        return "f1" if not regression and len(labels) == 2 else super().metric(labels, regression)

    def roles(self, n):
        return ["A then B", "B then A"]


class MultipleChoice(TaskType):
    """One sequence per answer, one score each; a softmax over an example's answers."""

    name, choices = "multiple_choice", True

    def sequences(self, segments, choices, marks, n_ctx, long_inputs):
        s, d, e = marks
        seqs = []
        for answer in choices:
            ctx, ans = _truncate([segments[0], answer], n_ctx - 3, True, _keep(long_inputs))
            seqs.append([s, *ctx, d, *ans, e])
        return seqs

    def features(self, h, groups):
        return h

    def outputs(self, out, groups, regression):
        scores = out.new_full((len(groups), max(groups)), float("-inf"))  # examples may have different counts
        flat = out.squeeze(-1)
        start = 0
        for i, k in enumerate(groups):
            scores[i, :k] = flat[start:start + k]
            start += k
        return scores

    def n_outputs(self, labels, regression):
        return 1

    def roles(self, n):
        return [f"choice {i}" for i in range(n)]


def _keep(long_inputs: str) -> str:
    """What truncation keeps: the start of the text for "head", else its end."""
    return "head" if long_inputs == "head" else "tail"


TASK_TYPES = {t.name: t for t in (Classification(), Entailment(), Similarity(), MultipleChoice())}

__all__ = ["TASK_TYPES", "TaskType", "MAX_WINDOWS", "windows"]
