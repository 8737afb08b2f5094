"""The one scorer: log P(continuation | context), batched over a KV cache, which `score` (perplexity
and bits per byte of a text), `word_probs`, few-shot evaluation, lm-eval and the server's echo all use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import GptnError, read_text, require_one_input
from .inference import DecodeOptions
from .options import option, positive
from .model import GPT, KVCache, require_decoder


def fit_window(ctx: list[int], cont: list[int], n_ctx: int) -> tuple[list[int], list[int], bool]:
    """(context, continuation, whether either was cut) that fit one window of n_ctx + 1 tokens (the
    first token is only read). Like lm-evaluation-harness, the context loses its start; a
    continuation longer than the window keeps its last n_ctx tokens, scored after the one before them."""
    if len(cont) >= n_ctx + 1:
        window = cont[-(n_ctx + 1):]
        return window[:1], window[1:], True
    keep = n_ctx + 1 - len(cont)
    return ctx[-keep:], cont, len(ctx) > keep


@dataclass
class ContinuationScore:
    logprobs: list[float]  # log P(token | context and the continuation before it), one per token scored
    greedy: bool  # whether greedy decoding from the context would produce the continuation
    top: list[list[tuple[int, float]]] | None = None  # per token: the `top` likeliest (id, log-prob)

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))


@torch.no_grad()
def score_continuations(model: GPT, requests: list[tuple[list[int], list[int]]], batch_size: int = 32,
                        top: int = 0) -> list[ContinuationScore]:
    """Score each continuation after its context, batched.

    Requests that share a context read it once: the contexts of a batch are run together (right-padded),
    their keys and values are copied to one row per continuation, and only the positions that predict
    continuation tokens go through the vocabulary projection. What does not fit the window is cut as
    `fit_window` says (only the tokens kept are scored).
    """
    require_decoder(model, "score text")
    n_ctx = model.config.n_ctx
    prepared = []
    for ctx, cont in requests:
        if not cont:
            raise GptnError("a continuation must have at least one token")
        if not ctx:
            raise GptnError("a continuation is scored after a context of at least one token")
        ctx, cont, _ = fit_window(list(ctx), list(cont), n_ctx)
        prepared.append((tuple(ctx), cont))
    groups: dict[tuple, list[int]] = {}
    for i, (ctx, _) in enumerate(prepared):
        groups.setdefault(ctx, []).append(i)
    order = sorted(groups, key=len, reverse=True)  # similar lengths together: less padding
    results: list = [None] * len(requests)
    start = 0
    while start < len(order):
        chunk, rows = [], 0
        while start < len(order) and (not chunk or rows + len(groups[order[start]]) <= batch_size):
            chunk.append(order[start])
            rows += len(groups[order[start]])
            start += 1
        _score_chunk(model, chunk, groups, prepared, results, top)
    return results


def _score_chunk(model: GPT, contexts: list[tuple], groups: dict, prepared: list, results: list, top: int) -> None:
    device = model.wte.weight.device
    B, L = len(contexts), max(map(len, contexts))
    ctx_len = torch.tensor([len(c) for c in contexts], device=device)
    ids = torch.zeros(B, L, dtype=torch.long, device=device)
    for g, c in enumerate(contexts):
        ids[g, :len(c)] = torch.tensor(c)
    ctx_mask = torch.arange(L, device=device)[None] < ctx_len[:, None]  # (B, L)
    members = [(g, i) for g, c in enumerate(contexts) for i in groups[c]]
    tail = max(len(prepared[i][1]) for _, i in members) - 1  # continuation tokens fed back in
    cache = KVCache(model.config, B, L + tail, device=device, dtype=model.wte.weight.dtype)
    h = model.hidden_states(ids, attention_mask=ctx_mask if B > 1 else None, cache=cache)  # (B, L, C)
    first = F.log_softmax(model.tied_logits(h[torch.arange(B, device=device), ctx_len - 1]).float(), -1)  # (B, V)
    cont_lp = None
    if tail > 0:
        row_group = torch.tensor([g for g, _ in members], device=device)
        x = torch.zeros(len(members), tail, dtype=torch.long, device=device)
        valid = torch.zeros(len(members), tail, dtype=torch.bool, device=device)
        for r, (_, i) in enumerate(members):
            cont = prepared[i][1]
            x[r, :len(cont) - 1] = torch.tensor(cont[:-1])
            valid[r, :len(cont) - 1] = True
        # Padding slots past a short continuation may run beyond the window; their outputs are unused.
        positions = (ctx_len[row_group, None] + torch.arange(tail, device=device)[None]).clamp(max=model.config.n_ctx - 1)
        mask = torch.cat([ctx_mask[row_group], valid], dim=1)
        h2 = model.hidden_states(x, position_ids=positions, attention_mask=mask, cache=cache.select(row_group))
        cont_lp = F.log_softmax(model.tied_logits(h2[valid]).float(), -1)  # only the rows that predict a token
    offset = 0
    for g, i in members:
        cont = prepared[i][1]
        rows = first[g:g + 1] if cont_lp is None else torch.cat([first[g:g + 1], cont_lp[offset:offset + len(cont) - 1]])
        offset += len(cont) - 1
        target = torch.tensor(cont, device=device)
        token_lp = rows.gather(1, target[:, None]).squeeze(1)
        alternatives = None
        if top:
            v, t = rows.topk(min(top, rows.size(-1)), -1)
            alternatives = [list(zip(a, b)) for a, b in zip(t.tolist(), v.tolist())]
        results[i] = ContinuationScore(token_lp.tolist(), bool((rows.argmax(-1) == target).all()), alternatives)


def loglikelihood_tokens(model: GPT, requests: list[tuple[list[int], list[int]]], batch_size: int = 32
                         ) -> list[tuple[float, bool, int]]:
    """(log P(continuation | context), whether greedy decoding would produce it, its token count):
    lm-evaluation-harness's view of `score_continuations`."""
    return [(r.total, r.greedy, len(r.logprobs)) for r in score_continuations(model, requests, batch_size)]


@dataclass
class Score:
    tokens: list[int]
    logprobs: list[float]  # natural log P(token | everything before it)
    n_bytes: int

    @property
    def total_logprob(self) -> float:
        return float(sum(self.logprobs))

    @property
    def perplexity(self) -> float:
        return math.exp(-self.total_logprob / max(1, len(self.logprobs)))

    @property
    def bits_per_byte(self) -> float:
        return -self.total_logprob / math.log(2) / max(1, self.n_bytes)

    def report(self, tokenizer, per_token: bool = False, as_json: bool = False) -> str:
        """What `gptn score` prints: a JSON object, or a line of totals (each token's log-probability first)."""
        pieces = [tokenizer.decode([t]) for t in self.tokens] if per_token else []
        if as_json:
            import json
            summary = {"tokens": len(self.tokens), "bytes": self.n_bytes, "log_likelihood": self.total_logprob,
                       "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}
            if per_token:
                summary["per_token"] = [{"token": piece, "id": t, "logprob": lp}
                                        for piece, t, lp in zip(pieces, self.tokens, self.logprobs)]
            return json.dumps(summary, ensure_ascii=False)
        return "".join(f"{piece!r:<20} {lp:9.4f}\n" for piece, lp in zip(pieces, self.logprobs)) + (
            f"tokens {len(self.tokens):,}  bytes {self.n_bytes:,}  log-likelihood {self.total_logprob:.2f} nats  "
            f"perplexity {self.perplexity:.3f}  bits/byte {self.bits_per_byte:.4f}")


@torch.no_grad()
def score(model: GPT, tokenizer, text: str, stride: int | None = None, batch_size: int = 8) -> Score:
    """Log-probability of every token of `text`, each read after end-of-text (a document start).

    Texts longer than the context are read in overlapping windows: each window moves by `stride`
    tokens (default half the context) and scores only the tokens the previous one did not, so
    every token sees at least n_ctx - stride tokens of context.
    """
    require_decoder(model, "score a text left to right")
    if not text:
        raise GptnError("nothing to score: the text is empty")
    ids = [tokenizer.eot_id] + tokenizer.encode(text)
    n_ctx = model.config.n_ctx
    stride = max(1, n_ctx // 2) if stride is None else stride  # 0 is a mistake, not "the default"
    if not 0 < stride <= n_ctx:
        raise GptnError(f"stride must be in 1..{n_ctx}, got {stride}")
    windows = []  # (context, continuation): each window scores only what the one before it did not
    start, scored_upto = 0, 1
    while scored_upto < len(ids):
        end = min(start + n_ctx + 1, len(ids))
        windows.append((ids[start:scored_upto], ids[scored_upto:end]))
        scored_upto = end
        if end == len(ids):
            break
        start += stride
    logprobs = [lp for r in score_continuations(model, windows, batch_size) for lp in r.logprobs]
    return Score(ids[1:], logprobs, len(text.encode("utf-8")))


@dataclass(kw_only=True)
class ScoreOptions(DecodeOptions):
    """`gptn score`."""

    file: str | None = option(None, "a UTF-8 text file", cli="positional")
    text: str | None = option(None, "the text itself instead of a file")
    stride: int | None = option(None, "window step for texts longer than the context (default n_ctx/2)",
                                parse=positive(int))
    tokens: bool = option(False, "also print every token's log-probability")
    json: bool = option(False, "print JSON instead of text")


def print_score(o: ScoreOptions) -> None:
    """`gptn score`: a file's (or --text's) log-likelihood, perplexity and bits per byte."""
    require_one_input(o.file, o.text)
    text = read_text(o.file, "FILE") if o.file is not None else o.text
    model, tokenizer = o.load()
    print(score(model, tokenizer, text, stride=o.stride).report(tokenizer, o.tokens, o.json))
