"""Inference speed paths: what `prepare_for_inference` installs on a loaded GPT so that decoding reads
fewer bytes, or reads them faster, without changing the model's definition (model.py).

- fp32 on CPU: weights reordered for oneDNN, whose kernel splits even one row across the threads; one row
  on an AMD CPU without AVX-512 through cpu_gemv's kernel instead (read near a plain sum's rate).
- bf16: weights rounded to bfloat16; on an x86 CPU decoded with fp32 activations and sums by
  fbgemm's half-precision GEMM (measured faster than bf16 activations through oneDNN, even with
  AVX512-BF16); prompt processing (prefill, scoring) in bf16 where the CPU has it natively, decode
  steps always with fp32 activations; elsewhere (CUDA, or no fbgemm) weights and activations in
  bfloat16.
- fp16 (CPU): every linear layer and the tied softmax layer as fp16 weights through fbgemm, with fp32
  activations and sums: half of fp32's bytes, closer to fp32 than bf16. On CUDA: weights and
  activations in float16.
- int8 (CPU): every linear layer and the tied softmax layer as int8 weights, one scale per output
  channel, through PyTorch's fbgemm dynamic-quantised linear (activations quantised per row batch on
  the fly, int32 accumulation): a quarter of fp32's weight bytes, the CTranslate2 recipe.

And for any of them on a CPU, `decode_step`: a decode step with fewer operations per token.
"""

from __future__ import annotations

import functools
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cpu_gemv
from .config import GptnError
from .model import require_in_context
from .options import option
from .runtime import cpu_vendor_and_flags, native_bf16

DTYPES = ("fp32", "bf16", "fp16", "int8", "auto")
DTYPE_HELP = ("weights for decoding: fp32 (default), bf16, fp16 (CPU: fp16 weights, fp32 arithmetic, fbgemm), "
              "int8 (CPU: int8 weights per output channel, fbgemm), or auto (CPU: fp16; CUDA: bf16)")
FP16_MAX = 65504.0
# Multiply-adds (rows x weights) below which a oneDNN call's fixed cost (~15-20 us) outweighs its speed:
# F.linear wins for a 256 x 256 weight at one row or 128 x 128 at eight, oneDNN for anything larger.
ONEDNN_MIN_WORK = 2**18
# On an Intel CPU, MKL's product (F.linear) reads a large W faster than oneDNN's kernel for up to this many rows
# (gpt2's weights on the AMX Xeon: 1-3 rows, and oneDNN from 4); on AMD it is slower at any count (MKL's slow path
# there: oneDNN 2.5x faster at one row on the EPYCs).
MKL_MAX_ROWS = 3


def _intel_cpu() -> bool:
    return cpu_vendor_and_flags()[0] == "GenuineIntel"


@functools.cache
def _gemv_for_one_row() -> bool:
    """Whether one row goes through cpu_gemv's kernel: where it was measured faster than oneDNN's, the
    AVX2-only EPYC; the kinds with AVX-512 keep oneDNN (or MKL) until measured against it."""
    vendor, flags = cpu_vendor_and_flags()
    return vendor == "AuthenticAMD" and "avx512f" not in flags and cpu_gemv.available()


class _CpuInferenceLinear:
    """x W^T + b for CPU inference, installed by prepare_for_inference as a linear layer's forward.

    W is reordered once into oneDNN's blocked layout (what torch.compile's CPU backend does for
    frozen weights) and multiplied by oneDNN's kernel, which reads W near the memory bandwidth from
    one row on. Against F.linear (MKL, slow when a few rows meet a large W on an AMD CPU) on gpt2's 49
    weights on the EPYCs: 2.5x faster for 1 row, 3x for 8, 1.8x for a 1024-token prefill. Tiny
    products (ONEDNN_MIN_WORK), a few rows on an Intel CPU (MKL_MAX_ROWS), gradients enabled, or a
    weight changed since reordering: F.linear on W.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        with torch.no_grad():
            # 64: the batch the layout is tuned for; measured as good as 1 for one row, better for 8 to 1024
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 64)
        self.weight, self.bias, self.version = weight, bias, weight._version
        self.one_row_gemv = _gemv_for_one_row() and weight.is_contiguous() and (bias is None or bias.is_contiguous())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or self.weight._version != self.version or x.device.type != "cpu" \
                or x.dtype != torch.float32:
            return F.linear(x, self.weight, self.bias)
        rows = x.numel() // x.shape[-1]
        if not self.onednn_for(rows):
            return F.linear(x, self.weight, self.bias)
        if rows == 1 and self.one_row_gemv:
            return cpu_gemv.gemv(x.contiguous(), self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def onednn_for(self, rows: int) -> bool:
        """Whether oneDNN's kernel is the faster for `rows` rows (else F.linear)."""
        return rows * self.weight.numel() >= ONEDNN_MIN_WORK and not (rows <= MKL_MAX_ROWS and _intel_cpu())

    def kernel(self, rows: int):
        """What __call__ runs for `rows` contiguous fp32 rows, without its checks (see decode_step)."""
        w, b, packed = self.weight, self.bias, self.packed
        if not self.onednn_for(rows):
            return lambda x: F.linear(x, w, b)
        if rows == 1 and self.one_row_gemv:
            return lambda x: cpu_gemv.gemv(x, w, b)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")


class _FbgemmLinear:
    """x W^T + b through one of fbgemm's packed-weight kernels (fp32 activations in and out); with
    gradients enabled (training) or a weight changed since packing, the fp32 weights."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's quantised tensors warn that their type is deprecated
            self.packed = self.pack(weight.detach().float(), None if bias is None else bias.detach().float())
        self.weight, self.bias, self.version = weight, bias, weight._version

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or self.weight._version != self.version:
            return F.linear(x, self.weight, self.bias)
        # Without this, each call looks for __torch_function__ on the packed weights (a TorchScript object) by
        # raising and catching a C++ exception: ~35 us a call (gpt2 int8 decode, AVX2 EPYC: 18.2 -> 16.3 ms a token).
        with torch._C.DisableTorchFunctionSubclass():
            y = self.run(x.reshape(-1, x.shape[-1]).float().contiguous())
        return y.view(*x.shape[:-1], -1)

    def kernel(self, rows: int):
        """What __call__ runs for `rows` contiguous fp32 rows, without its checks (see decode_step); to be
        called with torch function subclasses disabled."""
        return self.run


class _Int8Linear(_FbgemmLinear):
    """W as int8, one scale per output channel (max |w| / 127); activations quantised per call."""

    @staticmethod
    def pack(w, b):
        scale = (w.abs().amax(1) / 127).clamp(min=1e-12).double()
        q = torch.quantize_per_channel(w, scale, torch.zeros(len(scale), dtype=torch.long), 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(q, b)

    def run(self, x):
        # reduce_range: 7-bit activations, so that fbgemm's 16-bit pairwise sums cannot saturate (torch.ao's choice on x86)
        return torch.ops.quantized.linear_dynamic(x, self.packed, True)


class _Fp16Linear(_FbgemmLinear):
    """W as fp16 (half of fp32's bytes, 10 mantissa bits against bf16's 7), fp32 activations and sums:
    fbgemm's FP16 GEMM, which reads the weights near the memory bandwidth from one row on."""

    @staticmethod
    def pack(w, b):
        return torch.ops.quantized.linear_prepack_fp16(w, b)

    def run(self, x):
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)


class _Bf16Linear(_Fp16Linear):
    """W rounded to bfloat16 and held as fp16, which keeps bf16's 8 significant bits exactly within
    fp16's range: bf16 weights with fp32 activations and sums, through the same fbgemm kernel. On a
    CPU with native bf16, prompt processing (several positions per row, more than 64 rows in all:
    compute-bound) runs in bf16, on a bf16 copy in oneDNN's layout. A decode step (one position per
    row) keeps fp32 activations whatever the batch: rounding them to bf16 too flipped near-tied
    greedy picks (free-running agreement with fp32 80% against 98%, benchmarks/generate.py's model)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, bf16_out: bool = True):
        super().__init__(weight, bias)
        self.prompt_path = None  # x -> x W^T + b in bf16, for prompt processing
        # bf16_out (every block's linear layers; not the tied softmax layer): the prompt path's result stays bf16. Its
        # readers round it to bf16 anyway (the next linear), add it exactly to fp32 (the residual stream) or store it
        # exactly (q, k, v into the fp32 KV cache), and attention then runs in bf16 too (model.py: in the queries'
        # dtype), its one change of numbers. It saves two conversions of every activation (the MLP's above all).
        self.bf16_out = bf16_out
        if native_bf16() and _onednn():
            with torch.no_grad():  # oneDNN's layout: 10-20% faster than F.linear in bf16 for a 1024-token prefill here
                packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().bfloat16(), 64)
                b16 = None if bias is None else bias.detach().bfloat16()
            self.prompt_path = lambda x: torch.ops.mkldnn._linear_pointwise(x.bfloat16(), packed, b16, "none", [], "")

    @staticmethod
    def pack(w, b):
        return torch.ops.quantized.linear_prepack_fp16(w.bfloat16().float(), b)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.prompt_path is not None and x.dim() > 2 and x.shape[-2] > 1 and x.numel() // x.shape[-1] > 64 \
                and not torch.is_grad_enabled() and self.weight._version == self.version:
            y = self.prompt_path(x)
            return y if self.bf16_out else y.float()
        return super().__call__(x)


@functools.lru_cache(maxsize=None)
def _onednn() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


@functools.lru_cache(maxsize=None)
def _fbgemm() -> bool:
    return bool({"x86", "fbgemm"} & set(torch.backends.quantized.supported_engines))


def resolve_dtype(dtype: str, device: str | torch.device) -> tuple[str, str]:
    """(fp32 | bf16 | fp16 | int8, why) for a requested dtype on a device. `auto` picks bf16 on CUDA
    (fp32 without it) and fp16 weights on an x86 CPU (fbgemm): half the bytes of fp32 and, measured in
    benchmarks/generate.py, faster and closer to fp32 than bf16 on both kinds of CPU here. int8
    changes results slightly (activations quantised too), so it is chosen only by name."""
    if dtype not in DTYPES:
        raise GptnError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    cuda = torch.device(device).type == "cuda"
    if dtype == "int8" and cuda:
        raise GptnError("--dtype int8 is a CPU path (fbgemm); on CUDA use --dtype bf16")
    if dtype in ("int8", "fp16") and not cuda and not _fbgemm():
        raise GptnError(f"--dtype {dtype} on CPU needs PyTorch's fbgemm kernels, which this torch build lacks (x86 only)")
    if dtype != "auto":
        return dtype, "as asked"
    if cuda:
        return ("bf16", "CUDA with bf16") if torch.cuda.is_bf16_supported() else ("fp32", "no bf16 on this GPU")
    if _fbgemm():
        return "fp16", "fp16 weights, fp32 arithmetic: half of fp32's bytes"
    return "fp32", "no fbgemm kernels in this torch build"


def _fits_fp16(model: nn.Module) -> bool:
    return all(p.detach().abs().max() <= FP16_MAX for n, p in model.named_parameters() if p.dim() == 2)


def prepare_for_inference(model: nn.Module, dtype: str = "fp32", say=None) -> nn.Module:
    """Set up a loaded GPT for decoding at `dtype` (fp32 | bf16 | fp16 | int8 | auto), in place; `say`
    hears what auto picked. Training still works on the fp32 weights of a CPU model (any dtype but
    bf16 without fbgemm)."""
    device = model.wte.weight.device
    chosen, why = resolve_dtype(dtype, device)
    if dtype == "auto" and say is not None:
        say(f"--dtype auto: {chosen} ({why})")
    if model.inference_head is not None:
        return model  # prepared already
    model.eval()
    cpu = device.type == "cpu"
    if chosen == "fp16" and not cpu:
        return model.to(torch.float16)
    if chosen == "bf16" and not (cpu and _fbgemm() and _fits_fp16(model)):
        return model.to(torch.bfloat16)
    if not cpu or model.wte.weight.dtype != torch.float32:
        return model
    fallback = _CpuInferenceLinear if _onednn() else None

    def kind_for(weight):
        if chosen == "int8":
            return _Int8Linear
        if chosen == "bf16":
            return _Bf16Linear
        if chosen == "fp16" and weight.detach().abs().max() <= FP16_MAX:
            return _Fp16Linear
        return fallback  # fp32, or a weight fp16 cannot hold

    for module in model.modules():
        if isinstance(module, nn.Linear) and (kind := kind_for(module.weight)) is not None:
            module.forward = kind(module.weight, module.bias)
    if (kind := kind_for(model.wte.weight)) is not None:
        model.inference_head = kind(model.wte.weight, **({"bf16_out": False} if kind is _Bf16Linear else {}))
    return model


def _kernel(linear, rows: int):
    """A linear layer's fastest call for `rows` contiguous fp32 rows: the kernel prepare_for_inference
    installed (None when its weights changed since), or the layer itself."""
    if isinstance(linear, nn.Linear):
        linear = linear.forward
    if isinstance(linear, (_CpuInferenceLinear, _FbgemmLinear)):
        return linear.kernel(rows) if linear.weight._version == linear.version else None
    return linear


def decode_step(model: nn.Module, rows: int):
    """step(tokens (rows,), cache, positions=None, mask=None) -> logits (rows, V): one decode step of
    `rows` rows on a CPU, through any cache GPT.forward takes (its `update(layer, k, v)`): the rows at
    one shared position (cache.length) by default, or each at positions[i] under an attention mask
    (rows, 1, 1, keys), as the serving engine decodes. None where it does not apply (GPT-1's post-LN
    blocks, sparse or bidirectional attention, a model in training, another device, weights changed
    since prepare_for_inference). Call it without gradients.

    It computes what GPT.forward computes for one new position (model.py), in the same operations on
    the same numbers, so the logits and the cache are the same bit for bit (tested); what goes is the
    work around them: module calls, mask and shape handling, and each linear layer's checks (made once
    here). Decoding one row, a step's products read the weights in a few milliseconds, so that this
    overhead was a large share of a step with int8 or fp16 weights (benchmarks/generate.py)."""
    c = model.config
    if model.training or model.wte.weight.device.type != "cpu" or c.norm != "pre" or c.attention != "dense" \
            or not c.causal or c.segment_embeddings or model.ln_f is None:
        return None
    H, D, C, eps = c.n_head, c.d_head, c.d_model, c.layer_norm_eps
    layers = [(b.ln_1.weight, b.ln_1.bias, _kernel(b.attn.c_attn, rows), _kernel(b.attn.c_proj, rows),
               b.ln_2.weight, b.ln_2.bias, _kernel(b.mlp.c_fc, rows), _kernel(b.mlp.c_proj, rows)) for b in model.h]
    head = _kernel(model.inference_head, rows) if model.inference_head is not None \
        else (lambda x, w=model.wte.weight: F.linear(x, w))
    if head is None or any(f is None for layer in layers for f in layer[2:4] + layer[6:]):
        return None
    wte, wpe, ln_f = model.wte.weight, model.wpe.weight, (model.ln_f.weight, model.ln_f.bias)

    def step(tokens: torch.Tensor, cache, positions: torch.Tensor | None = None, mask=None) -> torch.Tensor:
        if positions is None:
            require_in_context(cache.length + 1, c.n_ctx)
        x = wte[tokens] + wpe[cache.length if positions is None else positions]  # h_0 (rows, C)
        with torch._C.DisableTorchFunctionSubclass():  # see _FbgemmLinear.__call__
            for i, (w1, b1, qkv, proj, w2, b2, fc, proj2) in enumerate(layers):
                q, k, v = qkv(F.layer_norm(x, (C,), w1, b1, eps)).view(rows, 3, H, 1, D).unbind(1)
                keys, values = cache.update(i, k, v)
                x = x + proj(F.scaled_dot_product_attention(q, keys, values, attn_mask=mask).view(rows, C))
                x = x + proj2(F.gelu(fc(F.layer_norm(x, (C,), w2, b2, eps)), approximate="tanh"))
            cache.length += 1
            return head(F.layer_norm(x, (C,), *ln_f, eps))
    return step


def load_for_inference(run: str, device: str = "cpu", dtype: str = "fp32", say=None):
    """(model, tokenizer) of a run, set up for decoding at `dtype` on `device` (auto | cpu | cuda[:N]):
    what `next`, `generate`, `score`, `fewshot` and `serve` load. Bad options are refused before the
    weights are read."""
    from .checkpoint import load_model
    from .runtime import resolve_device
    if device != "auto":  # a dtype the device kind cannot run is named first
        resolve_dtype(dtype, "cpu" if device == "cpu" else "cuda")
    device = resolve_device(device)
    resolve_dtype(dtype, device)
    model, tokenizer = load_model(run, device=device)
    if tokenizer is None:
        raise GptnError(f"{run} has no tokenizer saved beside the model")
    return prepare_for_inference(model, dtype, say=say), tokenizer


@dataclass(kw_only=True)
class RunOptions:
    """The arguments of a command that reads a run (commands add their own fields)."""

    run: str = option(help="run directory", cli="positional")
    device: str = option("cpu", "cpu, cuda, cuda:N or auto")

    def load(self, dtype: str = "fp32"):
        """(model, tokenizer) for decoding, telling stderr what the dtype became."""
        return load_for_inference(self.run, self.device, dtype, say=lambda m: print(m, file=sys.stderr))


@dataclass(kw_only=True)
class DecodeOptions(RunOptions):
    dtype: str = option("fp32", DTYPE_HELP)

    def load(self, dtype: str | None = None):
        return super().load(dtype or self.dtype)


__all__ = ["DTYPES", "resolve_dtype", "prepare_for_inference", "decode_step", "load_for_inference", "RunOptions",
           "DecodeOptions"]
