"""BERT's side of the contrast: the same blocks as a bidirectional encoder, pretrained by masking.

GPT reads left to right and always predicts the next token. BERT (Devlin et al., 2018) uses the
transformer's encoder: every position attends to every other, and the model learns by predicting
tokens hidden anywhere in the text from both sides — 15% of positions are chosen; of those, 80% are
replaced by a mask token, 10% by a random token and 10% left as they are. Inputs start with a
classification token (whose final hidden state fine-tuning reads) and segments are separated by a
separator token, with segment embeddings telling sentence A from B. It cannot generate text.
"""

from __future__ import annotations

import torch

CLS, SEP, MASK = "<|cls|>", "<|sep|>", "<|mask|>"
BERT_SPECIALS = (CLS, SEP, MASK)
MASK_FRACTION, REPLACE_MASK, REPLACE_RANDOM = 0.15, 0.8, 0.1


def mask_tokens(ids: torch.Tensor, tokenizer, generator: torch.Generator | None = None):
    """(inputs, targets) for masked-language modelling of a (B, T) window of corpus tokens.

    Position 0 becomes the classification token; of the other positions, 15% are chosen as targets
    (80% of them shown as the mask token, 10% as a random token, 10% unchanged); every other target
    is -100 (ignored by the loss).
    """
    specials = tokenizer.special_tokens
    cls_id, mask_id = specials[CLS], specials[MASK]
    inputs = ids.clone()
    inputs[:, 0] = cls_id
    u = torch.rand(ids.shape, generator=generator, device="cpu").to(ids.device)
    chosen = u < MASK_FRACTION
    chosen[:, 0] = False
    targets = torch.where(chosen, ids, torch.full_like(ids, -100))
    # Split the chosen positions by where their draw fell inside [0, 0.15): 80% / 10% / 10%.
    to_mask = chosen & (u < MASK_FRACTION * REPLACE_MASK)
    to_random = chosen & ~to_mask & (u < MASK_FRACTION * (REPLACE_MASK + REPLACE_RANDOM))
    inputs[to_mask] = mask_id
    random_ids = torch.randint(0, tokenizer.base_vocab_size, ids.shape, generator=generator, device="cpu")
    inputs[to_random] = random_ids.to(ids.device)[to_random]
    return inputs, targets


def step_generator(seed: int, step: int, rank: int, micro: int) -> torch.Generator:
    """The masking randomness of one micro-batch: a pure function of its place in training, so that a
    resumed run masks exactly as an uninterrupted one."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + rank) * 101 + micro)


MASK_MARK = "[MASK]"  # how a user writes the masked position (Hugging Face's fill-mask habit)


@torch.no_grad()
def fill_mask(model, tokenizer, text: str, top: int = 5, words: list[str] | None = None) -> dict:
    """BERT's view of a masked word: P(token at [MASK] | the words before *and after* it). `text` holds
    one [MASK] (or the tokenizer's own mask token). Returns {"top": [{token, id, prob}], "words":
    [{word, prob, rank, share}]} (a named word by its first token, its share among the named words)."""
    from .config import GptnError
    if model.config.causal:
        raise GptnError("[MASK] filling needs a BERT-style encoder (--arch bert); a GPT predicts the next token")
    parts = text.replace(MASK, MASK_MARK).split(MASK_MARK)
    if len(parts) != 2:
        raise GptnError(f"a BERT-style encoder cannot predict the next token: give a text with exactly one "
                        f"{MASK_MARK}, e.g. \"the cat {MASK_MARK} on the mat\"")
    left, right = parts[0].rstrip(), parts[1]
    specials = tokenizer.special_tokens
    ids = [specials[CLS], *tokenizer.encode(left), specials[MASK], *tokenizer.encode(right)]
    at = len(tokenizer.encode(left)) + 1
    if len(ids) > model.config.n_ctx:
        raise GptnError(f"the text has {len(ids)} tokens; this model reads at most {model.config.n_ctx}")
    device = model.wte.weight.device
    logits = model(torch.tensor([ids], device=device))[0, at].float()
    logits[tokenizer.base_vocab_size:] = float("-inf")  # a special token is never the answer
    probs = logits.softmax(-1)
    p, i = probs.topk(min(top, tokenizer.base_vocab_size))
    out = {"top": [{"token": tokenizer.decode([t]), "id": t, "prob": q} for t, q in zip(i.tolist(), p.tolist())],
           "words": []}
    sep = " " if parts[0][-1:].isspace() else ""
    firsts = []
    for w in words or []:
        ids_w = tokenizer.encode(sep + w)
        if not ids_w:
            raise GptnError(f"--words: {w!r} has no tokens")
        firsts.append(ids_w[0])
    total = sum(float(probs[t]) for t in firsts) or 1.0
    out["words"] = [{"word": w, "tokens": 1, "prob": float(probs[t]), "share": float(probs[t]) / total,
                     "rank": int((probs > probs[t]).sum()) + 1} for w, t in zip(words or [], firsts)]
    return out


__all__ = ["CLS", "SEP", "MASK", "MASK_MARK", "BERT_SPECIALS", "mask_tokens", "step_generator", "fill_mask"]
