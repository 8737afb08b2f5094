"""A run's model drawn the way the lecture draws it (`gptn inspect`), and the token sequences GPT-1's
input transformations build for a task (`gptn predict --show-inputs`, finetune's first lines).

    h0  = U·W_e + W_p               the token and position embeddings
    h_l = block(h_{l-1}), l = 1..n  pre-LN (GPT-2/3) or post-LN (GPT-1) blocks, causal or bidirectional
    P(u) = softmax(h_n·W_e^T)       the same W_e again: the tied softmax layer
"""

from __future__ import annotations

import torch

from .model import GPT


def parameter_parts(model: GPT) -> dict[str, int]:
    """Parameters per part of the lecture's picture (W_e, W_p, segment embeddings, blocks, final LN)."""
    parts = {"W_e (token embeddings, also the softmax layer)": model.wte.weight.numel(),
             "W_p (position embeddings)": model.wpe.weight.numel()}
    if model.config.segment_embeddings:
        parts["segment embeddings (A/B)"] = model.wse.weight.numel()
    parts[f"blocks ({model.config.n_layer} x {sum(p.numel() for p in model.h[0].parameters()):,})"] = \
        sum(p.numel() for p in model.h.parameters())
    if model.ln_f is not None:
        parts["final LayerNorm"] = sum(p.numel() for p in model.ln_f.parameters())
    return parts


def attention_mask(model: GPT, length: int) -> torch.Tensor:
    """(T, T) booleans: may position i (row) attend to position j (column)? The model's own mask
    builder, for one unpadded input; a GPT-3 sparse model's banded layers are not drawn."""
    mask = model._attention_mask(length, 0, torch.ones(1, length, dtype=torch.bool), torch.device("cpu"))
    return (mask["dense"] if isinstance(mask, dict) else mask)[0, 0]


def draw_mask(mask: torch.Tensor, labels: list[str]) -> list[str]:
    """The mask as a grid: ■ may attend, · may not (rows: the position reading; columns: what it reads)."""
    width = max(2, *(len(x) for x in labels))
    lines = [" " * (width + 1) + " ".join(x[:width].rjust(width) for x in labels)]
    for label, row in zip(labels, mask.tolist()):
        lines.append(label[:width].rjust(width) + " " + " ".join(("■" if v else "·").rjust(width) for v in row))
    return lines


def describe_model(model: GPT, tokenizer, text: str, task_spec=None) -> dict:
    """What `gptn inspect` prints, as data: shapes, equations, block order, parameters, the mask."""
    c = model.config
    ids = tokenizer.encode(text)[:c.n_ctx] if tokenizer is not None else list(range(min(6, c.n_ctx)))
    labels = [(tokenizer.decode([i]) if tokenizer is not None else str(i)).replace(" ", "␣").replace("\n", "⏎")
              for i in ids]
    mask = attention_mask(model, len(ids))
    block = ("x = x + attn(LN(x)); x = x + mlp(LN(x))   (pre-LN, GPT-2/3)" if c.norm == "pre" else
             "x = LN(x + attn(x)); x = LN(x + mlp(x))   (post-LN, GPT-1)")
    equations = [
        f"h0 = U·W_e + W_p{' + S·W_s' if c.segment_embeddings else ''}    U: T token ids ({c.vocab_size:,}-way one-hot), "
        f"W_e: {c.vocab_size:,} x {c.d_model}, W_p: {c.n_ctx} x {c.d_model}  ->  h0: T x {c.d_model}",
        f"h_l = block(h_(l-1)), l = 1..{c.n_layer}    {block}; attention: {c.n_head} heads x {c.d_head}, "
        f"{'causal (each position sees itself and the past)' if c.causal else 'bidirectional (every position sees every other)'}"
        + (f", odd layers banded to {c.sparse_band} tokens (GPT-3 sparse)" if c.attention == "sparse" else "")
        + f"; MLP {c.d_model} -> {c.d_ff} -> {c.d_model}",
        (f"h_n = LN(h_{c.n_layer})    the final LayerNorm (GPT-2/3)" if model.ln_f is not None else
         f"h_n = h_{c.n_layer}    no final LayerNorm (GPT-1)"),
        f"P(u) = softmax(h_n·W_e^T)    T x {c.d_model} times {c.d_model} x {c.vocab_size:,}: the same W_e as the input "
        "(tied)" + ("" if c.causal else "; BERT reads it at masked positions only"),
    ]
    out = {"arch": "GPT (decoder)" if c.causal else "BERT-style encoder", "config": c.to_dict(),
           "equations": equations, "parameters": parameter_parts(model), "total_parameters": model.num_parameters(),
           "mask_input": labels, "mask": mask.int().tolist(), "causal": c.causal}
    if task_spec is not None:
        n_out = task_spec.n_outputs
        out["head"] = {"task": task_spec.task, "reads": "h_n averaged over the input" if task_spec.pooling == "mean"
                       else ("h_n at [CLS]" if not c.causal else "h_n at the extract token"),
                       "linear": f"{c.d_model} -> {n_out}", "labels": task_spec.labels,
                       "regression": task_spec.regression, "long_inputs": task_spec.long_inputs,
                       "parameters": c.d_model * n_out + n_out}
    return out


def format_model(info: dict, name: str) -> list[str]:
    lines = [f"{name}: {info['arch']}, {info['total_parameters']:,} parameters", ""]
    lines += [f"  {e}" for e in info["equations"]]
    lines += ["", "parameters:"]
    lines += [f"  {k:<48} {v:>14,}" for k, v in info["parameters"].items()]
    if "head" in info:
        h = info["head"]
        lines += ["", f"fine-tuned head ({h['task']}): linear {h['linear']} on {h['reads']}, {h['parameters']:,} "
                      f"parameters" + (f"; labels {', '.join(h['labels'])}" if h["labels"] else "")
                      + f"; inputs longer than the context: {h['long_inputs']}"]
    lines += ["", f"attention mask for {''.join(info['mask_input']).replace('␣', ' ')!r} ("
              + ("causal: lower-triangular" if info["causal"] else "bidirectional: full") + "; ■ may attend):"]
    lines += ["  " + ln for ln in draw_mask(torch.tensor(info["mask"], dtype=torch.bool), info["mask_input"])]
    return lines


def describe_inputs(spec, example, tokenizer, config) -> list[str]:
    """The token sequences built for `example`, one line each, special tokens named (GPT-1 §3.3)."""
    seqs = spec.sequences(example, tokenizer, config)
    names = spec.kind.roles(len(seqs))
    return [f"{name + ': ' if name else ''}{tokenizer.decode(s)!r} ({len(s)} tokens)" for name, s in zip(names, seqs)]


__all__ = ["parameter_parts", "attention_mask", "draw_mask", "describe_model", "format_model", "describe_inputs"]
