"""Pretraining: maximise L1(U) = sum_i log P(u_i | u_{i-k..i-1}) on a prepared corpus.

One loop for one CPU, one GPU or many (torchrun; DDP or FSDP2), with AdamW (weight decay on
matrices only) or Muon, linear warm-up then cosine decay, gradient clipping, gradient accumulation to reach
a batch given in tokens, bf16 autocast on GPUs (fp16 + gradient scaler where bf16 is missing),
periodic validation (loss, perplexity, bits per byte), atomic checkpoints and exact resume. A new
run may start from another's weights (`init_from`: continued, domain-adaptive pretraining) with a
fresh optimizer, schedule and loader.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from .bert import BERT_SPECIALS, mask_tokens, step_generator
from .checkpoint import (checkpoint_dir, has_checkpoint, load_config, load_weights, model_state_dict, read_train_state,
                         read_weights, run_lock, save_checkpoint)
from .compute import softmax_share, training_flops_per_token
from .config import GPTConfig, GptnError, get_preset
from .data import BatchLoader, Corpus
from .model import GPT
from .optim import MUON_LR, make_optimizer
from .runtime import Dist, autocast_dtype, peak_flops, setup_distributed
from .tokenizer import load_tokenizer


@dataclass
class PretrainConfig:
    """Options of `gptn pretrain`. None means: the preset's value (or the run's, when resuming)."""

    corpus: str
    out: str
    init_from: str | None = None  # start a new run from this run's (or imported folder's) weights
    preset: str | None = None  # default "mini" for a new run
    model_config: str | None = None  # a GPTConfig JSON file instead of a preset
    overrides: dict = field(default_factory=dict)  # GPTConfig fields, e.g. {"dropout": 0.0}
    steps: int = 1000
    batch_tokens: int | None = None  # tokens per optimizer step (all ranks); default: the preset's
    micro_batch: int | None = None  # sequences per rank per forward; default: the whole rank batch
    lr: float | None = None
    min_lr: float | None = None  # default lr / 10
    warmup_steps: int | None = None  # default 2% of steps
    weight_decay: float = 0.1
    optimizer: str | None = None  # "adamw" (default) or "muon" (Muon for linear weights, AdamW for the rest)
    muon_lr: float | None = None  # Muon's peak rate (default optim.MUON_LR); it follows the same schedule as lr
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_batches: int = 20
    checkpoint_interval: int = 500
    snapshot_interval: int | None = None  # also keep the weights every N steps in RUN/snapshots/step-N
    log_interval: int = 10
    seed: int = 1337
    strategy: str = "ddp"  # under torchrun: "ddp" or "fsdp"
    precision: str = "auto"  # auto: bf16 on GPUs that have it, else fp16 on GPUs, fp32 on CPU
    compile: bool = False
    activation_checkpointing: bool = False  # recompute each block in backward: memory for ~1/3 more compute
    device: str = "auto"
    peak_flops: float | None = None  # for MFU; default: measured (CPU) or the card's table value
    progress: bool = True
    max_seconds: float | None = None  # stop (and save) after this much training time
    stop_at_val_loss: float | None = None  # stop (and save) once validation loss reaches this

    def __post_init__(self):
        for name in ("steps", "eval_batches", "checkpoint_interval", "log_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GptnError(f"{name} must be a whole number >= 1, not {value!r}")
        for name in ("lr", "min_lr", "muon_lr", "peak_flops", "max_seconds"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0 or name == "min_lr" and value == 0):
                raise GptnError(f"{name} must be a positive number, not {value!r}")
        for name in ("weight_decay", "grad_clip"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise GptnError(f"{name} must be a number >= 0, not {getattr(self, name)!r}")
        for name in ("batch_tokens", "micro_batch", "snapshot_interval"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise GptnError(f"{name} must be a whole number >= 1, not {value!r}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise GptnError(f"warmup_steps must be >= 0, not {self.warmup_steps}")
        if self.eval_interval < 0:
            raise GptnError(f"eval_interval must be >= 0 (0: no evaluation), not {self.eval_interval}")
        if not 0 <= self.seed < 2**63:
            raise GptnError(f"seed must be a whole number in [0, 2**63), not {self.seed}")
        if self.init_from is not None and (self.preset or self.model_config):
            raise GptnError("--init-from takes the model from its source; drop --preset / --config")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Schedule and optimizer


def lr_at(step: int, total: int, lr: float, min_lr: float, warmup: int) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr` at `total` steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


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
    if config.arch == "bert" and "vocab_size" not in cfg.overrides:  # room for [CLS], [SEP], [MASK]
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
    if config.arch != "bert":
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


# ----------------------------------------------------------------------------------------------
# The loop


class MetricsLog:
    """metrics.jsonl in the run directory (and TensorBoard when it is installed)."""

    def __init__(self, run: Path, resume_step: int | None, enabled: bool):
        self.path = run / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():  # drop records a killed run wrote after its checkpoint
            kept = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(k + "\n" for k in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()


def _wrap(model: GPT, strategy: str, d: Dist, device: torch.device):
    if d.world == 1:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in model.h:
            fully_shard(block)
        fully_shard(model)
        return model
    raise GptnError(f"--strategy must be ddp or fsdp, not {strategy!r}")


def _full_state(model, optimizer, strategy: str, d: Dist):
    """Full (unsharded) model and optimizer state dicts, on rank 0's CPU."""
    if d.world > 1 and strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)
    return model_state_dict(model), optimizer.state_dict()


def _load_optimizer_state(model, optimizer, optim_sd, strategy: str, d: Dist):
    if d.world > 1 and strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(optim_sd)


def _rng_state(device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class _InterruptFlag:
    """Ctrl-C during training finishes the current step, saves a checkpoint and then interrupts,
    instead of losing the steps since the last checkpoint."""

    def __init__(self):
        self.seen = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, _signum, _frame):
        if self.seen:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.seen = True
        print("\ngptn pretrain: interrupted; saving a checkpoint after this step (Ctrl-C again to stop now)",
              file=sys.stderr)

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


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
    d, device = setup_distributed(cfg.device)
    try:
        with run_lock(cfg.out) if d.is_main else nullcontext():
            return _pretrain(cfg, d, device)
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _pretrain(cfg: PretrainConfig, d: Dist, device: torch.device) -> dict:
    run = Path(cfg.out)
    corpus = Corpus(cfg.corpus)
    resuming = has_checkpoint(run) and (checkpoint_dir(run) / "train_state.pt").is_file()
    if has_checkpoint(run) and not resuming:
        raise GptnError(f"{run} holds a model but no training state; pretrain into a new --out")
    if resuming:
        saved_cfg = json.loads((run / "train_config.json").read_text())
        config = _check_resume(cfg, run, corpus, saved_cfg)
        _check_tokenizer(checkpoint_dir(run) / "tokenizer", corpus, _run_tokenizer(corpus, config))
        # The schedule and batch are part of the run; the user may extend `steps` or change logging.
        saved_opt = saved_cfg.get("optimizer") or "adamw"
        if cfg.optimizer not in (None, saved_opt):
            raise GptnError(f"{run} was trained with --optimizer {saved_opt}; resume it with that one "
                            "(or use another --out)")
        for key in ("batch_tokens", "micro_batch", "lr", "min_lr", "warmup_steps", "seed", "optimizer", "muon_lr",
                    "init_from"):
            setattr(cfg, key, saved_cfg.get(key) if getattr(cfg, key) is None or key in ("seed", "init_from")
                    else getattr(cfg, key))
        preset = get_preset(saved_cfg["preset"]) if saved_cfg.get("preset") else None
        tokenizer = load_tokenizer(checkpoint_dir(run) / "tokenizer") if cfg.init_from else None
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
    if cfg.optimizer not in ("adamw", "muon"):
        raise GptnError(f"--optimizer must be adamw or muon, not {cfg.optimizer!r}")
    if cfg.optimizer == "muon" and cfg.strategy == "fsdp":
        raise GptnError("--optimizer muon orthogonalises whole weight matrices, which FSDP shards; use --strategy ddp")

    train_loader = BatchLoader(corpus, "train", n_ctx, global_batch, cfg.seed, d.rank, d.world, accum)
    val_split = "val" if corpus.tokens("val") > n_ctx + 1 else "train"
    val_loader = BatchLoader(corpus, val_split, n_ctx, global_batch, cfg.seed + 1)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = GPT(config)
    step = 0
    train_state = None
    if cfg.init_from and not resuming:
        model.load_state_dict(source_weights)
    if resuming:
        load_weights(model, read_weights(checkpoint_dir(run) / "model.safetensors"), source=str(checkpoint_dir(run)))
        train_state = read_train_state(checkpoint_dir(run) / "train_state.pt")
        step = train_state["step"]
        _say_schedule(run, step, saved_cfg.get("steps"), cfg, d)
    model.to(device)
    model.activation_checkpointing = cfg.activation_checkpointing
    wrapped = _wrap(model, cfg.strategy, d, device)
    optimizer = make_optimizer(model, lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), device.type,
                               cfg.optimizer, cfg.muon_lr)
    if train_state is not None:
        _load_optimizer_state(model, optimizer, train_state["optimizer"], cfg.strategy, d)
        rng = train_state["rng"]
        _set_rng_state(rng[d.rank] if d.rank < len(rng) else rng[0], device)
    else:
        torch.manual_seed(cfg.seed + d.rank)  # dropout masks differ across ranks
    amp_dtype = autocast_dtype(cfg.precision, device)
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    forward = torch.compile(wrapped) if cfg.compile else wrapped

    if d.is_main:
        run.mkdir(parents=True, exist_ok=True)
        if not cfg.model_config:
            cfg.preset = cfg.preset or "mini"
        (run / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    log = MetricsLog(run, step if resuming else None, d.is_main)
    flops_per_token = training_flops_per_token(config, n_ctx)
    params_share, flops_share = softmax_share(config, n_ctx)
    if flops_share > 0.5 and d.is_main and step == 0:
        print(f"gptn pretrain: the tied softmax layer (vocabulary {config.vocab_size:,} x d_model {config.d_model}) "
              f"holds {params_share:.0%} of the parameters and costs {flops_share:.0%} of the training FLOPs; a "
              "smaller vocabulary (gptn prepare --tokenizer bpe:N) would train this model faster", file=sys.stderr)
    peak = cfg.peak_flops or peak_flops(device, amp_dtype)
    bytes_per_token = corpus.bytes_per_token(val_split)

    def save(step_done: int) -> None:
        model_sd, optim_sd = _full_state(wrapped, optimizer, cfg.strategy, d)
        rng = [None] * d.world
        if d.world > 1:
            dist.all_gather_object(rng, _rng_state(device))
        else:
            rng = [_rng_state(device)]
        if d.is_main:
            save_checkpoint(run, config, model_sd, tokenizer=tokenizer,
                            train_state={"step": step_done, "optimizer": optim_sd, "rng": rng,
                                         "loader": {"seed": cfg.seed, "next_step": step_done},
                                         "scheduler": {"lr": lr, "min_lr": min_lr, "warmup": warmup, "total": cfg.steps}},
                            meta={"kind": "pretrain", "step": step_done, "corpus": str(cfg.corpus),
                                  **({"init_from": str(cfg.init_from)} if cfg.init_from else {})})
        if d.world > 1:
            dist.barrier()

    def run_eval(at_step: int) -> dict:
        masked = (lambda x, y, i: mask_tokens(x, tokenizer, step_generator(cfg.seed + 1, 0, 0, i))) \
            if config.arch == "bert" else None
        val = evaluate(wrapped, val_loader, cfg.eval_batches, min(global_batch, 64), device, amp, d, masked)
        record = {"step": at_step, "val_loss": val, "val_ppl": math.exp(min(val, 50)),
                  "val_bpb": val / math.log(2) / bytes_per_token}
        log.write(record)
        return record

    from tqdm import tqdm
    bar = tqdm(total=cfg.steps, initial=step, desc="pretrain", unit="step", file=sys.stderr,
               disable=not (cfg.progress and d.is_main), dynamic_ncols=True)
    summary = {"run": str(run), "start_step": step, "params": model.num_parameters(), "config": config.to_dict(),
               "batch_tokens": batch_tokens, "accumulation": accum, "world": d.world}
    last_eval = None
    tokens_per_step = batch_tokens
    train_time = 0.0
    losses = []
    model.train()
    interrupted = _InterruptFlag()
    while step < cfg.steps:
        t0 = time.perf_counter()
        lr_now = lr_at(step, cfg.steps, lr, min_lr, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr_now * group.get("lr_scale", 1.0)
        loss_sum = torch.zeros((), device=device)
        for i, (x, y) in enumerate(train_loader.step_batches(step)):
            if config.arch == "bert":  # masked-LM instead of next-token: same windows, other targets
                x, y = mask_tokens(x, tokenizer, step_generator(cfg.seed, step, d.rank, i))
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            last = i == accum - 1
            sync = nullcontext()
            if d.world > 1 and not last:
                if cfg.strategy == "ddp":
                    sync = wrapped.no_sync()
                else:
                    wrapped.set_requires_gradient_sync(False)
            elif d.world > 1 and cfg.strategy == "fsdp":
                wrapped.set_requires_gradient_sync(True)
            with sync, amp:
                _, loss = forward(x, y)
                loss = loss / accum
            (scaler.scale(loss) if scaler else loss).backward()
            loss_sum += loss.detach()
        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if d.world > 1:
            dist.all_reduce(loss_sum)  # SUM: gloo has no AVG
            loss_sum /= d.world
        loss_value = loss_sum.item()
        step += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        train_time += dt
        if not math.isfinite(loss_value):
            bar.close()
            interrupted.restore()
            raise GptnError(f"loss is {loss_value} at step {step}; stopping (the last good checkpoint in {run} is kept)")
        losses.append(loss_value)
        tok_s = tokens_per_step / dt
        mfu = tok_s * flops_per_token / (peak * d.world)
        if step % cfg.log_interval == 0 or step == cfg.steps:
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            log.write({"step": step, "loss": loss_value, "lr": lr_now, "tokens": step * tokens_per_step,
                       "tokens_per_s": tok_s, "mfu": mfu, "grad_norm": float(grad_norm) if grad_norm is not None else None,
                       "time": train_time})
        bar.set_postfix_str(f"loss {loss_value:.4f}  {tok_s:,.0f} tok/s  MFU {mfu:.1%}" +
                            (f"  val {last_eval['val_loss']:.4f}" if last_eval else ""), refresh=False)
        bar.update(1)
        stop = cfg.max_seconds is not None and train_time >= cfg.max_seconds or interrupted.seen
        if cfg.eval_interval and (step % cfg.eval_interval == 0 or step == cfg.steps or stop):
            last_eval = run_eval(step)
            if cfg.stop_at_val_loss is not None and last_eval["val_loss"] <= cfg.stop_at_val_loss:
                stop = True
        if step % cfg.checkpoint_interval == 0 or step == cfg.steps or stop:
            save(step)
        if cfg.snapshot_interval and step % cfg.snapshot_interval == 0:
            weights = _full_state(wrapped, optimizer, cfg.strategy, d)[0]  # a collective under FSDP
            if d.is_main:
                save_checkpoint(run / "snapshots" / f"step-{step:06d}", config, weights, tokenizer=tokenizer,
                                meta={"kind": "pretrain-snapshot", "step": step, "tokens": step * tokens_per_step,
                                      "train_seconds": train_time})
        if stop:
            break
    bar.close()
    interrupted.restore()
    if step == summary["start_step"] and not has_checkpoint(run):
        save(step)
    log.close()
    if interrupted.seen:  # the steps so far are saved; the CLI exits with 130
        raise KeyboardInterrupt
    summary.update(steps=step, train_seconds=train_time, last_loss=losses[-1] if losses else None,
                   val=last_eval, tokens_per_s=(len(losses) * tokens_per_step / train_time) if train_time else None)
    if d.is_main:
        plot = plot_loss_curve(run)
        summary["loss_curve"] = str(plot) if plot else None
    return summary


def plot_loss_curve(run: str | Path) -> Path | None:
    """RUN/loss.png from metrics.jsonl (needs matplotlib; returns None without it)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    run = Path(run)
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln] \
        if (run / "metrics.jsonl").exists() else []
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(f"gptn pretraining: {run.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run / "loss.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
