"""L1, the next-token cross-entropy of the tied softmax's logits, and its two speed paths.

The loss is F.cross_entropy's mean over the targets that are not -100. A GPU runs F.cross_entropy
itself; under torch.compile and on a CPU the same value and gradient come from a function of our own
(benchmarks/mfu.py and benchmarks/pretrain_shakespeare.py time the training step it is part of).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows of logits one pass of the CPU loss holds in float32: about 2 MiB, so that a chunk stays in cache
# between its exp and the write of its gradient.
CPU_LOSS_CHUNK_ELEMENTS = 2 ** 19


class _CompiledNextTokenLoss(torch.autograd.Function):
    """F.cross_entropy's mean over non-ignored rows, for torch.compile: it saves for the backward only the
    logits in their own dtype and one logsumexp per row, and writes the gradient as one pointwise
    expression, which the compiler fuses into a single pass. F.cross_entropy under bf16 autocast saves
    a float32 log-softmax of all (B*T, V) logits, twice their size, and reads it back (H100, gpt2 at
    16x1024 compiled: 39.5 -> 38.4 ms per step). Eagerly, F.cross_entropy's own kernels are faster on a GPU."""

    @staticmethod
    def forward(ctx, logits, targets):
        valid = targets != -100
        safe = targets.masked_fill(~valid, 0)
        lse = torch.logsumexp(logits.float(), dim=-1)
        picked = logits.gather(1, safe[:, None]).squeeze(1).float()
        count = valid.sum()
        ctx.save_for_backward(logits, safe, valid, lse, count)
        return ((lse - picked) * valid).sum() / count

    @staticmethod
    def backward(ctx, grad_loss):
        logits, safe, valid, lse, count = ctx.saved_tensors
        one_hot = torch.arange(logits.size(1), device=logits.device) == safe[:, None]
        grad = (torch.exp(logits.float() - lse[:, None]) - one_hot.float()) * (grad_loss / count * valid)[:, None]
        return grad.to(logits.dtype), None


class _CpuNextTokenLoss(torch.autograd.Function):
    """F.cross_entropy's mean over non-ignored rows on a CPU: the loss and its gradient (softmax minus the
    one-hot target) come from one pass over each chunk of rows in the forward, which saves the gradient
    in the logits' dtype; the backward only scales it. F.cross_entropy writes a float32 log-softmax of
    all (B*T, V) logits, reads it back with a second exp in the backward, and under bf16 autocast
    copies the logits to float32 and the gradient back: for 2,048 tokens of an 8,192-token vocabulary
    that memory traffic was half of a small model's training step."""

    @staticmethod
    def forward(ctx, logits, targets):
        valid = targets != -100
        safe = targets.masked_fill(~valid, 0)[:, None]
        count = valid.sum()
        weight = valid / count  # each row's share of the mean: 0 for an ignored target
        grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        rows = max(1, CPU_LOSS_CHUNK_ELEMENTS // logits.size(1))
        for s in range(0, logits.size(0), rows):
            z = logits[s:s + rows].to(torch.float32, copy=True)
            picked = z.gather(1, safe[s:s + rows]).squeeze(1)
            top = z.amax(1, keepdim=True)
            z.sub_(top).exp_()
            sums = z.sum(1, keepdim=True)
            total += ((sums.log().add_(top).squeeze(1) - picked) * weight[s:s + rows]).sum()
            if grad is not None:
                z.div_(sums).scatter_add_(1, safe[s:s + rows], torch.full_like(sums, -1.0))
                grad[s:s + rows] = z.mul_(weight[s:s + rows, None])
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L1 as a mean: the cross-entropy of `logits` (..., V) against `targets` (...), -100 ignored."""
    logits, targets = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    if torch.compiler.is_compiling():
        return _CompiledNextTokenLoss.apply(logits, targets)
    if logits.device.type == "cpu":
        return _CpuNextTokenLoss.apply(logits, targets)
    return F.cross_entropy(logits.float(), targets, ignore_index=-100)
