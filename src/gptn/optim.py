"""Optimizers: AdamW (GPT-1/2/3's), and Muon for the weight matrices of the blocks.

Muon (Jordan et al., 2024, https://kellerjordan.github.io/posts/muon/) replaces each hidden matrix's
momentum update by the nearest semi-orthogonal matrix (a few Newton-Schulz iterations), so every
direction of the update moves at the same rate. Embeddings (W_e doubles as the tied softmax), biases
and LayerNorm gains stay with AdamW, as its authors advise. It reaches a given loss in fewer tokens.

The update is PyTorch's `torch.optim.Muon` (same coefficients, Nesterov momentum, decoupled weight
decay, Keller Jordan's sqrt(max(1, rows/cols)) learning-rate scale); it is ours because that one
orthogonalises in bfloat16 one matrix at a time, which on a CPU without bf16 matmul units is slow:
for the 16 matrices of the 4x128 Shakespeare model, 932 ms per step against 36 ms here (the whole
AdamW training step is ~80 ms). Here matrices of one shape go through one batched iteration, in
bfloat16 on GPUs and on CPUs where bf16 products of the matrices' width beat float32 ones
(`runtime.cpu_bf16_pays`), else in float32.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from .runtime import cpu_bf16_pays

NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)  # quintic iteration, as torch.optim.Muon
OPTIMIZERS = ("adamw", "muon")  # AdamW everywhere, or Muon for the blocks' matrices and AdamW for the rest
MUON_LR = 0.02  # the reference implementation's default


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T of each (m, n) matrix in `g` (m, n) or (k, m, n), by quintic Newton-Schulz."""
    a, b, c = NS_COEFFICIENTS
    fast_bf16 = g.is_cuda or cpu_bf16_pays(min(g.shape[-2:]))
    x = g.to(torch.bfloat16 if fast_bf16 else torch.float32).reshape(-1, *g.shape[-2:])
    wide = x.size(-2) <= x.size(-1)
    if not wide:
        x = x.mT  # iterate on the (small, small) Gram matrix side
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b G + c G^2
        x = torch.baddbmm(x, poly, x, beta=a)  # a X + (b G + c G^2) X
    return (x if wide else x.mT).reshape(g.shape).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Momentum, orthogonalised: for 2-D weight matrices only."""

    def __init__(self, params, lr: float = MUON_LR, momentum: float = 0.95, weight_decay: float = 0.0,
                 nesterov: bool = True, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                      ns_steps=ns_steps))
        for group in self.param_groups:
            if any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon updates 2-D weight matrices only")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_shape: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(tuple(p.shape), []).append(p)
            for (rows, cols), params in by_shape.items():
                grads = [p.grad for p in params]
                bufs = []
                for p in params:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    bufs.append(state["momentum_buffer"])
                torch._foreach_lerp_(bufs, grads, 1 - group["momentum"])  # B = mu B + (1 - mu) g
                update = torch.stack(grads).lerp_(torch.stack(bufs), group["momentum"]) if group["nesterov"] \
                    else torch.stack(bufs)
                update = orthogonalize(update, group["ns_steps"])
                if group["weight_decay"]:
                    torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
                # An orthogonalised tall matrix has smaller entries; Keller Jordan's scale evens them out.
                scale = math.sqrt(max(1.0, rows / cols))
                torch._foreach_add_(params, list(update.unbind(0)), alpha=-group["lr"] * scale)
        return loss


class MuonWithAdamW:
    """Muon for the blocks' weight matrices and AdamW for the rest, stepped, zeroed and saved as one
    optimizer. Each group's "lr_scale" is its learning rate relative to the schedule's."""

    def __init__(self, muon: Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self, closure=None):
        self.muon.step()
        return self.adamw.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        # Moments and step counts come from the checkpoint, the rates from the options given now.
        scales = [g["lr_scale"] for g in self.param_groups]
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])
        for group, scale in zip(self.param_groups, scales):
            group["lr_scale"] = scale


def layer_lr_scales(model: nn.Module, decay: float) -> dict[int, float]:
    """id(parameter) -> its rate relative to the top's, for discriminative fine-tuning (ULMFiT, Howard &
    Ruder 2018; the layer-wise rate decay of BERT-style fine-tuning): what sits above the blocks (the final
    LayerNorm, a task head) 1, block l of 1..n decay^(n + 1 - l), the embeddings decay^(n + 1)."""
    depths = {}
    for name, p in model.named_parameters():
        block = _BLOCK.search(name)
        depths[id(p)] = int(block.group(1)) + 1 if block else 0 if _EMBEDDING.search(name) else None
    top = max((d for d in depths.values() if d is not None), default=0) + 1
    return {pid: decay ** (top - (top if d is None else d)) for pid, d in depths.items()}


_BLOCK = re.compile(r"(?:^|\.)h\.(\d+)\.")  # GPT's parameter names: h.N.* are block N's (model.py)
_EMBEDDING = re.compile(r"(?:^|\.)(wte|wpe|wse)\.")


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas, device_type: str,
                   kind: str = "adamw", muon_lr: float = MUON_LR, adamw_only=(), layer_decay: float = 1.0):
    """AdamW with weight decay on matrices (linear and embedding weights) only, not on biases or
    LayerNorm; or (kind "muon") Muon at `muon_lr` for the weights of linear layers, AdamW for the rest
    (and for the modules in `adamw_only`, e.g. a task head: an output layer, as Muon's authors advise).
    layer_decay < 1: each block's rates are that times the block above's (layer_lr_scales)."""
    excluded = {id(m) for m in adamw_only}
    muon_params = [m.weight for m in model.modules()
                   if isinstance(m, nn.Linear) and m.weight.requires_grad and id(m) not in excluded] \
        if kind == "muon" else []
    in_muon = {id(p) for p in muon_params}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in in_muon]
    scales = layer_lr_scales(model, layer_decay)

    def by_scale(params: list, **group) -> list[dict]:
        """One group per rate scale, in the order the scales first occur."""
        split: dict[float, list] = {}
        for p in params:
            split.setdefault(scales[id(p)], []).append(p)
        return [{"params": ps, **group, "lr_scale": group.get("lr_scale", 1.0) * scale} for scale, ps in split.items()]

    groups = by_scale([p for p in rest if p.dim() >= 2], weight_decay=weight_decay) \
        + by_scale([p for p in rest if p.dim() < 2], weight_decay=0.0)
    is_dtensor = any(type(p).__name__ == "DTensor" for p in rest)
    # The fused kernel is several times faster than the per-tensor loop, on CPU as on GPU.
    fused = not is_dtensor and device_type in ("cpu", "cuda")
    adamw = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)
    if kind == "adamw":
        return adamw
    if kind != "muon":
        raise ValueError(f"unknown optimizer {kind!r}")
    # Muon's rate is ~10x AdamW's, so decoupled decay (lr x wd per step) would shrink the matrices ~10x
    # faster; it is off, as in the reference implementation's defaults.
    muon = Muon(by_scale(muon_params, lr_scale=muon_lr / lr), lr=muon_lr)
    return MuonWithAdamW(muon, adamw)


__all__ = ["MUON_LR", "Muon", "MuonWithAdamW", "make_optimizer", "orthogonalize"]
