"""Parameter counts, training FLOPs, petaflop/s-days, memory and time to train.

Conventions:
- Training compute is 6 N D (forward 2 N D + backward 4 N D), as GPT-3's Table D.1 counts it,
  with N the total parameter count (embeddings included) and D the number of training tokens.
- The attention term (which 6 N D leaves out) follows PaLM's accounting: 12 n_layer d_model n_ctx
  FLOPs per token for training (QK^T and AV, forward and backward, no causal discount). It matters
  for small models with long contexts, and it is what MFU is measured against.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import GPT3_TOKENS, PRESETS, GPTConfig, GptnError, get_preset
from .options import option, positive

PF_DAY = 1e15 * 86400  # FLOPs in one petaflop/s-day


def parameter_count(config: GPTConfig) -> int:
    """Exact number of parameters of `GPT(config)` (tied output embedding counted once)."""
    d, f, b = config.d_model, config.d_ff, int(config.bias)
    ln = d * (1 + b)
    per_layer = (
        ln + d * 3 * d + 3 * d * b + d * d + d * b  # ln_1, attention (c_attn, c_proj)
        + ln + d * f + f * b + f * d + d * b  # ln_2, MLP (c_fc, c_proj)
    )
    embeddings = config.vocab_size * d + config.n_ctx * d
    final_ln = ln if config.norm == "pre" else 0
    return embeddings + config.n_layer * per_layer + final_ln


def attention_flops_per_token(config: GPTConfig, n_ctx: int | None = None) -> int:
    """Training FLOPs per token spent in QK^T and AV (the part 6N leaves out)."""
    return 12 * config.n_layer * config.d_model * (n_ctx or config.n_ctx)


def training_flops_per_token(config: GPTConfig, n_ctx: int | None = None) -> int:
    """6 N plus the attention term: the figure MFU divides by."""
    return 6 * parameter_count(config) + attention_flops_per_token(config, n_ctx)


def softmax_share(config: GPTConfig, n_ctx: int | None = None) -> tuple[float, float]:
    """(share of the parameters in W_e, share of the training FLOPs in the tied softmax layer, the
    6·V·d_model product per token): most of both for a small model with a large vocabulary."""
    w_e = config.vocab_size * config.d_model
    return w_e / parameter_count(config), 6 * w_e / training_flops_per_token(config, n_ctx)


def training_flops(config: GPTConfig, tokens: float) -> dict:
    """Training compute for `tokens` tokens: the paper's 6 N D and the same with attention added."""
    n = parameter_count(config)
    six_nd = 6 * n * tokens
    with_attention = six_nd + attention_flops_per_token(config) * tokens
    return {
        "params": n,
        "tokens": tokens,
        "flops_6nd": six_nd,
        "flops_with_attention": with_attention,
        "pf_days_6nd": six_nd / PF_DAY,
        "pf_days_with_attention": with_attention / PF_DAY,
    }


@dataclass
class MemoryEstimate:
    """Bytes needed to train, per accelerator (no sharding)."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    activations_checkpointed: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    @property
    def total_checkpointed(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations_checkpointed


def training_memory(config: GPTConfig, micro_batch: int, precision: str = "bf16",
                    fused_attention: bool = True) -> MemoryEstimate:
    """Memory to train with AdamW (Rajbhandari et al. 2020 for states, Korthikanti et al. 2022 for activations).

    precision="bf16": 16-bit weights and gradients plus fp32 master weights and Adam moments
    (2 + 2 + 12 bytes per parameter); "fp32": 4 + 4 + 8. Activations per layer are
    s b h (34 + 5 a s / h) bytes in 16-bit (the 5 a s / h attention-matrix term vanishes with a fused
    attention kernel), doubled in fp32; with full activation checkpointing only each layer's input
    (2 s b h bytes) is kept, plus one layer being recomputed. The softmax layer adds 16 s b V bytes at
    the backward's peak: the fp32 logits, the log-softmax cross-entropy keeps, and both their gradients
    (measured within 7% on CPU, benchmarks/memory.py).
    """
    if precision not in ("bf16", "fp32"):
        raise GptnError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    n = parameter_count(config)
    s, b, h, a, L = config.n_ctx, micro_batch, config.d_model, config.n_head, config.n_layer
    scale = 1 if precision == "bf16" else 2
    per_layer = s * b * h * (34 + (0 if fused_attention else 5 * a * s / h)) * scale
    logits = 16 * s * b * config.vocab_size
    if precision == "bf16":
        weights, grads, opt = 2 * n, 2 * n, 12 * n
    else:
        weights, grads, opt = 4 * n, 4 * n, 8 * n
    return MemoryEstimate(
        weights=weights, gradients=grads, optimizer=opt,
        activations=L * per_layer + logits,
        activations_checkpointed=L * 2 * s * b * h * scale + per_layer + logits,
    )


def time_to_train(flops: float, n_accelerators: int, peak_flops: float, utilisation: float) -> float:
    """Seconds to perform `flops` on n accelerators of `peak_flops` each at `utilisation` (MFU)."""
    if n_accelerators <= 0 or peak_flops <= 0 or not 0 < utilisation <= 1:
        raise GptnError("need accelerators > 0, peak > 0 and utilisation in (0, 1]")
    return flops / (n_accelerators * peak_flops * utilisation)


def preset_table(tokens: float = GPT3_TOKENS) -> list[dict]:
    """One row per preset: shape, batch, lr, exact parameters and compute beside the paper's figures."""
    rows = []
    for name, preset in PRESETS.items():
        c = preset.config
        row = {"name": name, "n_layer": c.n_layer, "d_model": c.d_model, "n_head": c.n_head,
               "d_head": c.d_head, "n_ctx": c.n_ctx, "vocab_size": c.vocab_size, "norm": c.norm,
               "batch_tokens": preset.batch_tokens, "learning_rate": preset.learning_rate}
        row.update(training_flops(c, tokens))
        row.update(paper_params=preset.paper_params, paper_flops=preset.paper_flops,
                   paper_pf_days=preset.paper_pf_days, paper_batch=preset.paper_batch,
                   paper_shape=preset.paper_shape, note=preset.note or None,
                   final_layer_norm=c.norm == "pre", data=preset.data or None)
        rows.append(row)
    return rows


def plan(config: GPTConfig, tokens: float, n_accelerators: int = 1, peak_flops: float = 989e12,
         utilisation: float = 0.4, micro_batch: int = 1, precision: str = "bf16") -> dict:
    """Everything `gptn compute` prints: parameters, FLOPs, PF/s-days, memory and wall time."""
    out = training_flops(config, tokens)
    mem = training_memory(config, micro_batch, precision)
    out["memory_bytes"] = {**asdict(mem), "total": mem.total, "total_checkpointed": mem.total_checkpointed}
    seconds = time_to_train(out["flops_6nd"], n_accelerators, peak_flops, utilisation)
    out.update(n_accelerators=n_accelerators, peak_flops=peak_flops, utilisation=utilisation,
               seconds=seconds, days=seconds / 86400, years=seconds / (365.25 * 86400))
    return out


def si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def human_bytes(x: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if x >= scale:
            return f"{x / scale:.1f} {unit}"
    return f"{x:.0f} B"


def format_preset_table(rows: list[dict], tokens: float) -> list[str]:
    """`gptn sizes`: the presets beside GPT-3's tables, then the pretraining data and the lecture's slips."""
    from .config import DATA, LECTURE_SLIPS
    paper = lambda v, fmt: fmt(v) if v else "-"  # noqa: E731
    lines = [f"{'preset':<12} {'layers':>6} {'d_model':>7} {'heads':>5} {'d_head':>6} {'ctx':>5} {'batch':>6} "
             f"{'paper':>5} {'lr':>8} {'params':>8} {'paper':>8} {'6ND FLOPs':>10} {'paper':>9} {'PF/s-days':>9} "
             f"{'paper':>7} {'+attn FLOPs':>11}  norm"]
    for r in rows:
        mark = lambda key: "*" if key in r["paper_shape"] else ""  # noqa: E731, B023
        lines.append(f"{r['name']:<12} {r['n_layer']:>6} {str(r['d_model']) + mark('d_model'):>7} "
                     f"{str(r['n_head']) + mark('n_head'):>5} {r['d_head']:>6} {r['n_ctx']:>5} "
                     f"{si(r['batch_tokens'] or 0):>6} {r['paper_batch'] or '-':>5} {r['learning_rate'] or 0:>8.2e} "
                     f"{si(r['params']):>8} {paper(r['paper_params'], si):>8} {r['flops_6nd']:>10.3g} "
                     f"{paper(r['paper_flops'], lambda v: f'{v:.3g}'):>9} {r['pf_days_6nd']:>9.3g} "
                     f"{paper(r['paper_pf_days'], lambda v: f'{v:.3g}'):>7} {r['flops_with_attention']:>11.3g}  "
                     + ("pre-LN + final LN" if r["final_layer_norm"] else "post-LN"))
    lines.append(f"(compute for {tokens:.3g} training tokens; 'paper' = GPT-3 Table 2.1 for the batch, Table D.1 "
                 "for parameters and compute; batch = sequences x 2048 tokens, which Table 2.1 rounds)")
    lines += [f"* {r['name']}: {r['note']}" for r in rows if r["paper_shape"]]
    lines.append("norm: post-LN is GPT-1's x = LN(x + sublayer(x)); pre-LN + final LN is GPT-2/3's "
                 "x = x + sublayer(LN(x)) with one more LayerNorm after the last block")
    lines += ["pretraining data:", *(f"  {family.upper():<5} {data}" for family, data in DATA.items())]
    return lines + ["the lecture's own slips:", *(f"  - {slip}" for slip in LECTURE_SLIPS)]


def format_plan(p: dict, n_ctx: int, micro_batch: int, precision: str) -> list[str]:
    """`gptn compute`: a plan from `plan()` as lines of text."""
    m = p["memory_bytes"]
    return [
        f"parameters            {p['params']:,} ({si(p['params'])})",
        f"training tokens       {si(p['tokens'])}",
        f"compute (6ND)         {p['flops_6nd']:.3e} FLOPs = {p['pf_days_6nd']:,.4g} PF/s-days",
        f"compute (+attention)  {p['flops_with_attention']:.3e} FLOPs = {p['pf_days_with_attention']:,.4g} PF/s-days",
        f"memory ({precision}, micro-batch {micro_batch} x {n_ctx}): weights {human_bytes(m['weights'])}, "
        f"gradients {human_bytes(m['gradients'])}, Adam {human_bytes(m['optimizer'])}, activations "
        f"{human_bytes(m['activations'])} ({human_bytes(m['activations_checkpointed'])} with checkpointing)",
        f"total                 {human_bytes(m['total'])} ({human_bytes(m['total_checkpointed'])} with activation "
        "checkpointing)",
        f"time on {p['n_accelerators']} x {p['peak_flops']:.3g} FLOP/s at {p['utilisation']:.0%}: {p['days']:,.4g} days "
        f"({p['years']:,.3g} years)"]


@dataclass(kw_only=True)
class PlanOptions:
    """`gptn compute`."""

    preset: str = option("gpt3-175b", "model preset (see `gptn sizes`)")
    config: str | None = option(None, "a config JSON file instead of a preset")
    tokens: float = option(GPT3_TOKENS, "training tokens", parse=positive(float))
    gpus: int = option(1, "number of accelerators", parse=positive(int))
    peak: float = option(1e15, "peak FLOP/s per accelerator", parse=positive(float))
    mfu: float = option(1.0, "sustained fraction of the peak", parse=positive(float))
    micro_batch: int = option(1, "sequences per accelerator per step (memory)", parse=positive(int))
    precision: str = option("bf16", "the precision of the memory estimate (weights, gradients, activations)",
                            choices=("bf16", "fp32"))
    json: bool = option(False, "print JSON instead of text")


def print_plan(o: PlanOptions) -> None:
    import json
    config = GPTConfig.load(o.config) if o.config else get_preset(o.preset).config
    p = plan(config, o.tokens, o.gpus, o.peak, o.mfu, o.micro_batch, o.precision)
    print(json.dumps(p, indent=2) if o.json else "\n".join(format_plan(p, config.n_ctx, o.micro_batch, o.precision)))
