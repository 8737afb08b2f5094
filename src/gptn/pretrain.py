"""Pretraining: maximise L1(U) = sum_i log P(u_i | u_{i-k..i-1}) on a prepared corpus.

One loop for one CPU, one GPU or many (torchrun; DDP or FSDP2), with AdamW (weight decay on
matrices only) or Muon, linear warm-up then cosine decay, gradient clipping, gradient accumulation to reach
a batch given in tokens, bf16 autocast on GPUs (fp16 + gradient scaler where bf16 is missing),
periodic validation (loss, perplexity, bits per byte), atomic checkpoints and exact resume. A new
run may start from another's weights (`init_from`: continued, domain-adaptive pretraining) with a
fresh optimizer, schedule and loader.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from .bert import BERT_SPECIALS, mask_tokens, step_generator
from .checkpoint import (TRAIN_CONFIG, checkpoint_dir, claim_out, has_checkpoint, load_config, load_weights,
                         read_train_config, read_train_state, read_weights, run_kind, save_checkpoint, verify_files)
from .compute import softmax_share, training_flops_per_token
from .config import GPTConfig, GptnError, get_preset, is_whole
from .data import BatchLoader, Corpus
from .model import GPT
from .optim import MUON_LR, OPTIMIZERS, make_optimizer
from .options import check_choices, option
from .runtime import PRECISIONS, STRATEGIES, Dist, autocast_dtype, peak_flops
from .train import LOGGER_HELP, Loop, Schedule, fit, lr_at, parse_loggers, run_training, plot_loss_curve  # noqa: F401  (plot_loss_curve: the public name)
from .tokenizer import load_tokenizer


@dataclass
class PretrainConfig:
    """Options of `gptn pretrain`. None means: the preset's value (or the run's, when resuming)."""

    corpus: str = option(help="a folder written by `gptn prepare`", cli="positional")
    out: str = option(help="run directory (an existing run is resumed)")
    init_from: str | None = option(None, "start a new run from the weights of SRC (a gptn run, a fine-tuned run or a "
                                         "folder `gptn import-hf` wrote) with a fresh optimizer, schedule and loader: "
                                         "continued (domain-adaptive) pretraining; the corpus must use SRC's tokenizer",
                                   metavar="SRC")
    preset: str | None = option(None, "model size (default mini; see `gptn sizes`)")
    model_config: str | None = option(None, "a GPTConfig JSON file instead of a preset")
    overrides: dict = field(default_factory=dict)  # GPTConfig fields, e.g. {"dropout": 0.0}: --set KEY=VALUE
    steps: int = option(1000, "optimizer steps in total")
    batch_tokens: int | None = option(None, "tokens per optimizer step, all ranks (default: the preset's)")
    micro_batch: int | None = option(None, "sequences per rank per forward pass (gradient accumulation)")
    lr: float | None = option(None, "peak learning rate (default: the preset's)")
    min_lr: float | None = option(None, "final learning rate of the cosine (default lr/10)")
    warmup_steps: int | None = option(None, "linear warm-up steps (default 2% of steps)")
    weight_decay: float = option(0.1, "AdamW weight decay of the weight matrices (biases, LayerNorm and "
                                      "embeddings: none)")
    optimizer: str | None = option(None, "adamw (GPT-1/2/3's; the default for a new run) or muon: Muon for the "
                                         "linear layers' weights, AdamW for embeddings, biases and LayerNorm; reaches "
                                         "a given loss in fewer tokens (default: the run's)", choices=OPTIMIZERS)
    muon_lr: float | None = option(None, f"Muon's peak learning rate, on the same schedule as lr (default {MUON_LR:g})")
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: no clipping)")
    eval_interval: int = option(250, "steps between validation evaluations (0: none; step 0 and the last step "
                                     "are evaluated too)")
    eval_batches: int = option(20, "validation batches per evaluation (the same windows each time)")
    checkpoint_interval: int = option(500, "steps between checkpoints (one is also written at the end and on Ctrl-C)")
    snapshot_interval: int | None = None  # also keep the weights every N steps in RUN/snapshots/step-N
    log_interval: int = 10
    seed: int = option(1337, "seed of the initialisation, the batches and dropout (a run is a function of it)")
    strategy: str = option("ddp", "under torchrun: ddp or fsdp", choices=STRATEGIES)
    precision: str = option("auto", "autocast: auto is bf16 on GPUs (fp16 without it) and on CPUs where bf16 "
                                    "measures faster", choices=PRECISIONS)
    compile: bool = option(False, "torch.compile the model")
    activation_checkpointing: bool = option(False, "keep only each block's input and recompute the block in "
                                                   "backward: less activation memory for about a third more "
                                                   "compute (gptn compute shows both)")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    peak_flops: float | None = None  # for MFU; default: measured (CPU) or the card's table value
    progress: bool = option(True, "no progress bar or per-step lines (evaluations are still printed)")
    logger: str = option("auto", LOGGER_HELP)
    max_seconds: float | None = option(None, "training-time budget: the cosine decays over whichever of --steps "
                                             "and this runs out first, and the run stops and saves when it is spent")
    stop_at_val_loss: float | None = None  # stop (and save) once validation loss reaches this

    def __post_init__(self):
        for name in ("steps", "eval_batches", "checkpoint_interval", "log_interval"):
            value = getattr(self, name)
            least = 0 if name == "steps" else 1  # steps 0: the random start, evaluated and saved
            if not is_whole(value) or value < least:
                raise GptnError(f"{name} must be a whole number >= {least}, not {value!r}")
        for name in ("lr", "min_lr", "muon_lr", "peak_flops", "max_seconds"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0 or name == "min_lr" and value == 0):
                raise GptnError(f"{name} must be a positive number, not {value!r}")
        for name in ("weight_decay", "grad_clip"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise GptnError(f"{name} must be a number >= 0, not {getattr(self, name)!r}")
        for name in ("batch_tokens", "micro_batch", "snapshot_interval"):
            value = getattr(self, name)
            if value is not None and not (is_whole(value) and value >= 1):
                raise GptnError(f"{name} must be a whole number >= 1, not {value!r}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise GptnError(f"warmup_steps must be >= 0, not {self.warmup_steps}")
        if self.eval_interval < 0:
            raise GptnError(f"eval_interval must be >= 0 (0: no evaluation), not {self.eval_interval}")
        if not 0 <= self.seed < 2**63:
            raise GptnError(f"seed must be a whole number in [0, 2**63), not {self.seed}")
        if self.init_from is not None and (self.preset or self.model_config):
            raise GptnError("--init-from takes the model from its source; drop --preset / --config")
        parse_loggers(self.logger)
        check_choices(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Model construction and resume checks


def resolve_model_config(cfg: PretrainConfig, tokenizer_vocab: int) -> tuple[GPTConfig, object]:
    """The model config of a new run: preset or file, plus overrides, sized to the corpus's tokenizer."""
    if cfg.model_config:
        base, preset = GPTConfig.load(cfg.model_config), None
    else:
        preset = get_preset(cfg.preset or "mini")
        base = preset.config
    overrides = dict(cfg.overrides)
    if "n_ctx" in overrides and overrides["n_ctx"] > base.n_ctx:
        raise GptnError(f"context {overrides['n_ctx']} is longer than the {cfg.preset or 'config'}'s "
                        f"n_ctx={base.n_ctx}; choose a context <= {base.n_ctx}")
    overrides.setdefault("vocab_size", tokenizer_vocab)
    if overrides["vocab_size"] < tokenizer_vocab:
        raise GptnError(f"vocab_size {overrides['vocab_size']} is smaller than the corpus tokenizer's "
                        f"{tokenizer_vocab} tokens")
    config = base.replace(**overrides)
    if not config.causal and "vocab_size" not in cfg.overrides:  # room for [CLS], [SEP], [MASK]
        config = config.replace(vocab_size=tokenizer_vocab + len(BERT_SPECIALS))
    return config, preset


def _check_resume(cfg: PretrainConfig, run: Path, corpus: Corpus, saved_cfg: dict) -> GPTConfig:
    """The saved model config; an error if the options ask for a different model."""
    saved = load_config(run)
    if not (cfg.preset or cfg.model_config or cfg.overrides):
        cfg.preset, cfg.model_config, cfg.overrides = saved_cfg["preset"], saved_cfg["model_config"], saved_cfg["overrides"]
        return saved
    wanted, _ = resolve_model_config(cfg, corpus.tokenizer.vocab_size)
    if wanted != saved:
        diff = {k: (v, getattr(wanted, k)) for k, v in saved.to_dict().items() if getattr(wanted, k) != v}
        raise GptnError(f"{run} holds a different model (saved vs requested: {diff}); "
                        "use another --out, or drop the model options to resume it")
    return saved


def _check_tokenizer(run_tok_dir: Path, corpus: Corpus, tokenizer) -> None:
    if not run_tok_dir.is_dir():
        return
    theirs = load_tokenizer(run_tok_dir)
    if not theirs.same_vocabulary(tokenizer):
        ours, theirs = tokenizer.describe(), theirs.describe()
        raise GptnError(f"the corpus {corpus.folder} was prepared with another tokenizer ({ours['kind']}, "
                        f"{ours['vocab_size']} tokens{_normalized(ours)}) than the model's ({theirs['kind']}, "
                        f"{theirs['vocab_size']} tokens{_normalized(theirs)}); prepare it with "
                        f"--tokenizer {run_tok_dir}")


def _normalized(described: dict) -> str:
    return f", normalised {','.join(described['normalize'])}" if described.get("normalize") else ""


# GPTConfig fields a run started from another's weights may change: neither alters a weight's shape
# (a shorter context keeps the first n_ctx rows of W_p).
INIT_FROM_OVERRIDES = ("dropout", "n_ctx")


def initial_weights(cfg: PretrainConfig, corpus: Corpus) -> tuple[GPTConfig, dict, object]:
    """(config, weights, tokenizer) of `cfg.init_from`: a gptn run, a fine-tuned run (its task head is
    left behind) or a folder `gptn import-hf` wrote; refused when the corpus was tokenized otherwise."""
    source = Path(cfg.init_from)
    ckpt = checkpoint_dir(source)
    config = load_config(source)
    if not (ckpt / "tokenizer").is_dir():
        raise GptnError(f"--init-from {source} has no tokenizer folder; a run continues with its source's tokenizer")
    _check_tokenizer(ckpt / "tokenizer", corpus, corpus.tokenizer)
    changed = {k: v for k, v in cfg.overrides.items() if k not in INIT_FROM_OVERRIDES and getattr(config, k) != v}
    if changed:
        raise GptnError(f"--init-from {source}: --set {', '.join(sorted(changed))} would change the source "
                        f"model's shape; only {' and '.join(INIT_FROM_OVERRIDES)} may be set")
    n_ctx = cfg.overrides.get("n_ctx", config.n_ctx)
    if n_ctx > config.n_ctx:
        raise GptnError(f"--init-from {source}: n_ctx={n_ctx} is longer than the source's {config.n_ctx} "
                        "(it has no position embeddings beyond that)")
    weights = read_weights(ckpt / "model.safetensors")
    weights["wpe.weight"] = weights["wpe.weight"][:n_ctx].clone()
    config = config.replace(**{k: v for k, v in cfg.overrides.items() if k in INIT_FROM_OVERRIDES})
    return config, weights, load_tokenizer(ckpt / "tokenizer")


def _run_tokenizer(corpus: Corpus, config: GPTConfig):
    """The corpus's tokenizer; for a BERT-style encoder, with [CLS], [SEP] and [MASK] added."""
    if config.causal:
        return corpus.tokenizer
    return load_tokenizer(corpus.folder / "tokenizer").add_special_tokens(BERT_SPECIALS)


# ----------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, loader: BatchLoader, n_batches: int, batch_size: int, device, amp, d: Dist,
             objective=None) -> float:
    """Mean loss (nats) over a fixed set of validation windows, split across ranks: next-token loss,
    or the loss of `objective(x, y, i) -> (inputs, targets)` (BERT's masked tokens, the same each time)."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device, dtype=torch.float64), 0
    for i, (x, y) in enumerate(loader.eval_batches(n_batches, batch_size)):
        if i % d.world != d.rank:
            continue
        if objective is not None:
            x, y = objective(x, y, i)
        with amp:
            _, loss = model(x.to(device), y.to(device))
        total += loss.double()
        count += 1
    stats = torch.tensor([total.item(), float(count)], device=device, dtype=torch.float64)
    if d.world > 1:
        dist.all_reduce(stats)
    model.train(was_training)
    return (stats[0] / stats[1]).item()


def _say_schedule(run: Path, step: int, saved_steps: int | None, cfg: PretrainConfig, d: Dist) -> None:
    """A resumed run that was finished, or whose --steps changed, says so: a longer run re-stretches
    the cosine (the rate from here on is not the one the finished schedule ended with)."""
    if not d.is_main or saved_steps is None:
        return
    if step >= cfg.steps:
        print(f"gptn pretrain: {run} is finished at step {step} of {saved_steps}; pass a larger --steps to "
              "train it further (the cosine schedule is then stretched to the new length)", file=sys.stderr)
    elif cfg.steps != saved_steps:
        before = lr_at(step, saved_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
        after = lr_at(step, cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
        print(f"gptn pretrain: {run} goes from {saved_steps} to {cfg.steps} steps: the cosine schedule is "
              f"stretched to the new length, so the rate at step {step} becomes {after:.3g} "
              f"(it was {before:.3g})", file=sys.stderr)


def pretrain(cfg: PretrainConfig) -> dict:
    """Train (or resume) the run in `cfg.out`; returns a summary (steps, losses, tokens/s, paths)."""
    return run_training(cfg.device, cfg.out, lambda d, device: _pretrain(cfg, d, device))


def format_summary(s: dict) -> str:
    """What `gptn pretrain` says at the end: the untrained model's loss beside a uniform guess (step 0),
    that there was nothing to train, or the steps taken and the validation loss."""
    val = s["val"]
    if s["steps"] == s["start_step"] == 0 and val:
        vocab = s["config"]["vocab_size"]
        return (f"{s['run']}: the untrained model (random weights, step 0): validation loss {val['val_loss']:.4f}; "
                f"a uniform guess over {vocab:,} tokens scores ln {vocab:,} = {math.log(vocab):.4f}")
    if s["steps"] == s["start_step"]:
        return f"{s['run']}: nothing to train, already at step {s['steps']}"
    return (f"trained {s['run']}: steps {s['start_step']} -> {s['steps']}, {s['params']:,} parameters, last loss "
            f"{s['last_loss']:.4f}" + (f", validation loss {val['val_loss']:.4f} (perplexity {val['val_ppl']:.2f}, "
                                       f"{val['val_bpb']:.3f} bits/byte)" if val else "")
            + (f"; loss curve {s['loss_curve']}" if s.get("loss_curve") else ""))


class NextTokenObjective:
    """L1 on the corpus's windows (or, for an encoder, BERT's masked tokens of the same windows)."""

    def __init__(self, cfg: PretrainConfig, train_loader: BatchLoader, val_loader: BatchLoader, tokenizer,
                 config: GPTConfig, accum: int, eval_batch: int, bytes_per_token: float, run: Path,
                 tokens_per_step: int):
        self.cfg, self.train, self.val, self.tokenizer, self.config = cfg, train_loader, val_loader, tokenizer, config
        self.accum, self.eval_batch, self.bytes_per_token = accum, eval_batch, bytes_per_token
        self.run, self.tokens_per_step = run, tokens_per_step

    def _inputs(self, x, y, step: int, rank: int, i: int):
        if self.config.causal:
            return x, y
        return mask_tokens(x, self.tokenizer, step_generator(self.cfg.seed, step, rank, i))

    def micro_batches(self, step: int):
        for i, (x, y) in enumerate(self.train.step_batches(step)):
            yield self._inputs(x, y, step, self.train.rank, i)

    def loss(self, model, batch, ctx):
        x, y = batch
        _, loss = model(x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True))
        return loss / (self.accum * ctx.d.world), {}  # equal micro-batches: each a part of the step's mean

    def evaluate(self, model, step: int, ctx):
        fixed = None if self.config.causal else \
            (lambda x, y, i: mask_tokens(x, self.tokenizer, step_generator(self.cfg.seed + 1, 0, 0, i)))
        val = evaluate(model, self.val, self.cfg.eval_batches, self.eval_batch, ctx.device, ctx.amp, ctx.d, fixed)
        record = {"val_loss": val, "val_ppl": math.exp(min(val, 50)), "val_bpb": val / math.log(2) / self.bytes_per_token}
        return record, self.cfg.stop_at_val_loss is not None and val <= self.cfg.stop_at_val_loss

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def after_step(self, step: int, ctx) -> None:
        if self.cfg.snapshot_interval and step % self.cfg.snapshot_interval == 0:
            weights = ctx.full_state()  # a collective under FSDP
            if ctx.d.is_main:
                save_checkpoint(self.run / "snapshots" / f"step-{step:06d}", self.config, weights,
                                tokenizer=self.tokenizer,
                                meta={"kind": "pretrain-snapshot", "step": step, "tokens": step * self.tokens_per_step})


def _pretrain(cfg: PretrainConfig, d: Dist, device: torch.device) -> dict:
    cfg = copy.copy(cfg)  # resolved below (defaults, a resumed run's own settings): the caller's stays as given
    run = Path(cfg.out)
    corpus = Corpus(cfg.corpus)
    ckpt = checkpoint_dir(run) if has_checkpoint(run) else None  # the run's checkpoint, when it has one
    claim_out(run, "pretrain", source=cfg.init_from,
              resumable=ckpt / "train_state.pt" if ckpt and run_kind(run) == "pretrain" else None)
    resuming = ckpt is not None and (ckpt / "train_state.pt").is_file()
    if ckpt is not None and not resuming:
        raise GptnError(f"{run} holds a model but no training state; pretrain into a new --out")
    if resuming:
        verify_files(ckpt)  # config and tokenizer as saved (the weights and state are checked as they are read)
        saved_cfg = read_train_config(run)
        config = _check_resume(cfg, run, corpus, saved_cfg)
        _check_tokenizer(ckpt / "tokenizer", corpus, _run_tokenizer(corpus, config))
        # The schedule and batch are part of the run; the user may extend `steps` or change logging.
        saved_opt = saved_cfg.get("optimizer") or "adamw"
        if cfg.optimizer not in (None, saved_opt):
            raise GptnError(f"{run} was trained with --optimizer {saved_opt}; resume it with that one "
                            "(or use another --out)")
        changed = [f"{k} {saved_cfg.get(k)} -> {getattr(cfg, k)}" for k in ("lr", "min_lr", "warmup_steps", "batch_tokens")
                   if getattr(cfg, k) is not None and saved_cfg.get(k) is not None and getattr(cfg, k) != saved_cfg[k]]
        if changed:  # applied silently, these would make the resumed run a different one than it says it is
            raise GptnError(f"{run} was trained with other settings ({', '.join(changed)}); resume it with its own "
                            "(drop those flags; --steps may grow) or start a new --out, e.g. with --init-from")
        for key in ("batch_tokens", "micro_batch", "lr", "min_lr", "warmup_steps", "seed", "optimizer", "muon_lr",
                    "init_from"):
            setattr(cfg, key, saved_cfg.get(key) if getattr(cfg, key) is None or key in ("seed", "init_from")
                    else getattr(cfg, key))
        preset = get_preset(saved_cfg["preset"]) if saved_cfg.get("preset") else None
        tokenizer = load_tokenizer(ckpt / "tokenizer") if cfg.init_from else None
    elif cfg.init_from:
        config, source_weights, tokenizer = initial_weights(cfg, corpus)
        preset = None
    else:
        config, preset = resolve_model_config(cfg, corpus.tokenizer.vocab_size)
    if not cfg.init_from:
        tokenizer = _run_tokenizer(corpus, config)
    if config.vocab_size < tokenizer.vocab_size:
        raise GptnError(f"the model has {config.vocab_size} tokens but its tokenizer has {tokenizer.vocab_size}")
    corpus.check_ids(tokenizer.vocab_size)

    # Batch: tokens per optimizer step -> sequences -> per-rank micro-batches x accumulation.
    n_ctx = config.n_ctx
    batch_tokens = cfg.batch_tokens or (preset.batch_tokens if preset and preset.batch_tokens else 16 * n_ctx)
    if batch_tokens % n_ctx:
        raise GptnError(f"batch of {batch_tokens} tokens is not a whole number of {n_ctx}-token sequences")
    global_batch = batch_tokens // n_ctx
    if global_batch % d.world:
        raise GptnError(f"batch of {global_batch} sequences is not divisible across {d.world} ranks")
    per_rank = global_batch // d.world
    micro = cfg.micro_batch or per_rank
    if per_rank % micro:
        raise GptnError(f"{per_rank} sequences per rank is not divisible into micro-batches of {micro}")
    accum = per_rank // micro
    lr = cfg.lr or (preset.learning_rate if preset and preset.learning_rate else 6e-4)
    min_lr = cfg.min_lr if cfg.min_lr is not None else lr / 10
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, cfg.steps // 50)
    cfg.batch_tokens, cfg.micro_batch, cfg.lr, cfg.min_lr, cfg.warmup_steps = batch_tokens, micro, lr, min_lr, warmup
    cfg.optimizer, cfg.muon_lr = cfg.optimizer or "adamw", cfg.muon_lr or MUON_LR
    if cfg.optimizer == "muon" and cfg.strategy == "fsdp":
        raise GptnError("--optimizer muon orthogonalises whole weight matrices, which FSDP shards; use --strategy ddp")

    train_loader = BatchLoader(corpus, "train", n_ctx, global_batch, cfg.seed, d.rank, d.world, accum)
    val_split = "val" if corpus.tokens("val") > n_ctx + 1 else "train"
    val_loader = BatchLoader(corpus, val_split, n_ctx, global_batch, cfg.seed + 1)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = GPT(config)
    train_state = None
    if cfg.init_from and not resuming:
        model.load_state_dict(source_weights)
    if resuming:
        load_weights(model, read_weights(ckpt / "model.safetensors"), source=str(ckpt))
        train_state = read_train_state(ckpt / "train_state.pt")
        _say_schedule(run, train_state["step"], saved_cfg.get("steps"), cfg, d)
    model.to(device)
    model.activation_checkpointing = cfg.activation_checkpointing
    if train_state is None:
        torch.manual_seed(cfg.seed + d.rank)  # dropout masks differ across ranks

    if not cfg.model_config:
        cfg.preset = cfg.preset or "mini"
    params_share, flops_share = softmax_share(config, n_ctx)
    if flops_share > 0.5 and d.is_main and train_state is None:
        print(f"gptn pretrain: the tied softmax layer (vocabulary {config.vocab_size:,} x d_model {config.d_model}) "
              f"holds {params_share:.0%} of the parameters and costs {flops_share:.0%} of the training FLOPs; a "
              "smaller vocabulary (gptn prepare --tokenizer bpe:N) would train this model faster", file=sys.stderr)
    amp_dtype = autocast_dtype(cfg.precision, device, config.d_model)
    objective = NextTokenObjective(cfg, train_loader, val_loader, tokenizer, config, accum, min(global_batch, 64),
                                   corpus.bytes_per_token(val_split), run, batch_tokens)
    schedule = Schedule(lr, warmup, cfg.steps, min_lr, "cosine", cfg.max_seconds)
    loop = Loop(steps=cfg.steps, grad_clip=cfg.grad_clip, precision=cfg.precision, d_model=config.d_model,
                compile=cfg.compile,
                strategy=cfg.strategy, eval_interval=cfg.eval_interval, checkpoint_interval=cfg.checkpoint_interval,
                log_interval=cfg.log_interval, max_seconds=cfg.max_seconds, progress=cfg.progress, name="pretrain",
                evaluate_first=True, loggers=parse_loggers(cfg.logger), config=json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
                tokens_per_step=batch_tokens, flops_per_token=training_flops_per_token(config, n_ctx),
                peak_flops=cfg.peak_flops or peak_flops(device, amp_dtype))

    def save(step_done: int, model_sd: dict, state: dict) -> None:
        save_checkpoint(run, config, model_sd, tokenizer=tokenizer,
                        train_state=state,  # the batches are a function of (seed, step): nothing of the loader
                        meta={"kind": "pretrain", "step": step_done, "corpus": str(cfg.corpus),
                              **({"init_from": str(cfg.init_from)} if cfg.init_from else {})},
                        extra_files={TRAIN_CONFIG: json.dumps(cfg.to_dict(), indent=2) + "\n"})

    def optimizer(m):
        return make_optimizer(m, lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device.type, cfg.optimizer, cfg.muon_lr)

    result = fit(model, optimizer, objective, schedule, loop, d, device, run, save, train_state)
    summary = {"run": str(run), "start_step": result.start_step, "params": model.num_parameters(),
               "config": config.to_dict(), "batch_tokens": batch_tokens, "accumulation": accum, "world": d.world,
               "steps": result.steps, "train_seconds": result.train_seconds, "last_loss": result.last_loss,
               "val": result.last_eval, "tokens_per_s": result.tokens_per_s}
    if d.is_main:
        plot = plot_loss_curve(run, f"gptn pretraining: {run.name}")
        summary["loss_curve"] = str(plot) if plot else None
    return summary
