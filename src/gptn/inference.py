"""Inference speed paths: what `prepare_for_inference` installs on a loaded GPT so that decoding reads
fewer bytes, or reads them faster, without changing the model's definition (model.py).

- fp32 on CPU: one-row products split across the threads, oneDNN-prepacked weights for small batches.
- bf16: weights and activations in bfloat16 (logits are sampled in fp32).
- int8 (CPU): every linear layer and the tied softmax layer as int8 weights, one scale per output
  channel, through PyTorch's fbgemm dynamic-quantised linear (activations quantised per row batch on
  the fly, int32 accumulation): a quarter of fp32's weight bytes, the CTranslate2 recipe.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GptnError

DTYPES = ("fp32", "bf16", "int8", "auto")


def _row_times_weight(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ b) for a single row x (1, in), with W's rows cut into one slice per thread.

    MKL multiplies one row by a matrix on one thread, which reads the weights at about half the
    memory bandwidth of two cores; bmm over the slices (views, no copy) runs them side by side,
    1.5x faster here. Decoding one sequence is exactly this product, weight-bound.
    """
    parts = torch.get_num_threads()
    out_features, in_features = weight.shape
    n = out_features // parts * parts
    if parts < 2 or n == 0:
        return F.linear(x, weight, bias)
    x = x.reshape(1, in_features)
    slices = weight[:n].view(parts, n // parts, in_features).transpose(1, 2)  # (parts, in, out/parts)
    y = torch.bmm(x.expand(parts, 1, in_features), slices).view(1, n)
    if n < out_features:
        y = torch.cat([y, F.linear(x, weight[n:])], dim=1)
    return y if bias is None else y.add_(bias)


class _CpuInferenceLinear:
    """x W^T + b for CPU inference, installed by prepare_for_inference as a linear layer's forward.

    One row (decoding one sequence) goes to _row_times_weight. 2-64 rows (batched decoding) use a
    oneDNN-prepacked copy of W: MKL's GEMM is slow when a few rows meet a large weight, and the
    packed kernel runs a batch of 8 about 1.4x faster (2.5x for the tied softmax layer) here. More
    rows (prefill), gradients, or a weight changed since packing: F.linear.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        with torch.no_grad():
            self.packed = weight.to_mkldnn()
            self.packed_bias = (bias if bias is not None else weight.new_zeros(weight.shape[0])).to_mkldnn()
        self.weight, self.bias, self.version = weight, bias, weight._version

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if torch.is_grad_enabled() or not 1 <= rows <= 64 or self.weight._version != self.version \
                or x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        if rows == 1:
            return _row_times_weight(x, self.weight, self.bias).view(*x.shape[:-1], -1)
        y = torch._C._nn.mkldnn_linear(x.reshape(rows, -1).contiguous().to_mkldnn(), self.packed, self.packed_bias)
        return y.to_dense().view(*x.shape[:-1], -1)


class _Int8Linear:
    """x W^T + b with W as int8, one scale per output channel (max |w| / 127), by fbgemm's dynamic
    quantised linear; with gradients enabled (training), the fp32 weights."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's quantised tensors warn that their type is deprecated
            w = weight.detach().float()
            scale = (w.abs().amax(1) / 127).clamp(min=1e-12).double()
            q = torch.quantize_per_channel(w, scale, torch.zeros(len(scale), dtype=torch.long), 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(q, None if bias is None else bias.detach().float())
        self.weight, self.bias, self.version = weight, bias, weight._version

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or self.weight._version != self.version:
            return F.linear(x, self.weight, self.bias)
        # reduce_range: 7-bit activations, so that fbgemm's 16-bit pairwise sums cannot saturate (torch.ao's choice on x86)
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, x.shape[-1]).float().contiguous(), self.packed, True)
        return y.view(*x.shape[:-1], -1)


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX or AVX512-BF16); most AMD EPYC here do not."""
    try:
        flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(dtype: str, device: str | torch.device) -> tuple[str, str]:
    """(fp32 | bf16 | int8, why) for a requested dtype on a device; `auto` picks bf16 where the hardware
    runs it natively (CUDA with bf16, a CPU with AMX / AVX512-BF16) and fp32 elsewhere; int8 changes
    results slightly (activations quantised too), so it is chosen only by name."""
    if dtype not in DTYPES:
        raise GptnError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    cuda = torch.device(device).type == "cuda"
    if dtype == "int8" and cuda:
        raise GptnError("--dtype int8 is a CPU path (fbgemm); on CUDA use --dtype bf16")
    if dtype == "int8" and not {"x86", "fbgemm"} & set(torch.backends.quantized.supported_engines):
        raise GptnError("--dtype int8 needs PyTorch's fbgemm kernels, which this torch build lacks (x86 only)")
    if dtype != "auto":
        return dtype, "as asked"
    if cuda:
        return ("bf16", "CUDA with bf16") if torch.cuda.is_bf16_supported() else ("fp32", "no bf16 on this GPU")
    if native_bf16():
        return "bf16", "this CPU multiplies bf16 natively (AMX / AVX512-BF16)"
    return "fp32", "no native bf16 on this CPU; --dtype int8 reads a quarter of the bytes"


def prepare_for_inference(model: nn.Module, dtype: str = "fp32", say=None) -> nn.Module:
    """Set up a loaded GPT for decoding at `dtype` (fp32 | bf16 | int8 | auto), in place; `say` hears
    what auto picked. Training still works on the fp32 weights of an fp32 or int8 model."""
    device = model.wte.weight.device
    chosen, why = resolve_dtype(dtype, device)
    if dtype == "auto" and say is not None:
        say(f"--dtype auto: {chosen} ({why})")
    if model._inference_head is not None:
        return model  # prepared already
    model.eval()
    if chosen == "bf16":
        return model.to(torch.bfloat16)
    if device.type != "cpu" or model.wte.weight.dtype != torch.float32:
        return model
    if chosen == "int8":
        kind = _Int8Linear
    elif torch.backends.mkldnn.is_available():
        kind = _CpuInferenceLinear
    else:
        return model
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.forward = kind(module.weight, module.bias)
    model._inference_head = kind(model.wte.weight)
    return model


__all__ = ["DTYPES", "native_bf16", "resolve_dtype", "prepare_for_inference"]
