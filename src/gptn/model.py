"""The GPT: a decoder-only transformer with tied input/output embeddings.

    h_0 = U W_e + W_p                      (token + learned position embeddings)
    h_l = block(h_{l-1})   for l = 1..n    (masked self-attention, then an MLP)
    P(u) = softmax(h_n W_e^T)              (the same W_e, transposed)

Parameter names follow Hugging Face / OpenAI (wte, wpe, h.N.ln_1, attn.c_attn, ...), so that
import and export are a key-for-key copy. GPT-1 and GPT-2/3 differ only in where LayerNorm sits
(`config.norm`), inside the same Block.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .config import GPTConfig, GptnError
from .losses import next_token_loss


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions, for incremental decoding."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device=None, dtype=None):
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.d_head)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # positions filled so far

    def select(self, rows: torch.Tensor) -> "KVCache":
        """A new cache whose batch row i is a copy of this cache's row rows[i] (shared prompts fan out)."""
        new = KVCache.__new__(KVCache)
        new.k, new.v = self.k[:, rows], self.v[:, rows]
        new.max_len, new.length = self.max_len, self.length
        return new

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's k, v (B, H, T, D) for `layer`; return all keys and values so far."""
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        if self.length == 0:  # nothing before: these are all, in their own dtype (a bf16 prompt's stay bf16)
            return k, v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.n_head = config.n_head
        self.layer_idx = layer_idx
        self.c_attn = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.c_proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        # GPT-3 §2.1: "alternating dense and locally banded sparse attention patterns".
        self.banded = config.attention == "sparse" and layer_idx % 2 == 1
        self.causal = config.causal

    def forward(self, x, mask=None, cache: KVCache | None = None):
        B, T, C = x.shape
        # c_attn's output is [q | k | v], each n_head x d_head wide: one view splits all three into heads
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
            # bf16 prompts on a CPU (gptn.inference) meet the fp32 cache: attention runs in the queries' dtype
            k, v = k.to(q.dtype), v.to(q.dtype)
        if isinstance(mask, dict):  # sparse models carry one mask per pattern
            mask = mask["banded" if self.banded else "dense"]
        dropout_p = self.dropout if self.training else 0.0
        if mask is None:  # plain causal attention over a full window: the fused kernel's fast path
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p,
                                               is_causal=self.causal and k.size(2) > 1 and T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.c_proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # GPT-1/2 used the tanh approximation of GELU; the exact form would not match their weights.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.pre_norm = config.norm == "pre"
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask=None, cache=None):
        if self.pre_norm:  # GPT-2/3: LayerNorm at the input of each sub-block
            x = x + self.attn(self.ln_1(x), mask, cache)
            x = x + self.mlp(self.ln_2(x))
        else:  # GPT-1: LayerNorm after each residual sum
            x = self.ln_1(x + self.attn(x, mask, cache))
            x = self.ln_2(x + self.mlp(x))
        return x


def prompt_limit(n_ctx: int, generating: bool) -> int:
    """The longest prompt read whole: n_ctx tokens to score, n_ctx - 1 to continue (the first new token
    needs a position of its own). The one context-length rule of generate, the engine and the server."""
    return n_ctx - 1 if generating else n_ctx


def require_in_context(length: int, n_ctx: int) -> None:
    """The limit of every pass that numbers positions itself: at most n_ctx of them (W_p has n_ctx rows)."""
    if length > n_ctx:
        raise GptnError(f"sequence of {length} tokens exceeds the context window n_ctx={n_ctx}")


def slide_keep(n_ctx: int) -> int:
    """Tokens a full context keeps when generation slides past it: the last 3/4 (a slide every n_ctx/4
    new tokens, not every token), for generate and the engine alike."""
    return max(1, n_ctx - max(1, n_ctx // 4))


def with_zero_biases(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with a zero bias beside every weight that has none (linear layers and LayerNorms, not the
    embeddings): a bias-free GPT as the same function in formats that always carry biases (Hugging Face
    GPT-2, llama.cpp's GPT-2)."""
    out = dict(state)
    for name, value in state.items():
        if name.endswith(".weight") and not name.startswith(("wte.", "wpe.")):
            out.setdefault(name[:-len("weight")] + "bias", torch.zeros(value.shape[0], dtype=value.dtype))
    return out


def require_decoder(model: "GPT", what: str) -> None:
    """A clear error for what only a left-to-right decoder can do (generate, prompt, score text)."""
    if not model.config.causal:
        raise GptnError(f"this is a BERT-style encoder (bidirectional, masked-LM pretraining): it cannot {what}. "
                        "Only a GPT predicts the next token; fine-tune the encoder with `gptn finetune` instead")


class GPT(nn.Module):
    """The GPT-n language model. `forward` returns next-token logits (and the L1 loss given targets)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)  # W_e
        self.wpe = nn.Embedding(config.n_ctx, config.d_model)  # W_p
        if config.segment_embeddings:  # BERT's segment (sentence A / B) embeddings
            self.wse = nn.Embedding(2, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias) \
            if config.norm == "pre" else None
        self.inference_head = None  # a faster h W_e^T for inference: gptn.inference.prepare_for_inference
        # Training only: keep each block's input and recompute its inside during backward (less memory).
        self.activation_checkpointing = False
        self.apply(self._init_weights)
        # GPT-2 §2.3: scale the weights of residual projections by 1/sqrt(N), N = 2 per block.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.wte.weight.numel() + self.wpe.weight.numel()
        return n

    def hidden_states(self, idx, position_ids=None, attention_mask=None, cache: KVCache | None = None,
                      segment_ids=None):
        """h_n for token ids `idx` (B, T): the transformer's output before the softmax layer.

        attention_mask (B, T_total) marks real tokens (1) and padding (0), for left-padded batches;
        T_total counts the cached positions too. A boolean (B, 1, T, T_total) mask (a dict of them,
        "dense" and "banded", for sparse models) is used as given: the serving engine's per-row masks.
        segment_ids (B, T) are 0/1 (sentence A/B), BERT only.
        """
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            require_in_context(past + T, self.config.n_ctx)
            position_ids = torch.arange(past, past + T, device=idx.device).unsqueeze(0)
        h = self.wte(idx) + self.wpe(position_ids)  # h_0 = U W_e + W_p   (B, T, C)
        if self.config.segment_embeddings:
            h = h + (self.wse(segment_ids) if segment_ids is not None else self.wse.weight[0])
        h = self.drop(h)
        mask = self._attention_mask(T, past, attention_mask, idx.device)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.h:
            if recompute:
                h = torch.utils.checkpoint.checkpoint(block, h, mask, cache, use_reentrant=False)
            else:
                h = block(h, mask, cache)  # h_l = block(h_{l-1})
        if cache is not None:
            cache.length += T
        return self.ln_f(h) if self.ln_f is not None else h

    def forward(self, idx, targets=None, position_ids=None, attention_mask=None,
                cache: KVCache | None = None, last_only: bool = False):
        """Logits h_n W_e^T (B, T, V); with `targets`, also the mean next-token cross-entropy.

        Targets equal to -100 are ignored. `last_only` computes logits for the last position only.
        """
        h = self.hidden_states(idx, position_ids, attention_mask, cache)
        if last_only:
            h = h[:, -1:, :]
        logits = self.tied_logits(h)  # tied softmax layer: h_n W_e^T   (B, T, V)
        if targets is None:
            return logits
        return logits, next_token_loss(logits, targets)

    def tied_logits(self, h):
        """h W_e^T (through the inference copy of W_e when gptn.inference.prepare_for_inference made one)."""
        if self.inference_head is not None:
            return self.inference_head(h)
        w = self.wte.weight
        pad = -w.size(0) % 64 if w.is_cuda and torch.is_grad_enabled() else 0
        if pad:
            # cuBLAS's fast kernels want 16-byte-aligned rows; GPT-2's 50,257 logits per row make this layer's
            # three training products fall back to slow ones (H100, gpt2 at 16x1024: 80 -> 58 ms per step eager).
            # Zero rows added for the product alone keep W_e's shape, so checkpoints and exports are unchanged.
            # Not without gradients: decoding a few rows, the padded copy would move W_e twice per token
            # where the product reads it once.
            return F.linear(h, F.pad(w, (0, 0, 0, pad)))[..., :w.size(0)]
        return F.linear(h, w)

    def _attention_mask(self, T: int, past: int, attention_mask, device):
        """Boolean mask (B|1, 1, T, past+T), or None when the fused causal kernel can be used."""
        if isinstance(attention_mask, dict) or attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask
        dense_only = self.config.attention == "dense"
        if attention_mask is None and dense_only and (past == 0 or T == 1):
            return None
        q_pos = torch.arange(past, past + T, device=device).unsqueeze(1)  # (T, 1)
        k_pos = torch.arange(past + T, device=device).unsqueeze(0)  # (1, past+T)
        causal = k_pos <= q_pos if self.config.causal else torch.ones_like(k_pos <= q_pos)
        pad = None
        if attention_mask is not None:
            pad = attention_mask[:, None, None, :].bool()  # (B, 1, 1, past+T)

        def build(allowed):
            if pad is not None:
                # A padding query would otherwise see no key at all (NaN); let it see itself.
                allowed = (allowed & pad) | (k_pos == q_pos)
            return allowed if allowed.dim() == 4 else allowed[None, None]

        dense = build(causal)
        if dense_only:
            return dense
        return {"dense": dense, "banded": build(causal & (q_pos - k_pos < self.config.sparse_band))}
