"""How each next token is chosen from the logits, as vLLM splits it: `SamplingConfig` (the one place
sampling values are validated, and the batching key derived from its fields), the logit processors
(logit bias, OpenAI's presence / frequency penalties, CTRL's repetition penalty, temperature, top-k,
top-p) in `choose_tokens`, and `StopWatcher`, which ends a row at end-of-text or a stop string.
`gptn generate`, the serving engine and few-shot generation all sample through this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Callable

import torch
import torch.nn.functional as F

from .config import GptnError, is_number, is_whole
from .options import option


def unescape(text: str) -> str:
    """The escapes a shell user types for a stop string (`--stop "\\n"`): \\n, \\t, \\r and \\\\."""
    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[m.group(1)], text)


@dataclass
class SamplingConfig:
    """How to choose each next token. temperature 0 (or greedy=True) takes the most likely token."""

    max_new_tokens: int = option(64, "tokens to generate per sample")
    temperature: float = option(1.0, "0 = greedy")
    top_k: int | None = option(None, "sample among the k most likely tokens only")
    top_p: float | None = option(None, "nucleus sampling: keep the smallest set of tokens with this mass")
    repetition_penalty: float = option(1.0, "divide the logits of tokens already present (CTRL's penalty; 1 = off)")
    presence_penalty: float = option(0.0, "subtract this from the logit of every token generated so far (OpenAI's)")
    frequency_penalty: float = option(0.0, "subtract this times its count from the logit of every token generated "
                                           "so far (OpenAI's)")
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit, in [-100, 100]
    stop: list[str] = option(help="stop string (repeatable; \\n, \\t, \\r and \\\\ as a shell user types them)",
                             factory=list, parse=unescape)
    greedy: bool = option(False, "always take the most likely token")
    seed: int | None = option(None, "seed for reproducible sampling")

    def __post_init__(self):
        if not is_number(self.temperature) or self.temperature < 0:
            raise GptnError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if self.top_p is not None and not (is_number(self.top_p) and 0 < self.top_p <= 1):
            raise GptnError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and not (is_whole(self.top_k) and self.top_k >= 1):
            raise GptnError(f"top_k must be a whole number >= 1, got {self.top_k!r}")
        if not is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise GptnError(f"repetition_penalty must be a number > 0, got {self.repetition_penalty!r}")
        if not is_whole(self.max_new_tokens) or self.max_new_tokens < 0:
            raise GptnError(f"max_new_tokens must be a whole number >= 0, got {self.max_new_tokens!r}")
        if self.seed is not None and not (is_whole(self.seed) and 0 <= self.seed < 2**63):
            raise GptnError(f"seed must be a whole number in [0, 2**63), got {self.seed!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not (is_number(getattr(self, name)) and -2 <= getattr(self, name) <= 2):
                raise GptnError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not isinstance(self.logit_bias, dict):
            raise GptnError(f"logit_bias must be a dict of token id -> bias, got {type(self.logit_bias).__name__}")
        for token, bias in self.logit_bias.items():
            if not (is_whole(token) and token >= 0):
                raise GptnError(f"logit_bias: {token!r} is not a token id")
            if not (is_number(bias) and -100 <= bias <= 100):
                raise GptnError(f"logit_bias: the bias of token {token} must be in [-100, 100], got {bias!r}")
        if isinstance(self.stop, str):  # one stop string, as OpenAI's `stop` takes it (not its characters)
            self.stop = [self.stop]
        if not (isinstance(self.stop, (list, tuple)) and all(isinstance(x, str) and x for x in self.stop)):
            raise GptnError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if not isinstance(self.greedy, bool):
            raise GptnError(f"greedy must be True or False, got {self.greedy!r}")
        if self.temperature == 0:
            self.greedy = True

    # Fields that do not change how a step chooses among the logits: when a row ends, and its random stream.
    PER_ROW = ("max_new_tokens", "stop", "seed")

    def batch_key(self) -> tuple:
        """What rows must share to choose their next tokens in one batched call: every field but
        PER_ROW, read from the dataclass's fields, so that a new sampling option is part of it by itself."""
        def hashable(v):
            return tuple(sorted(v.items())) if isinstance(v, dict) else tuple(v) if isinstance(v, list) else v
        return tuple((f.name, hashable(getattr(self, f.name))) for f in fields(self) if f.name not in self.PER_ROW)


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the nucleus (smallest set with mass >= top_p)."""
    if top_k is not None and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already enough
        drop_sorted[..., 0] = False  # the most likely token always stays (a top_p near 0 rounds to 0 in float32)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019): make tokens already in the sequence less likely."""
    scores = logits.gather(-1, seen)
    scores = torch.where(scores > 0, scores / penalty, scores * penalty)
    big = torch.finfo(scores.dtype).max  # an extreme penalty overflows to inf, and inf - inf is nan downstream
    return logits.scatter(-1, seen, scores.clamp(-big, big))


def choose_tokens(logits: torch.Tensor, sampling: SamplingConfig, seen: torch.Tensor | None = None,
                  counts: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                  generator: torch.Generator | None = None, logprobs: int | None = None):
    """The next token of each row from its logits (B, V) under `sampling`: logit bias, OpenAI's
    penalties (`counts` (B, V) of the tokens generated so far), the repetition penalty (`seen` (B, L),
    the tokens so far), then greedy or temperature / top-k / top-p sampling with `generator`.

    Returns (tokens (B,), (log-probabilities (B, V), top log-probabilities, their ids)), the last three
    from the model's distribution before any of that, and only with `logprobs=N` (else None).
    """
    logits = logits.float()
    model_lp = top_lp = top_id = None
    if logprobs is not None:
        model_lp = F.log_softmax(logits, dim=-1)
        top_lp, top_id = model_lp.topk(max(1, min(logprobs, model_lp.size(-1))), dim=-1)
    if bias is not None:
        logits = logits + bias
    if counts is not None:
        logits = logits - sampling.frequency_penalty * counts - sampling.presence_penalty * (counts > 0)
    if sampling.repetition_penalty != 1.0:
        logits = _apply_repetition_penalty(logits, seen, sampling.repetition_penalty)
    if sampling.greedy:
        nxt = logits.max(-1).indices  # argmax's first-maximum rule, in 60% of its time on a CPU (50,257 logits)
    else:
        # Shifted so the largest is 0, and the temperature kept above float32's smallest normal (a
        # smaller one rounds to 0): a tiny temperature then gives 0 and -inf, never nan.
        temperature = max(sampling.temperature, torch.finfo(torch.float32).tiny)
        scaled = (logits - logits.amax(-1, keepdim=True)) / temperature
        logits = filter_logits(scaled, sampling.top_k, sampling.top_p)
        nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)
    return nxt, (model_lp, top_lp, top_id)


def logit_bias_tensor(sampling: SamplingConfig, vocab_size: int, device=None) -> torch.Tensor | None:
    """`sampling.logit_bias` as a (V,) tensor to add to the logits (None without one)."""
    bad = [t for t in sampling.logit_bias if t >= vocab_size]
    if bad:
        raise GptnError(f"logit_bias: token {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
    if not sampling.logit_bias:
        return None
    bias = torch.zeros(vocab_size, device=device)
    bias[list(sampling.logit_bias)] = torch.tensor(list(sampling.logit_bias.values()), dtype=bias.dtype, device=device)
    return bias


class StopWatcher:
    """Decodes each row incrementally; stops a row at end-of-text or when a stop string appears."""

    def __init__(self, tokenizer, rows: int, stop: list[str], stream: Callable[[int, str], None] | None):
        self.tokenizer, self.stop, self.stream = tokenizer, stop, stream
        self.ids = [[] for _ in range(rows)]
        self.text = [""] * rows
        self.emitted = [0] * rows
        self.hold = max((len(s) for s in stop), default=1) - 1

    def __call__(self, row: int, token: int) -> bool:
        if token == self.tokenizer.eot_id:
            self._flush(row, final=True)
            return True
        self.ids[row].append(token)
        before = len(self.text[row])
        self.text[row] = self.tokenizer.decode(self.ids[row])
        # Only the new tail can hold a stop string that was not there before: a match may start up to
        # hold characters back, one more for a character the last token completed (its bytes split).
        start = max(0, before - self.hold - 1)
        for s in self.stop:
            at = self.text[row].find(s, start)
            if at >= 0:
                self.text[row] = self.text[row][:at]
                self._flush(row, final=True)
                return True
        self._flush(row, final=False)
        return False

    def _flush(self, row: int, final: bool) -> None:
        if self.stream is None:
            return
        text = self.text[row]
        upto = len(text) if final else max(self.emitted[row], len(text) - self.hold)
        if not final and text.endswith("\ufffd"):  # a character cut mid-way: wait for its other bytes
            upto = min(upto, len(text) - 1)
        if upto > self.emitted[row]:
            self.stream(row, text[self.emitted[row]:upto])
            self.emitted[row] = upto

    def finish(self) -> list[str]:
        for r in range(len(self.text)):
            self._flush(r, final=True)
        return self.text


__all__ = ["SamplingConfig", "choose_tokens", "filter_logits", "logit_bias_tensor", "StopWatcher"]
