"""A GPT's output is a probability for every next token: show it, and sample from it.

- `next_token_probs` / `word_probs`: the top-k next tokens after a prompt, or chosen words, with their
  probabilities.
- `generate`: several prompts of different lengths batched together (left padding + attention mask),
  a KV cache, streaming, and a sliding window once the context is full; each token chosen as
  `SamplingConfig` says (sampling.py). Scoring text is scoring.py's.

An empty prompt starts from the end-of-text token, i.e. "the beginning of a document".
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from .config import GptnError, is_whole, read_text
from .inference import DecodeOptions, decode_step
from .model import GPT, KVCache, prompt_limit, require_decoder, slide_keep
from .options import option, positive
from .sampling import SamplingConfig, StopWatcher, choose_tokens, logit_bias_tensor
from .scoring import loglikelihood_tokens


def _device_of(model: GPT) -> torch.device:
    return model.wte.weight.device


def encode_prompt(tokenizer, prompt: str | list[int]) -> list[int]:
    """Token ids of a prompt; an empty prompt becomes [end-of-text]. Ids outside the vocabulary are an error."""
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, allow_special=True)
    elif isinstance(prompt, (list, tuple)) and all(is_whole(i) for i in prompt):
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
    step = decode_step(model, B)  # rows without padding share a position: the lean step
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
        if step is not None and not padded:
            logits = step(nxt, cache)
        else:
            logits = model(nxt[:, None], position_ids=next_pos if padded else None,
                           attention_mask=mask if padded else None, cache=cache)[:, -1]
        next_pos = next_pos + 1
    return out


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
    if not is_whole(num_samples) or num_samples < 1:
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


@dataclass(kw_only=True)
class GenerateOptions(DecodeOptions):
    """`gptn generate` (its sampling options are SamplingConfig's)."""

    prompt: list[str] = option(help="prompt (repeatable; empty = start of a document)", factory=list)
    prompt_file: list[str] = option(help="a UTF-8 file whose whole text is a prompt (repeatable; - reads standard "
                                         "input)", factory=list)
    num_samples: int = option(1, "samples per prompt", parse=positive(int))
    stream: bool = option(True, "print each sample when it is complete")


def print_generations(o: GenerateOptions, sampling: SamplingConfig) -> None:
    """`gptn generate`: one row streams to stdout as it is produced (notices on stderr start on a line
    of their own); several rows print each sample when it is complete."""
    prompts = o.prompt + [read_text(f, "--prompt-file") for f in o.prompt_file] or [""]
    model, tokenizer = o.load()
    require_decoder(model, "generate text")  # before any output is streamed
    if len(prompts) * o.num_samples > 1 or not o.stream:
        for p, samples in zip(prompts, generate(model, tokenizer, prompts, sampling, o.num_samples)):
            for i, text in enumerate(samples):
                print(f"--- prompt {p!r}, sample {i + 1} ---\n{p + text}")
        return
    print(prompts[0], end="", flush=True)
    mid_line = bool(prompts[0]) and not prompts[0].endswith("\n")

    def show(_row, text):
        nonlocal mid_line
        print(text, end="", flush=True)
        mid_line = not text.endswith("\n") if text else mid_line

    def warn(message):
        nonlocal mid_line
        print(("\n" if mid_line else "") + f"gptn: {message}", file=sys.stderr, flush=True)
        mid_line = False
    generate(model, tokenizer, prompts, sampling, stream=show, warn=warn)
    print()


@dataclass(kw_only=True)
class NextOptions(DecodeOptions):
    """`gptn next`."""

    prompt: str = option(help="the text so far, e.g. \"After running I am\" (a BERT run: a text with one [MASK], "
                              "e.g. \"the cat [MASK] on the mat\")", cli="positional")
    top: int = option(5, "how many tokens to show", parse=positive(int))
    words: str | None = option(None, "comma-separated continuations to score as well, e.g. tired,hot,thirsty (a word "
                                     "of several tokens: the product of its tokens' probabilities)")
    json: bool = option(False, "print [{token, id, prob}, ...] (with --words: {\"top\": [...], \"words\": [{word, "
                               "tokens, prob}, ...]})")


def show_next(o: NextOptions) -> None:
    """`gptn next`: the top tokens after a prompt (a BERT run: at its [MASK]) and the named words."""
    from .bert import fill_mask
    words = [w.strip() for w in (o.words or "").split(",") if w.strip()]
    if o.words is not None and not words:
        raise GptnError("--words: expected comma-separated words, e.g. --words tired,hot")
    model, tokenizer = o.load()
    causal = model.config.causal
    if causal:
        rows, named = next_token_probs(model, tokenizer, o.prompt, o.top), word_probs(model, tokenizer, o.prompt, words)
    else:  # BERT: the masked word, read from both sides
        filled = fill_mask(model, tokenizer, o.prompt, o.top, words)
        rows, named = filled["top"], filled["words"]
    print(json.dumps({"top": rows, "words": named} if words else rows, ensure_ascii=False) if o.json else
          "\n".join(format_probabilities(rows, named, o.prompt, causal)))


def format_probabilities(rows: list[dict], named: list[dict], prompt: str, causal: bool = True) -> list[str]:
    """`gptn next`: the top tokens with bars, then the named words with their rank and share."""
    percent = lambda p: f"{p:.2%}" if p >= 5e-5 else f"{p:.2e}"  # noqa: E731  # never a bare 0.00%
    bar = lambda fraction: "█" * round(fraction * 40)  # noqa: E731
    lines = [f"after {prompt!r}:" if causal else f"at [MASK] in {prompt!r} (both sides read):"]
    lines += [f"  {r['token']!r:<16} {percent(r['prob']):>9}  {bar(r['prob'])}" for r in rows]
    if named:
        lines.append("named words: probability, rank in the vocabulary, share among the named words "
                     "(several tokens: the product of their probabilities)")
        lines += [f"  {r['word']!r:<16} {percent(r['prob']):>9}  rank {r['rank']:<7,} share {r['share']:6.1%}  "
                  f"{bar(r['share'])}" + (f"  ({r['tokens']} tokens)" if r["tokens"] > 1 else "") for r in named]
    return lines
