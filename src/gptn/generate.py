"""A GPT's output is a probability for every next token: show it, sample from it, score text with it.

- `next_token_probs`: the top-k next tokens after a prompt with their probabilities.
- `generate`: greedy / temperature / top-k / top-p sampling with repetition penalty and stop
  strings, several prompts of different lengths batched together (left padding + attention mask),
  a KV cache, streaming, and a sliding window once the context is full.
- `score`: per-token log-probabilities, total log-likelihood, perplexity and bits per byte.

An empty prompt starts from the end-of-text token, i.e. "the beginning of a document".
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, fields, replace
from typing import Callable

import torch
import torch.nn.functional as F

from .config import GptnError, is_number
from .model import GPT, KVCache, prompt_limit, require_decoder, slide_keep


@dataclass
class SamplingConfig:
    """How to choose each next token. temperature 0 (or greedy=True) takes the most likely token."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    # OpenAI's penalties on the tokens generated so far: logit -= frequency * count + presence * (count > 0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit, in [-100, 100]
    stop: list[str] = field(default_factory=list)
    greedy: bool = False
    seed: int | None = None

    def __post_init__(self):
        if not is_number(self.temperature) or self.temperature < 0:
            raise GptnError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if self.top_p is not None and not (is_number(self.top_p) and 0 < self.top_p <= 1):
            raise GptnError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and not (_is_whole(self.top_k) and self.top_k >= 1):
            raise GptnError(f"top_k must be a whole number >= 1, got {self.top_k!r}")
        if not is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise GptnError(f"repetition_penalty must be a number > 0, got {self.repetition_penalty!r}")
        if not _is_whole(self.max_new_tokens) or self.max_new_tokens < 0:
            raise GptnError(f"max_new_tokens must be a whole number >= 0, got {self.max_new_tokens!r}")
        if self.seed is not None and not (_is_whole(self.seed) and 0 <= self.seed < 2**63):
            raise GptnError(f"seed must be a whole number in [0, 2**63), got {self.seed!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not (is_number(getattr(self, name)) and -2 <= getattr(self, name) <= 2):
                raise GptnError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not isinstance(self.logit_bias, dict):
            raise GptnError(f"logit_bias must be a dict of token id -> bias, got {type(self.logit_bias).__name__}")
        for token, bias in self.logit_bias.items():
            if not (_is_whole(token) and token >= 0):
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


def _is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _device_of(model: GPT) -> torch.device:
    return model.wte.weight.device


def encode_prompt(tokenizer, prompt: str | list[int]) -> list[int]:
    """Token ids of a prompt; an empty prompt becomes [end-of-text]. Ids outside the vocabulary are an error."""
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, allow_special=True)
    elif isinstance(prompt, (list, tuple)) and all(_is_whole(i) for i in prompt):
        ids = list(prompt)
        bad = [i for i in ids if not 0 <= i < tokenizer.vocab_size]
        if bad:
            raise GptnError(f"token id {bad[0]} is outside the vocabulary (0..{tokenizer.vocab_size - 1})")
    else:
        raise GptnError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")
    return ids or [tokenizer.eot_id]


@torch.no_grad()
def next_token_distribution(model: GPT, tokenizer, prompt: str) -> torch.Tensor:
    """P(next token | prompt) over the whole vocabulary, (V,) float32."""
    require_decoder(model, "predict the next token")
    ids = encode_prompt(tokenizer, prompt)[-model.config.n_ctx:]
    x = torch.tensor([ids], device=_device_of(model))
    return F.softmax(model(x, last_only=True)[0, -1].float(), dim=-1)


@torch.no_grad()
def next_token_probs(model: GPT, tokenizer, prompt: str, top: int = 5) -> list[dict]:
    """The `top` most likely next tokens after `prompt`: [{"token", "id", "prob"}, ...]."""
    probs = next_token_distribution(model, tokenizer, prompt)
    p, i = probs.topk(min(top, probs.numel()))
    return [{"token": tokenizer.decode([t]), "id": t, "prob": q} for t, q in zip(i.tolist(), p.tolist())]


@torch.no_grad()
def word_probs(model: GPT, tokenizer, prompt: str, words: list[str]) -> list[dict]:
    """P(word | prompt) for named continuations ("tired", "hot", ...): a word of several tokens gets
    the product of its tokens' probabilities, each given the prompt and the tokens before it. A
    word follows the prompt after one space, unless the prompt already ends with whitespace.

    Each row also has the word's `rank` (its first token's place in the whole vocabulary after the
    prompt, 1 = most likely) and its `share` of the named words' total probability: the lecture's
    view ("tired 40%, hot 30%, ...") is the share, since a real model spreads most of its mass over
    thousands of other tokens."""
    context = encode_prompt(tokenizer, prompt)
    sep = "" if not prompt or prompt[-1].isspace() else " "
    conts = [tokenizer.encode(sep + w) for w in words]
    for w, c in zip(words, conts):
        if not c:
            raise GptnError(f"--words: {w!r} has no tokens")
    scored = loglikelihood_tokens(model, [(context, c) for c in conts])
    first = next_token_distribution(model, tokenizer, prompt)
    # A sum of exps that underflows (every word below ~1e-308) gives each an equal share.
    logs = torch.tensor([lp for lp, _, _ in scored], dtype=torch.float64)
    shares = torch.softmax(logs, 0).tolist()
    return [{"word": w, "tokens": n, "prob": math.exp(lp), "share": share,
             "rank": int((first > first[c[0]]).sum()) + 1, "greedy": greedy}
            for w, c, (lp, greedy, n), share in zip(words, conts, scored, shares)]


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
        nxt = logits.argmax(-1)
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


@torch.no_grad()
def generate_ids(model: GPT, prompts: list[list[int]], sampling: SamplingConfig, pad_id: int = 0,
                 on_token: Callable[..., bool | None] | None = None,
                 warn: Callable[[str], None] | None = None, logprobs: int | None = None) -> list[list[int]]:
    """New token ids for each prompt (batched). `on_token(row, id)` may return True to stop that row.

    With `logprobs=N`, on_token gets a third argument: (the token's log-probability, the N most likely
    tokens as [(id, logprob)]), from the model's distribution before temperature and filtering.
    """
    require_decoder(model, "generate text")
    device = _device_of(model)
    n_ctx = model.config.n_ctx
    if not prompts:
        return []
    said = set()

    def say_once(msg):
        if msg not in said:
            said.add(msg)
            (warn or (lambda m: print(f"gptn: {m}", file=sys.stderr)))(msg)

    keep = slide_keep(n_ctx)
    trimmed = []
    for p in prompts:
        limit = prompt_limit(n_ctx, sampling.max_new_tokens > 0)
        if len(p) > limit:
            if sampling.max_new_tokens > 0:
                say_once(f"the prompt is longer than the context window allows ({len(p)} > {limit} tokens); "
                         "only its last tokens are read")
            p = p[-limit:]
        trimmed.append(p)
    B = len(trimmed)
    S = max(len(p) for p in trimmed)
    tokens = torch.full((B, S), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, S), dtype=torch.long, device=device)
    for r, p in enumerate(trimmed):
        tokens[r, S - len(p):] = torch.tensor(p, device=device)
        mask[r, S - len(p):] = 1
    padded = bool((mask == 0).any())
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cache = KVCache(model.config, B, n_ctx, device=device, dtype=model.wte.weight.dtype)
    V = model.config.vocab_size
    bias = logit_bias_tensor(sampling, V, device)
    penalised = sampling.presence_penalty != 0 or sampling.frequency_penalty != 0
    counts = torch.zeros((B, V), device=device) if penalised else None

    def prefill(tokens, mask):
        cache.length = 0
        pos = (mask.cumsum(-1) - 1).clamp(min=0) if padded else None
        return model(tokens, position_ids=pos, attention_mask=mask if padded else None, cache=cache,
                     last_only=True)[:, -1]

    logits = prefill(tokens, mask)
    next_pos = mask.sum(-1, keepdim=True)  # position id of the next token, per row
    for _ in range(sampling.max_new_tokens):
        nxt, (model_lp, top_lp, top_id) = choose_tokens(logits, sampling, tokens, counts, bias, generator, logprobs)
        for r, t in enumerate(nxt.tolist()):
            if done[r]:
                continue
            out[r].append(t)
            if on_token is None:
                continue
            if logprobs is not None:
                info = (model_lp[r, t].item(), list(zip(top_id[r].tolist(), top_lp[r].tolist()))[:logprobs])
                stop = on_token(r, t, info)
            else:
                stop = on_token(r, t)
            if stop:
                done[r] = True
        if bool(done.all()):
            break
        if penalised:
            counts[torch.arange(B, device=device), nxt] += 1
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], dim=1)
        if cache.length + 1 > n_ctx:  # the context is full: slide the window and recompute the cache
            say_once(f"prompt plus output exceed the context window of {n_ctx} tokens; sliding the window "
                     f"(the model now sees the last {keep} tokens)")
            tokens, mask = tokens[:, -keep:], mask[:, -keep:]
            padded = bool((mask == 0).any())
            logits = prefill(tokens, mask)
            next_pos = mask.sum(-1, keepdim=True)
            continue
        pos = next_pos if padded else None
        logits = model(nxt[:, None], position_ids=pos, attention_mask=mask if padded else None, cache=cache)[:, -1]
        next_pos = next_pos + 1
    return out


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


def generate(model: GPT, tokenizer, prompts: list[str], sampling: SamplingConfig | None = None,
             num_samples: int = 1, stream: Callable[[int, str], None] | None = None,
             warn: Callable[[str], None] | None = None, batch_size: int = 64) -> list[list[str]]:
    """Continuations of each prompt: `num_samples` texts per prompt, decoded `batch_size` rows at a
    time (memory stays bounded whatever the count).

    `stream(row, text)` receives text as it is produced (row = prompt_index * num_samples + sample).
    Generation of a row stops at end-of-text or at the first stop string (which is not included).
    `warn(message)` receives notices (the prompt or output outgrew the context); default: stderr.
    """
    sampling = sampling or SamplingConfig()
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):  # a str would be one prompt per character
        raise GptnError(f"prompts is a list of strings (or of token-id lists); got {type(prompts).__name__}: "
                        "write [prompt] for one")
    if not isinstance(sampling, SamplingConfig):
        raise GptnError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
    if not _is_whole(num_samples) or num_samples < 1:
        raise GptnError(f"num_samples must be a whole number >= 1, got {num_samples!r}")
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    rows = len(prompts) * num_samples
    texts = []
    for start in range(0, rows, batch_size):
        ids = [encoded[r // num_samples] for r in range(start, min(rows, start + batch_size))]
        chunk_stream = None if stream is None else (lambda row, text, start=start: stream(start + row, text))
        watcher = StopWatcher(tokenizer, len(ids), sampling.stop, chunk_stream)
        chunk_sampling = sampling if sampling.seed is None or not start else \
            replace(sampling, seed=(sampling.seed + start) % 2**63)  # later chunks must not repeat the first's draws
        generate_ids(model, ids, chunk_sampling, pad_id=tokenizer.eot_id, on_token=watcher, warn=warn)
        texts += watcher.finish()
    return [texts[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]


# ----------------------------------------------------------------------------------------------
# The one scorer: log P(continuation | context), used by score, word_probs, few-shot, lm-eval and
# the server's echo


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
    device = _device_of(model)
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
