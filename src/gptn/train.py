"""The one training loop, for every objective: next-token pretraining (L1), BERT's masked LM, and
GPT-1's fine-tuning (L3 = L2 + λ·L1).

`fit` owns what does not depend on the objective: the learning-rate schedule (a step budget, a time
budget or both), gradient accumulation with `no_sync`, DDP or FSDP2 under torchrun, bf16 / fp16
autocast (with a gradient scaler for fp16), clipping, the NaN stop that names the step, metrics
(JSONL, TensorBoard when installed, a loss-curve PNG), periodic evaluation, atomic checkpoints and
exact resume (model, optimizer, RNG streams, the objective's own state), Ctrl-C that saves first,
`torch.compile` and activation checkpointing. An objective supplies the micro-batches of a step, the
loss of one, and its evaluation.
"""

from __future__ import annotations

import csv
import json
import math
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch
import torch.distributed as dist

from .checkpoint import model_state_dict, read_metrics, run_lock
from .config import GptnError
from .model import Block
from .runtime import Dist, autocast, autocast_dtype, setup_distributed


# ----------------------------------------------------------------------------------------------
# Schedule


def lr_at(step: int, total: int, lr: float, min_lr: float, warmup: int) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr` at `total` steps."""
    return Schedule(lr, warmup, total, min_lr).at(step)


WARMUP_SHARE = 0.02  # of a time budget, as pretraining's default warm-up is 1/50 of the steps (pretrain.py)


@dataclass
class Schedule:
    """Linear warm-up over `warmup` steps, then decay to `min_lr`: a cosine (GPT-2/3) or a straight
    line (GPT-1's fine-tuning). With `max_seconds` the warm-up and the decay follow whichever budget
    is spent faster, steps or training time (warm-up: `warmup` steps or WARMUP_SHARE of the time), so
    a run stopped by its time budget was warmed up and still ends annealed."""

    lr: float
    warmup: int
    total: int
    min_lr: float = 0.0
    decay: str = "cosine"  # or "linear"
    max_seconds: float | None = None

    def progress(self, step: int, elapsed: float = 0.0) -> float:
        """How far through the decay (0..1) training is after `step` steps and `elapsed` seconds."""
        by_steps = (step - self.warmup) / max(1, self.total - self.warmup)
        by_time = elapsed / self.max_seconds if self.max_seconds else 0.0
        return min(1.0, max(by_steps, by_time, 0.0))

    def at(self, step: int, elapsed: float = 0.0) -> float:
        if step < self.warmup:
            warmed = (step + 1) / self.warmup
            if self.max_seconds:
                # A step count that is only a cap (10^5 steps, 5 minutes) would otherwise warm up for ever.
                warmed = max(warmed, elapsed / (WARMUP_SHARE * self.max_seconds))
            if warmed < 1:
                return self.lr * warmed
        p = self.progress(step, elapsed)
        shape = 0.5 * (1.0 + math.cos(math.pi * p)) if self.decay == "cosine" else 1.0 - p
        return self.min_lr + shape * (self.lr - self.min_lr)


# ----------------------------------------------------------------------------------------------
# What an objective plugs in


@dataclass
class Context:
    """What the loop hands an objective: where it runs, the autocast context, and (a collective under
    FSDP) the full model state."""

    d: Dist
    device: torch.device
    amp: object
    full_state: Callable[[], dict]


class Objective(Protocol):
    def micro_batches(self, step: int) -> Iterable[object]:
        """This rank's micro-batches of optimizer step `step`: a pure function of the step, so that a
        resumed run sees the batches an uninterrupted one would."""

    def loss(self, model, batch, ctx: Context) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(this micro-batch's part of the step's loss, named parts to log, likewise): the parts of all
        micro-batches of all ranks add up to the step's loss, a mean over the whole step's batch."""

    def evaluate(self, model, step: int, ctx: Context) -> tuple[dict, bool]:
        """(metrics to log, whether to stop now) after step `step`."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def after_step(self, step: int, ctx: Context) -> None: ...


@dataclass
class Loop:
    """The loop's own options (the objective's options live in its config)."""

    steps: int
    grad_clip: float = 1.0
    precision: str = "auto"
    d_model: int | None = None  # for precision auto on a CPU
    compile: bool = False
    strategy: str = "ddp"
    eval_interval: int = 0  # 0: never
    checkpoint_interval: int = 500
    log_interval: int = 10
    max_seconds: float | None = None
    progress: bool = True
    # Evaluate the untrained model before the first update (step 0 in the metrics): pretraining's
    # loss starts near ln(vocabulary size), the loss of a uniform guess.
    evaluate_first: bool = False
    loggers: tuple[str, ...] = ()  # trackers beside metrics.jsonl (parse_loggers)
    config: dict | None = None  # what the trackers record as the run's config
    name: str = "train"  # the progress bar's and messages' label
    tokens_per_step: int | None = None  # for tokens/s
    flops_per_token: float | None = None  # with peak_flops: MFU
    peak_flops: float | None = None


@dataclass
class Result:
    start_step: int
    steps: int
    train_seconds: float
    last_loss: float | None
    last_eval: dict | None
    tokens_per_s: float | None


# ----------------------------------------------------------------------------------------------
# Pieces of the loop


LOGGERS = ("tensorboard", "wandb", "csv")
LOGGER_HELP = ("where to log besides RUN/metrics.jsonl: a comma list of tensorboard (RUN/tensorboard), wandb "
               "(Weights & Biases; WANDB_MODE=offline writes RUN/wandb), csv (RUN/metrics.csv), or none; "
               "default auto: tensorboard when it is installed")


def parse_loggers(spec: str) -> tuple[str, ...]:
    """The loggers a `--logger` value names ("auto", "none", or a comma list of LOGGERS)."""
    names = tuple(dict.fromkeys(x.strip() for x in str(spec).split(",") if x.strip()))
    if names == ("auto",):
        try:
            import torch.utils.tensorboard  # noqa: F401
            return ("tensorboard",)
        except Exception:  # tensorboard is optional
            return ()
    if names == ("none",):
        return ()
    unknown = [n for n in names if n not in LOGGERS]
    if unknown or not names:
        raise GptnError(f"--logger {spec!r}: expected auto, none or a comma list of {', '.join(LOGGERS)}")
    for name, module in (("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")):
        if name in names:
            try:
                __import__(module)
            except Exception:
                raise GptnError(f"--logger {name}: the {name} package is not installed (pip install {name})") from None
    return names


class MetricsLog:
    """metrics.jsonl in the run directory, and the trackers `loggers` names (parse_loggers): each gets
    the run's config at the start and every record; at the end, the last value of each metric."""

    def __init__(self, run: Path, resume_step: int | None, enabled: bool, loggers: tuple[str, ...] = (),
                 config: dict | None = None, name: str = "train"):
        self.run, self.path = run, run / "metrics.jsonl"
        self.enabled, self.loggers = enabled, loggers
        self.tb = self.wandb = None
        self.last: dict = {}
        if not enabled:
            return
        run.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():  # drop records a killed run wrote after its checkpoint
            kept = [r for r in read_metrics(run) if r.get("step", 0) <= resume_step]  # and lines cut short
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run / "tensorboard"))
            if config:
                self.tb.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```")
        if "wandb" in loggers:
            import wandb
            self.wandb = wandb.init(dir=str(run), name=run.name, job_type=name, config=config or {},
                                    resume="allow", id=_wandb_id(run))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.last.update(numbers)
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, record["step"])
        if self.wandb is not None:
            self.wandb.log(numbers, step=record["step"])

    def close(self):
        if not self.enabled:
            return
        if self.tb is not None:
            if self.last:
                self.tb.add_text("final_metrics", json.dumps(self.last))
            self.tb.close()
        if self.wandb is not None:
            self.wandb.summary.update({f"final/{k}": v for k, v in self.last.items()})
            self.wandb.finish()
        if "csv" in self.loggers and self.path.exists():  # one row per record, one column per metric ever seen
            records = read_metrics(self.run)
            columns = list(dict.fromkeys(k for r in records for k in r))
            with open(self.run / "metrics.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, columns)
                writer.writeheader()
                writer.writerows(records)


def _wandb_id(run: Path) -> str:
    """One W&B run per gptn run, kept across resumptions (written beside the metrics)."""
    path = run / "wandb_id"
    if not path.exists():
        import uuid
        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()


class InterruptFlag:
    """Ctrl-C during training finishes the current step, saves a checkpoint and then interrupts,
    instead of losing the steps since the last checkpoint."""

    def __init__(self, name: str):
        self.seen, self.name = False, name
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, _signum, _frame):
        if self.seen:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.seen = True
        print(f"\ngptn {self.name}: interrupted; saving a checkpoint after this step (Ctrl-C again to stop now)",
              file=sys.stderr)

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def wrap(model: torch.nn.Module, strategy: str, d: Dist, device: torch.device):
    """DDP, or FSDP2 with each transformer block its own shard unit; the model itself on one rank."""
    if d.world == 1:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in (m for m in model.modules() if isinstance(m, Block)):
            fully_shard(block)
        fully_shard(model)
        return model
    raise GptnError(f"--strategy must be ddp or fsdp, not {strategy!r}")


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model, strategy: str, d: Dist) -> dict:
    """The full (unsharded) model state dict, on rank 0's CPU: a collective under FSDP."""
    if d.world > 1 and strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        return get_model_state_dict(model, options=_full_options())
    return model_state_dict(model)


def full_state(model, optimizer, strategy: str, d: Dist):
    """Full (unsharded) model and optimizer state dicts, on rank 0's CPU."""
    if d.world > 1 and strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        optim_sd = get_optimizer_state_dict(model, optimizer, options=_full_options())
    else:
        optim_sd = optimizer.state_dict()
    return full_model_state(model, strategy, d), optim_sd


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


def _sync_context(wrapped, strategy: str, d: Dist, last: bool):
    """Gradients are reduced across ranks on the last micro-batch of a step only."""
    if d.world == 1:
        return nullcontext()
    if strategy == "ddp":
        return nullcontext() if last else wrapped.no_sync()
    wrapped.set_requires_gradient_sync(last)
    return nullcontext()


# ----------------------------------------------------------------------------------------------
# The loop


def run_training(device: str, out: str | Path, body: Callable[[Dist, torch.device], dict]) -> dict:
    """`body(d, device)` on this process's rank (torch.distributed set up under torchrun, and torn
    down after), holding the run directory's lock on rank 0."""
    d, dev = setup_distributed(device)
    try:
        with run_lock(out) if d.is_main else nullcontext():
            return body(d, dev)
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def fit(model: torch.nn.Module, make_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
        objective: Objective, schedule: Schedule, loop: Loop, d: Dist, device: torch.device, run: Path,
        save: Callable[[int, dict, dict], None], resume: dict | None = None) -> Result:
    """Train `model` (already on `device`) for `loop.steps` optimizer steps from `resume` (a train
    state `save` was given before) or from step 0. The optimizer is made after the model is wrapped
    (FSDP2 replaces the parameters). `save(step, model_state, train_state)` is called on rank 0 to
    write a checkpoint; it must write atomically."""
    wrapped = wrap(model, loop.strategy, d, device)
    optimizer = make_optimizer(model)
    step = 0
    if resume is not None:
        _load_optimizer_state(wrapped, optimizer, resume["optimizer"], loop.strategy, d)
        rng = resume["rng"]
        _set_rng_state(rng[d.rank] if d.rank < len(rng) else rng[0], device)
        objective.load_state_dict(resume.get("objective", {}))
        step = resume["step"]
    amp_dtype = autocast_dtype(loop.precision, device, loop.d_model)
    amp = autocast(loop.precision, device, loop.d_model)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    forward = torch.compile(wrapped) if loop.compile else wrapped
    ctx = Context(d, device, amp, lambda: full_model_state(wrapped, loop.strategy, d))

    def checkpoint(step_done: int) -> None:
        model_sd, optim_sd = full_state(wrapped, optimizer, loop.strategy, d)
        rng = [None] * d.world
        if d.world > 1:
            dist.all_gather_object(rng, _rng_state(device))
        else:
            rng = [_rng_state(device)]
        if d.is_main:
            save(step_done, model_sd, {"step": step_done, "train_seconds": train_time, "optimizer": optim_sd, "rng": rng,
                                       "objective": objective.state_dict(),
                                       "scheduler": {**vars(schedule)}})  # the schedule this state belongs to
        if d.world > 1:
            dist.barrier()

    log = MetricsLog(run, step if resume is not None else None, d.is_main, loop.loggers, loop.config, loop.name)
    from tqdm import tqdm
    # Under a time budget the step count is only a cap: the bar counts steps and says the time left.
    # A bar on a terminal; piped (a log file, CI), one plain line per log interval instead of tqdm's
    # \r frames, as litgpt and the HF Trainer print.
    plain = loop.progress and d.is_main and not sys.stderr.isatty()
    bar = tqdm(total=None if loop.max_seconds else loop.steps, initial=step, desc=loop.name, unit="step",
               file=sys.stderr, disable=not (loop.progress and d.is_main) or plain, dynamic_ncols=True)
    # The time budget is the run's: a resumed run goes on from the training time already spent.
    start_step, losses, last_eval = step, [], None
    train_time = resume.get("train_seconds", 0.0) if resume is not None else 0.0
    interrupted = InterruptFlag(loop.name)

    def evaluate(step: int):
        metrics, stop_now = objective.evaluate(wrapped, step, ctx)
        if metrics:
            log.write({"step": step, **metrics})
            if d.is_main:  # evaluations are printed with or without --no-progress
                bar.write(f"{loop.name} step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                                  if isinstance(v, float)), file=sys.stderr)
        return metrics, stop_now

    try:
        if loop.evaluate_first and resume is None and (loop.eval_interval or loop.steps == 0):
            last_eval = evaluate(0)[0] or None
        wrapped.train()
        # A resumed run whose time budget is spent already has nothing left to do (not one more step).
        while step < loop.steps and not (loop.max_seconds is not None and train_time >= loop.max_seconds):
            t0 = time.perf_counter()
            lr_now = schedule.at(step, train_time)
            for group in optimizer.param_groups:
                group["lr"] = lr_now * group.get("lr_scale", 1.0)
            micro = list(objective.micro_batches(step))
            loss_sum = torch.zeros((), device=device)
            parts: dict[str, torch.Tensor] = {}
            for i, batch in enumerate(micro):
                with _sync_context(wrapped, loop.strategy, d, i == len(micro) - 1), amp:
                    loss, named = objective.loss(forward, batch, ctx)
                    scaled = loss * d.world  # DDP and FSDP average gradients over ranks; the parts add up
                (scaler.scale(scaled) if scaler else scaled).backward()
                loss_sum += loss.detach().float()
                for k, v in named.items():
                    parts[k] = parts.get(k, 0) + v.detach().float()
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), loop.grad_clip) if loop.grad_clip > 0 else None
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            values = torch.stack([loss_sum, *parts.values()])
            if d.world > 1:
                dist.all_reduce(values)  # SUM of the parts: the step's mean
            loss_value, *part_values = values.tolist()
            step += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            train_time += dt
            if not math.isfinite(loss_value):
                raise GptnError(f"loss is {loss_value} at step {step}; stopping (the last good checkpoint in {run} "
                                "is kept); lower --lr")
            losses.append(loss_value)
            record = {"step": step, "loss": loss_value, **dict(zip(parts, part_values)), "lr": lr_now, "time": train_time}
            if loop.tokens_per_step:
                record.update(tokens=step * loop.tokens_per_step, tokens_per_s=loop.tokens_per_step / dt)
                if loop.flops_per_token and loop.peak_flops:
                    record["mfu"] = record["tokens_per_s"] * loop.flops_per_token / (loop.peak_flops * d.world)
            if step % loop.log_interval == 0 or step == loop.steps:
                if hasattr(grad_norm, "full_tensor"):
                    grad_norm = grad_norm.full_tensor()
                log.write({**record, "grad_norm": float(grad_norm) if grad_norm is not None else None})
            status = (f"loss {loss_value:.4f}" +
                      (f"  {record['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in record else "") +
                      (f"  MFU {record['mfu']:.1%}" if "mfu" in record else "") +
                      (f"  val {_headline(last_eval)}" if last_eval else "") +
                      (f"  {max(0.0, loop.max_seconds - train_time):.0f} s left" if loop.max_seconds else ""))
            bar.set_postfix_str(status, refresh=False)
            bar.update(1)
            if plain and (step % loop.log_interval == 0 or step == loop.steps):
                print(f"{loop.name} step {step}" + ("" if loop.max_seconds else f"/{loop.steps}") + f": {status}",
                      file=sys.stderr, flush=True)
            stop = loop.max_seconds is not None and train_time >= loop.max_seconds or interrupted.seen
            if loop.eval_interval and (step % loop.eval_interval == 0 or step == loop.steps or stop):
                metrics, stop_now = evaluate(step)
                last_eval = metrics or last_eval
                stop = stop or stop_now
            if step % loop.checkpoint_interval == 0 or step == loop.steps or stop:
                checkpoint(step)
            objective.after_step(step, ctx)
            if stop:
                break
        if step == start_step and resume is None:
            checkpoint(step)
    finally:
        bar.close()
        interrupted.restore()
        log.close()
    if interrupted.seen:  # the steps so far are saved; the CLI exits with 130
        raise KeyboardInterrupt
    spent = train_time - (resume.get("train_seconds", 0.0) if resume is not None else 0.0)
    return Result(start_step, step, train_time, losses[-1] if losses else None, last_eval,
                  len(losses) * loop.tokens_per_step / spent if spent and loop.tokens_per_step else None)


def _headline(metrics: dict) -> str:
    value = next((v for v in metrics.values() if isinstance(v, float)), None)
    return f"{value:.4f}" if value is not None else ""


def plot_loss_curve(run: str | Path, title: str | None = None) -> Path | None:
    """RUN/loss.png from metrics.jsonl (needs matplotlib; returns None without it)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    run = Path(run)
    records = read_metrics(run)
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
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title or f"gptn: {run.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run / "loss.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
