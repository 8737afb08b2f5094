"""GPT-1 transfer learning: the pretrained GPT plus one linear layer, trained on a small labeled set.

GPT-1 (Radford et al., 2018, §3.3) turns every task into token sequences the pretrained model can read,
framed by a start token s, a delimiter $ and an extract token e; the head reads h_n at e. What each
kind of task does differently (its sequences, how they meet the head, its metric) is its class in
task_types.py.

The objective is L3 = L2 + λ·L1: the task loss plus the language-model loss on the same inputs.
Beside GPT-1's head on the extract token, the head may read h_n averaged over the input
(`pooling="mean"`), and the blocks' matrices may be fine-tuned with Muon.

Inputs longer than the context (`long_inputs`):
- "windows": classification texts (and entailment premises) are read in overlapping windows, each framed
  s ... e like a whole input, and the head reads the mean of the windows' features: every token is
  seen, at the cost of one forward pass per window (a review of 4 contexts' length costs ~7 windows).
- "tail": tokens are dropped from the start of the longest segment (for multiple choice, from the
  start of the context first), so the words nearest the extract token are kept (one pass);
- "head": the same from the end, keeping the start of the text.
Similarity and multiple choice always truncate ("head" or "tail"; "windows" reads as "tail" there).
Under "windows", `train_windows="one"` trains each epoch on one window of each long input, drawn at random
(evaluation and prediction still read them all): a forward pass per example instead of one per window.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bert import CLS, SEP
from .checkpoint import (checkpoint_dir, claim_out, has_checkpoint, load_model, load_weights, read_run,
                         read_train_state, read_weights, save_checkpoint)
from .config import GptnError, is_number, is_whole, read_json, require_one_input
from .inference import RunOptions
from .model import GPT, next_token_loss
from .optim import MUON_LR, OPTIMIZERS
from .options import check_choices, option
from .runtime import PRECISIONS, STRATEGIES, resolve_device
from .task_types import TASK_TYPES
from .tasks import Columns, Example, TaskData, read_task_file
from .train import LOGGER_HELP, Loop, Schedule, fit, parse_loggers, run_training
from .tokenizer import DELIM, EXTRACT, START, Tokenizer

POOLINGS = ("extract", "mean")
LONG_INPUTS = ("windows", "tail", "head")
LONG_INPUTS_HELP = ("windows: read the whole input in overlapping windows and average their features (a "
                    "forward pass per window); tail: keep its end; head: keep its start")
TRAIN_WINDOWS = ("all", "one")
HEAD_FILE = "head.safetensors"
TASK_FILE = "task.json"


# ----------------------------------------------------------------------------------------------
# GPT-1's input transformations


def input_sequences(task: str, example: Example, tokenizer: Tokenizer, n_ctx: int, causal: bool = True,
                    long_inputs: str = "tail") -> list[list[int]]:
    """The token sequences GPT-1 builds for one example (one, two for similarity, one per choice; one
    per window of a long classification or entailment input under long_inputs="windows").

    For a BERT-style encoder: [CLS] A [SEP] (B [SEP]), the head reading [CLS] at position 0.
    """
    if task not in TASK_TYPES:
        raise GptnError(f"unknown task {task!r}: expected one of {', '.join(TASK_TYPES)}")
    marks = (CLS, SEP, SEP) if not causal else (START, DELIM, EXTRACT)
    return TASK_TYPES[task].sequences([tokenizer.encode(t) for t in example.segments],
                                      [tokenizer.encode(c) for c in example.choices],
                                      tuple(tokenizer.special_tokens[t] for t in marks), n_ctx, long_inputs)


def pack(items: list[int], sizes: list[int], limit: int) -> list[list[int]]:
    """`items` in order, in consecutive groups of at most `limit` total size (an item larger than
    the limit alone)."""
    groups, current, total = [], [], 0
    for item, size in zip(items, sizes):
        if current and total + size > limit:
            groups.append(current)
            current, total = [], 0
        current.append(item)
        total += size
    return groups + [current] if current else groups


@dataclass
class Batch:
    ids: torch.Tensor  # (S, T) every sequence of the batch, right-padded
    lengths: torch.Tensor  # (S,)
    groups: list[int]  # sequences per example: 1, 2 (similarity) or K (multiple choice)


def collate(sequences: list[list[list[int]]], pad_id: int) -> Batch:
    flat = [s for seqs in sequences for s in seqs]
    T = max(map(len, flat))
    ids = torch.full((len(flat), T), pad_id, dtype=torch.long)
    for i, s in enumerate(flat):
        ids[i, :len(s)] = torch.tensor(s)
    return Batch(ids, torch.tensor([len(s) for s in flat]), [len(seqs) for seqs in sequences])


# ----------------------------------------------------------------------------------------------
# The task model: the same GPT, one linear head


@dataclass
class TaskSpec:
    """What a fine-tuned head predicts; saved as task.json beside the checkpoint."""

    task: str
    labels: list[str] = field(default_factory=list)  # class names (empty for regression and multiple choice)
    regression: bool = False
    pooling: str = "extract"  # what the head reads: h_n at the extract token (GPT-1), or "mean" over the tokens
    long_inputs: str = "tail"  # runs fine-tuned before windows existed truncated like this

    def sequences(self, example: Example, tokenizer: Tokenizer, config) -> list[list[int]]:
        """The token sequences the model reads for `example` (GPT-1's input transformation)."""
        return input_sequences(self.task, example, tokenizer, config.n_ctx, config.causal, self.long_inputs)

    @property
    def kind(self):
        """Its TaskType (task_types.py)."""
        return TASK_TYPES[self.task]

    @property
    def n_outputs(self) -> int:
        return self.kind.n_outputs(self.labels, self.regression)

    @property
    def metric(self) -> str:
        """The validation metric the best checkpoint is chosen by."""
        return self.kind.metric(self.labels, self.regression)


class TaskModel(nn.Module):
    """GPT + dropout + linear layer on h_n at the extract token (GPT-1 §3.2); for a BERT-style
    encoder, on h_n at the classification token, with segment embeddings for sentence B."""

    def __init__(self, gpt: GPT, spec: TaskSpec, head_dropout: float = 0.1, sep_id: int | None = None):
        super().__init__()
        self.gpt, self.spec, self.sep_id = gpt, spec, sep_id
        self.head_dropout = nn.Dropout(head_dropout)
        self.head = nn.Linear(gpt.config.d_model, spec.n_outputs)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, batch: Batch, with_lm_loss: bool = True):
        """(task outputs, L1). Outputs: (N, labels) logits, (N,) scores, or (N, K) choice logits."""
        ids = batch.ids.to(self.head.weight.device)
        lengths = batch.lengths.to(ids.device)
        if not self.gpt.config.causal:
            is_sep = ids == self.sep_id
            segments = (is_sep.cumsum(1) - is_sep.long()).clamp(max=1)  # 0 up to the first [SEP], then 1
            pad = torch.arange(ids.size(1), device=ids.device)[None] < lengths[:, None]
            h = self.gpt.hidden_states(ids, attention_mask=pad, segment_ids=segments)  # (S, T, C)
            h_extract = h[:, 0]  # [CLS]
        else:
            h = self.gpt.hidden_states(ids)  # (S, T, C); right padding is invisible to a causal model
            if self.spec.pooling == "mean":
                real = (torch.arange(ids.size(1), device=ids.device)[None] < lengths[:, None]).to(h.dtype)
                h_extract = (h * real[..., None]).sum(1) / lengths[:, None].to(h.dtype)  # (S, C)
            else:
                h_extract = h[torch.arange(len(ids), device=ids.device), lengths - 1]  # (S, C)
        kind = self.spec.kind
        out = self.head(self.head_dropout(kind.features(h_extract, batch.groups)))  # (N, C) -> head
        out = kind.outputs(out, batch.groups, self.spec.regression)
        lm_loss = None
        if with_lm_loss:
            # The tied softmax on real positions only: the shorter sequences of a batch are padded to the longest (half
            # of SST-2's tokens), and with a vocabulary of thousands this layer is much of a step. The same mean.
            real = torch.arange(1, ids.size(1), device=ids.device) < lengths[:, None]
            h_lm, targets = h[:, :-1], ids[:, 1:].masked_fill(~real, -100)
            if not torch.compiler.is_compiling():  # there a data-dependent shape would break the graph
                h_lm, targets = h_lm[real], targets[real]
            lm_loss = next_token_loss(self.gpt.tied_logits(h_lm), targets)
        return out, lm_loss



def task_loss(spec: TaskSpec, out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L2 as a mean over the examples: cross-entropy over labels or choices, squared error for scores."""
    targets = targets.to(out.device)
    return F.mse_loss(out.float(), targets.float()) if spec.regression else F.cross_entropy(out.float(), targets)


def l3_loss(model: TaskModel, spec: TaskSpec, batch: Batch, targets: torch.Tensor, lm_weight: float,
            example_share: float = 1.0, token_share: float = 1.0) -> tuple[torch.Tensor, dict]:
    """GPT-1's L3 = L2 + λ·L1: the task loss plus λ times the LM loss on the same inputs, and its parts.
    At λ = 0 the LM loss is not computed at all (fine-tuning sets λ = 0 for an encoder). The shares weight
    a micro-batch's mean by its part of the step's examples (L2) and tokens (L1). `model` may be wrapped
    (DDP, FSDP)."""
    out, lm_loss = model(batch, with_lm_loss=lm_weight > 0)
    l2 = task_loss(spec, out, targets) * example_share
    if lm_loss is None:
        return l2, {"task_loss": l2}
    l1 = lm_loss * token_share
    return l2 + lm_weight * l1, {"task_loss": l2, "lm_loss": l1}


# ----------------------------------------------------------------------------------------------
# Metrics


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks with ties averaged (Spearman's convention)."""
    order = torch.argsort(x)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    for v in torch.unique(x):
        tied = x == v
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = a.norm() * b.norm()
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def compute_metrics(spec: TaskSpec, predictions: list, gold: list) -> dict:
    """accuracy (+ F1 of the positive class for two-class similarity); Pearson and Spearman for scores."""
    if spec.regression:
        p = torch.tensor(predictions, dtype=torch.float64)
        g = torch.tensor(gold, dtype=torch.float64)
        return {"pearson": _pearson(p, g), "spearman": _pearson(_ranks(p), _ranks(g)), "mse": float(((p - g) ** 2).mean())}
    correct = sum(p == g for p, g in zip(predictions, gold))
    metrics = {"accuracy": correct / max(1, len(gold))}
    if not spec.kind.choices and len(spec.labels) == 2:
        positive = "1" if "1" in spec.labels else spec.labels[1]
        tp = sum(p == positive and g == positive for p, g in zip(predictions, gold))
        fp = sum(p == positive and g != positive for p, g in zip(predictions, gold))
        fn = sum(p != positive and g == positive for p, g in zip(predictions, gold))
        metrics["f1"] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return metrics


# ----------------------------------------------------------------------------------------------
# Fine-tuning


@dataclass
class FinetuneConfig:
    run: str = option(help="pretrained run directory (or an imported model folder)", cli="positional")
    train: str = option(help="training examples (TSV, CSV, JSONL, HellaSwag .txt)")
    out: str = option(help="run directory for the fine-tuned model")
    val: str | None = option(None, "validation examples; the best checkpoint by its metric is kept (without: the "
                                   "final model, with no evaluation passes)")
    task: str | None = option(None, "task type: classification, entailment, similarity, multiple_choice or one "
                                    "registered in task_types.TASK_TYPES (default: recognised from the file's layout)")
    columns: Columns = field(default_factory=Columns)
    regression: bool | None = option(None, "the label is a score (e.g. similarity 0-5), predicted with mean "
                                           "squared error")
    epochs: int = option(3, "passes over the training examples (GPT-1: 3)")
    batch_size: int = option(32, "examples per optimizer step (GPT-1: 32)")
    lr: float = option(6.25e-5, "peak learning rate (GPT-1: 6.25e-5), warm-up then linear decay")
    warmup_fraction: float = option(0.002, "share of the steps for the linear warm-up (GPT-1: 0.002)")
    layer_lr_decay: float = option(1.0, "discriminative rates (ULMFiT used 1/2.6): each block learns at this "
                                        "times the rate of the block above, the head and final LayerNorm at --lr, "
                                        "the embeddings one step below the first block; 1: one rate for all")
    weight_decay: float = option(0.01, "AdamW weight decay of the weight matrices (biases, LayerNorm and "
                                       "embeddings: none)")
    lm_weight: float = option(0.5, "λ of the auxiliary LM loss in L3 = L2 + λ·L1 (0 disables)")
    pooling: str = option("extract", "what the linear head reads: h_n at the extract token (GPT-1) or h_n "
                                     "averaged over the input", choices=POOLINGS)
    long_inputs: str = option("windows", "inputs longer than the context: " + LONG_INPUTS_HELP, choices=LONG_INPUTS)
    train_windows: str = option("all", "with --long-inputs windows, what a training step reads of a long input: all "
                                       "its windows, as evaluation does, or one drawn at random each epoch (one "
                                       "forward pass per example instead of one per window)", choices=TRAIN_WINDOWS)
    optimizer: str = option("adamw", "adamw (GPT-1's) or muon: Muon for the blocks' matrices (at --muon-lr), "
                                     "AdamW for embeddings, LayerNorm and the head", choices=OPTIMIZERS)
    muon_lr: float | None = option(None, f"Muon's peak rate (default {MUON_LR / 10:g})")
    dropout: float = option(0.1, "residual, attention and embedding dropout during fine-tuning")
    head_dropout: float = option(0.1, "dropout before the linear head")
    grad_clip: float = option(1.0, "clip the gradient norm to this (0: no clipping)")
    max_train_examples: int | None = option(None, "fine-tune on a random subset of this size")
    from_scratch: bool = option(False, "random initial weights of the same shape: the no-pretraining baseline")
    activation_checkpointing: bool = option(False, "recompute each block in backward: less activation memory for "
                                                   "about a third more compute")
    evals_per_epoch: int = option(1, "validation evaluations per epoch (the best is kept)")
    micro_batch: int | None = option(None, "examples per rank per forward pass (gradient accumulation; default: "
                                           "all, long inputs' windows in groups of --batch-size)")
    precision: str = option("auto", "autocast: auto is bf16 on GPUs (fp16 without it) and on CPUs where bf16 "
                                    "measures faster", choices=PRECISIONS)
    compile: bool = option(False, "torch.compile the model")
    strategy: str = option("ddp", "under torchrun: ddp or fsdp", choices=STRATEGIES)
    checkpoint_interval: int | None = option(None, "steps between resumable checkpoints in OUT/resume (default: "
                                                   "at each evaluation); a killed run started again with the same "
                                                   "options resumes exactly")
    seed: int = option(1337, "seed of the initialisation, the batches and dropout (a run is a function of it)")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    progress: bool = option(True, "no progress bar or per-step lines (evaluations are still printed)")
    logger: str = option("auto", LOGGER_HELP)

    def __post_init__(self):
        for name in ("epochs", "batch_size", "evals_per_epoch"):
            if getattr(self, name) < 1:
                raise GptnError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("micro_batch", "checkpoint_interval"):
            value = getattr(self, name)
            if value is not None and not (is_whole(value) and value >= 1):
                raise GptnError(f"{name} must be a whole number >= 1, not {value!r}")
        for name in ("lr", "lm_weight", "weight_decay", "dropout", "head_dropout", "grad_clip", "warmup_fraction"):
            if not is_number(getattr(self, name)):
                raise GptnError(f"{name} must be a finite number, not {getattr(self, name)!r}")
        if self.lr <= 0:
            raise GptnError(f"lr must be positive, not {self.lr}")
        for name in ("weight_decay", "grad_clip", "warmup_fraction", "dropout", "head_dropout"):
            if getattr(self, name) < 0:
                raise GptnError(f"{name} must be >= 0, not {getattr(self, name)}")
        if self.lm_weight < 0:
            raise GptnError(f"lm_weight (λ) must be >= 0, not {self.lm_weight}")
        if self.max_train_examples is not None and self.max_train_examples < 1:
            raise GptnError(f"max_train_examples must be at least 1 (or unset for all), not {self.max_train_examples}")
        if not 0 <= self.seed < 2**63:
            raise GptnError(f"seed must be a whole number in [0, 2**63), not {self.seed}")
        if not 0 <= self.warmup_fraction < 1:
            raise GptnError(f"warmup_fraction must be in [0, 1), not {self.warmup_fraction}")
        if not (is_number(self.layer_lr_decay) and 0 < self.layer_lr_decay <= 1):
            raise GptnError(f"layer_lr_decay must be in (0, 1], not {self.layer_lr_decay!r}")
        if self.muon_lr is not None and not self.muon_lr > 0:
            raise GptnError(f"muon_lr must be positive, not {self.muon_lr}")
        parse_loggers(self.logger)
        check_choices(self)


def with_new_token_rows(state: dict[str, torch.Tensor], model: GPT) -> dict[str, torch.Tensor]:
    """Pretrained weights for `model`, whose W_e may have more rows (GPT-1's start/delimiter/extract
    tokens): the pretrained rows kept, the new ones as `model` initialised them (N(0, 0.02))."""
    wte, rows = state["wte.weight"], model.config.vocab_size
    if wte.shape[0] < rows:
        state = {**state, "wte.weight": torch.cat([wte, model.wte.weight.detach()[wte.shape[0]:rows]])}
    return state


def task_gpt(cfg: FinetuneConfig, resuming: bool) -> tuple[GPT, Tokenizer]:
    """The GPT fine-tuning starts from, built (and randomly initialised) once: the source's shape at the
    fine-tuning dropout, with rows for GPT-1's added tokens in W_e (a decoder), and the source's weights
    unless --from-scratch or a resumed run's own replace them (then they are not read at all)."""
    ckpt, config, tokenizer = read_run(cfg.run)
    if tokenizer is None:
        raise GptnError(f"{cfg.run} has no tokenizer folder; fine-tuning needs the model's tokenizer")
    if config.causal:
        tokenizer.add_special_tokens()
    gpt = GPT(config.replace(dropout=cfg.dropout, vocab_size=max(config.vocab_size, tokenizer.vocab_size)))
    if not (cfg.from_scratch or resuming):
        load_weights(gpt, with_new_token_rows(read_weights(ckpt / "model.safetensors"), gpt), source=str(ckpt))
    return gpt, tokenizer


def _targets(spec: TaskSpec, examples: list[Example]) -> torch.Tensor:
    if spec.regression:
        return torch.tensor([float(x.label) for x in examples])
    if spec.kind.choices:
        return torch.tensor([int(x.label) for x in examples])
    return torch.tensor([spec.labels.index(x.label) for x in examples])


def _decode_outputs(spec: TaskSpec, out: torch.Tensor) -> tuple[list, list]:
    """(predicted labels, probabilities or scores) from the head's outputs."""
    if spec.regression:
        scores = out.float().tolist()
        return scores, scores
    probs = out.float().softmax(-1)
    best = probs.argmax(-1).tolist()
    preds = best if spec.kind.choices else [spec.labels[i] for i in best]
    return preds, probs.tolist()


@torch.no_grad()
def run_task_model(model: TaskModel, tokenizer: Tokenizer, examples: list[Example], batch_size: int = 32):
    """Predicted labels and probabilities (or scores) for `examples`, in order."""
    was_training = model.training
    model.eval()
    seqs = [model.spec.sequences(x, tokenizer, model.gpt.config) for x in examples]
    # Batches of similar length: padding to the longest of a random batch wastes half the work on
    # sentences, and no output depends on the padding (causal mask; BERT's attention mask). A batch
    # holds up to batch_size sequences (an input read in many windows is a batch of its own).
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), max(map(len, seqs[i]))))
    preds, probs = [None] * len(seqs), [None] * len(seqs)
    for idx in pack(order, [len(seqs[i]) for i in order], batch_size):
        out, _ = model(collate([seqs[j] for j in idx], tokenizer.eot_id), with_lm_loss=False)
        for j, p, q in zip(idx, *_decode_outputs(model.spec, out)):
            preds[j], probs[j] = p, q
    model.train(was_training)
    return preds, probs


def evaluate_task(model: TaskModel, tokenizer: Tokenizer, examples: list[Example], batch_size: int = 32) -> dict:
    preds, _ = run_task_model(model, tokenizer, examples, batch_size)
    return compute_metrics(model.spec, preds, [x.label for x in examples])


def _save(out: Path, config, state: dict, tokenizer: Tokenizer, spec: TaskSpec, meta: dict,
          train_state: dict | None = None) -> None:
    """A fine-tuned checkpoint: the GPT's weights, the head beside them, the task description."""
    head = {k: v for k, v in state.items() if k.startswith("head.")}
    gpt_state = {k.removeprefix("gpt."): v for k, v in state.items() if k.startswith("gpt.")}
    save_checkpoint(out, config, gpt_state, tokenizer, meta=meta, train_state=train_state,
                    extra_files={TASK_FILE: json.dumps(asdict(spec), indent=2) + "\n"},
                    extra_tensors={HEAD_FILE: head})


# Options that may differ between a killed fine-tuning run and its resumption.
RESUMABLE_CHANGES = ("progress", "device", "checkpoint_interval", "logger")


class TaskObjective:
    """GPT-1's L3 = L2 + λ·L1 over epochs of shuffled examples; keeps the best checkpoint by the
    validation metric, or without validation examples the latest model (the final one once done). L2 is
    a mean over the step's examples and L1 over its tokens, however the step is split into micro-batches
    and ranks."""

    def __init__(self, cfg: FinetuneConfig, model: TaskModel, tokenizer: Tokenizer, train_seqs: list, targets,
                 val_examples: list | None, lm_weight: float, steps_per_epoch: int, out: Path, d, meta: dict):
        self.cfg, self.model, self.tokenizer, self.seqs, self.targets = cfg, model, tokenizer, train_seqs, targets
        self.val_examples, self.lm_weight, self.steps_per_epoch = val_examples, lm_weight, steps_per_epoch
        self.out, self.d, self.meta = out, d, meta
        self.spec = model.spec
        self.best, self.history = None, []
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:  # each epoch's shuffle from its own seed: a resumed run shuffles alike
            gen = torch.Generator().manual_seed(self.cfg.seed * 1009 + epoch)
            self._orders = {epoch: torch.randperm(len(self.seqs), generator=gen).tolist()}
        return self._orders[epoch]

    def micro_batches(self, step: int):
        epoch, b = divmod(step, self.steps_per_epoch)
        idx = self._order(epoch)[b * self.cfg.batch_size:(b + 1) * self.cfg.batch_size]
        per_rank = math.ceil(len(idx) / self.d.world)  # contiguous slices: the same micro-batches as one rank
        mine = idx[self.d.rank * per_rank:(self.d.rank + 1) * per_rank]
        weight = 1.0
        if not mine:  # a short last batch leaves this rank nothing: a weightless example keeps ranks in step
            mine, weight = idx[:1], 0.0
        seqs = {i: self._read(i, epoch) for i in idx}
        lm_tokens = {i: sum(len(s) - 1 for s in seqs[i]) for i in idx}  # L1's targets per example
        step_tokens = sum(lm_tokens.values())
        for part in self._split(mine, seqs):
            yield (collate([seqs[i] for i in part], self.tokenizer.eot_id), self.targets[part],
                   weight * len(part) / len(idx), weight * sum(lm_tokens[i] for i in part) / max(1, step_tokens))

    def _read(self, i: int, epoch: int) -> list[list[int]]:
        """The sequences example i trains on in `epoch`: all of them, or under train_windows="one" one
        window, drawn from the seed, the epoch and the example (a resumed run draws alike)."""
        seqs = self.seqs[i]
        if self.cfg.train_windows == "all" or len(seqs) == 1:
            return seqs
        return [seqs[random.Random(f"{self.cfg.seed}/{epoch}/{i}").randrange(len(seqs))]]

    def _split(self, mine: list[int], seqs: dict) -> list[list[int]]:
        """--micro-batch examples per forward; by default all of them, except that inputs read in
        several windows are grouped at most batch_size sequences a forward (a step of 32 long reviews
        would otherwise be a forward of up to 32 x MAX_WINDOWS sequences)."""
        if self.cfg.micro_batch:
            return [mine[k:k + self.cfg.micro_batch] for k in range(0, len(mine), self.cfg.micro_batch)]
        if self.spec.long_inputs != "windows" or not self.spec.kind.windows:
            return [mine]
        return pack(mine, [len(seqs[i]) for i in mine], self.cfg.batch_size)

    def loss(self, model, batch, ctx):
        inputs, targets, example_share, token_share = batch
        return l3_loss(model, self.spec, inputs, targets, self.lm_weight, example_share, token_share)

    def evaluate(self, model, step: int, ctx):
        epoch = math.ceil(step / self.steps_per_epoch)
        if self.val_examples is None:
            # No validation set: keep the latest model, as the HF Trainer does. Scoring the training examples
            # instead kept the epoch where training accuracy first peaked, before the schedule's end (often
            # with few examples, which a model soon fits), and cost a pass over them at every evaluation.
            self._keep(step, epoch, None, {}, ctx)
            return {}, False
        with ctx.amp:  # training's autocast, as pretraining's validation loss (bf16: about half the time on a CPU)
            metrics = evaluate_task(self.model, self.tokenizer, self.val_examples)
        self.history.append({"step": step, "epoch": epoch, **metrics})
        value = metrics[self.spec.metric]
        if self.best is None or value > self.best["value"]:
            self._keep(step, epoch, value, metrics, ctx)
        return {f"val_{k}": v for k, v in metrics.items()}, False

    def _keep(self, step: int, epoch: int, value: float | None, metrics: dict, ctx) -> None:
        """Save the model now as the run's checkpoint."""
        self.best = {"value": value, "step": step, "epoch": epoch, "metrics": metrics}
        state = ctx.full_state()  # a collective under FSDP
        if ctx.d.is_main:
            _save(self.out, self.model.gpt.config, state, self.tokenizer, self.spec,
                  {**self.meta, "step": step, "metric": self.spec.metric, "value": value, "metrics": metrics})

    def state_dict(self) -> dict:
        return {"best": self.best, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.history = state.get("best"), state.get("history", [])

    def after_step(self, step: int, ctx) -> None:
        pass


def _resume_state(cfg: FinetuneConfig, out: Path) -> dict | None:
    """The train state of a killed fine-tuning run in `out` (None when there is none to resume); an
    error when that run was started with other options."""
    resume = out / "resume"
    if not (has_checkpoint(resume) and (checkpoint_dir(resume) / "train_state.pt").is_file()):
        return None
    state = read_train_state(checkpoint_dir(resume) / "train_state.pt")
    saved = state["objective"].get("config", {})
    ours = json.loads(json.dumps(asdict(cfg)))
    changed = sorted(k for k in ours if k not in RESUMABLE_CHANGES and saved.get(k) != ours[k])
    if changed:
        raise GptnError(f"{out} holds an unfinished fine-tuning run with other options ({', '.join(changed)}); "
                        f"resume it with the same options, or remove {resume} to start again")
    return state


def finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune a pretrained GPT on a labeled task with L3 = L2 + λ·L1; keep the best checkpoint by
    validation metric in `cfg.out` (without `cfg.val`, the final model), and resume a killed run
    exactly. Works under torchrun (DDP or FSDP2). Returns a summary (best metric, its epoch/step, val
    metrics; the value None without validation examples)."""
    return run_training(cfg.device, cfg.out, lambda d, device: _finetune(cfg, d, device))


def _finetune(cfg: FinetuneConfig, d, device: torch.device) -> dict:
    from .optim import MUON_LR, make_optimizer

    train_data = read_task_file(cfg.train, cfg.task, cfg.columns, cfg.regression)
    task = train_data.task
    val_data = read_task_file(cfg.val, task, cfg.columns, train_data.regression) if cfg.val else None
    if cfg.max_train_examples:
        rng = random.Random(cfg.seed)
        train_data.examples = rng.sample(train_data.examples, min(cfg.max_train_examples, len(train_data.examples)))
    if train_data.regression or TASK_TYPES[task].choices:
        labels = []
    else:
        labels = sorted({x.label for x in train_data.examples})
        if len(labels) < 2:
            raise GptnError(f"{cfg.train}: only one label ({labels}) in the training set; a classifier needs two or more")
        if val_data:
            unknown = sorted({x.label for x in val_data.examples} - set(labels))
            if unknown:
                raise GptnError(f"{cfg.val}: labels {unknown[:5]} never occur in the training set {cfg.train}")
    spec = TaskSpec(task, labels, train_data.regression, cfg.pooling, cfg.long_inputs)
    out = Path(cfg.out)
    claim_out(out, "finetune", source=cfg.run, resumable=out / "resume")
    resume = _resume_state(cfg, out)

    torch.manual_seed(cfg.seed)
    gpt, tokenizer = task_gpt(cfg, resuming=resume is not None)
    arch = gpt.config.arch
    if not gpt.config.causal and cfg.lm_weight > 0 and cfg.progress and d.is_main:
        print("gptn finetune: a BERT-style encoder has no next-token objective; training on the task loss alone "
              "(λ = 0)", file=sys.stderr)
    lm_weight = cfg.lm_weight if gpt.config.causal else 0.0
    gpt.activation_checkpointing = cfg.activation_checkpointing
    model = TaskModel(gpt, spec, cfg.head_dropout, tokenizer.special_tokens.get(SEP))
    if resume is not None:
        ckpt = checkpoint_dir(out / "resume")
        load_weights(model.gpt, read_weights(ckpt / "model.safetensors"), source=str(ckpt))
        load_weights(model.head, {k.removeprefix("head."): v for k, v in read_weights(ckpt / HEAD_FILE).items()},
                     source=str(ckpt / HEAD_FILE))
    model.to(device)

    train_seqs = [spec.sequences(x, tokenizer, gpt.config) for x in train_data.examples]
    if cfg.progress and d.is_main:  # what the model actually reads (GPT-1's input transformation)
        from .describe import describe_inputs
        print(f"gptn finetune: {task} inputs, e.g. " + "; ".join(
            describe_inputs(spec, train_data.examples[0], tokenizer, gpt.config)), file=sys.stderr)
    steps_per_epoch = math.ceil(len(train_seqs) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    eval_every = max(1, steps_per_epoch // cfg.evals_per_epoch)
    meta = {"kind": "finetune", "task": task, "source": str(cfg.run), "from_scratch": cfg.from_scratch,
            "lm_weight": lm_weight, "arch": arch}
    objective = TaskObjective(cfg, model, tokenizer, train_seqs, _targets(spec, train_data.examples),
                              val_data.examples if val_data else None, lm_weight, steps_per_epoch,
                              out, d, meta)
    # GPT-1: linear warm-up over 0.2% of training, then linear decay to 0.
    schedule = Schedule(cfg.lr, max(1, round(cfg.warmup_fraction * total)), total, 0.0, "linear")
    loop = Loop(steps=total, grad_clip=cfg.grad_clip, precision=cfg.precision, d_model=gpt.config.d_model,
                compile=cfg.compile,
                strategy=cfg.strategy, eval_interval=eval_every, checkpoint_interval=cfg.checkpoint_interval or eval_every,
                log_interval=1, progress=cfg.progress, name=f"finetune ({task})", loggers=parse_loggers(cfg.logger),
                config=json.loads(json.dumps(asdict(cfg), default=str)))

    def optimizer(m):
        return make_optimizer(m, cfg.lr, cfg.weight_decay, (0.9, 0.999), device.type, cfg.optimizer,
                              cfg.muon_lr or MUON_LR / 10, adamw_only=[m.head], layer_decay=cfg.layer_lr_decay)

    def save(step_done: int, state: dict, train_state: dict) -> None:
        train_state["objective"]["config"] = json.loads(json.dumps(asdict(cfg)))
        _save(out / "resume", gpt.config, state, tokenizer, spec, {**meta, "step": step_done}, train_state)

    started = time.time()
    result = fit(model, optimizer, objective, schedule, loop, d, device, out, save, resume)
    if d.is_main and result.steps >= total:  # finished: the best checkpoint is the run; nothing to resume
        shutil.rmtree(out / "resume", ignore_errors=True)
    return {"task": task, "metric": spec.metric, "best": objective.best, "history": objective.history,
            "train_examples": len(train_seqs), "steps": result.steps, "seconds": time.time() - started,
            "checkpoint": str(out / "checkpoint")}


# ----------------------------------------------------------------------------------------------
# Loading a fine-tuned run and predicting


def load_task_model(run: str | Path, device: str | torch.device = "cpu") -> tuple[TaskModel, Tokenizer]:
    """A fine-tuned run: the GPT, its head and label names, and the tokenizer; in eval mode on `device`
    (auto, cpu, cuda or cuda:N)."""
    device = resolve_device(device) if isinstance(device, str) else device
    ckpt = checkpoint_dir(run)
    if not (ckpt / TASK_FILE).is_file() or not (ckpt / HEAD_FILE).is_file():
        raise GptnError(f"{run} is not a fine-tuned run (no {TASK_FILE} / {HEAD_FILE}); make one with `gptn finetune`")
    gpt, tokenizer = load_model(run, device=device)
    try:
        spec = TaskSpec(**read_json(ckpt / TASK_FILE))
    except TypeError as e:
        raise GptnError(f"{ckpt / TASK_FILE} is not a readable task description ({e})") from None
    model = TaskModel(gpt, spec, sep_id=tokenizer.special_tokens.get(SEP) if tokenizer else None)
    head = {k.removeprefix("head."): v for k, v in read_weights(ckpt / HEAD_FILE).items()}
    load_weights(model.head, head, source=str(ckpt / HEAD_FILE))
    return model.to(device).eval(), tokenizer


def predict(model: TaskModel, tokenizer: Tokenizer, examples: list[Example], batch_size: int = 32) -> list[dict]:
    """One record per example: the predicted label (or score, or choice index) and the probabilities."""
    preds, probs = run_task_model(model, tokenizer, examples, batch_size)
    spec = model.spec
    records = []
    for x, p, q in zip(examples, preds, probs):
        rec = {"input": list(x.segments), "prediction": p}
        if spec.kind.choices:
            rec["choices"] = list(x.choices)
            rec["probs"] = q
        elif not spec.regression:
            rec["probs"] = dict(zip(spec.labels, q))
        if x.label is not None:
            rec["label"] = x.label
        records.append(rec)
    return records


@dataclass(kw_only=True)
class PredictOptions(RunOptions):
    """`gptn predict` (RUN is a fine-tuned run; the column flags are Columns')."""

    file: str | None = option(None, "examples to label (same layouts as finetune; labels optional, and scored when "
                                    "present)", cli="positional")
    text: str | None = option(None, "the text (or premise / sentence A / context)")
    text_b: str | None = option(None, "the second text, for entailment and similarity")
    choice: list[str] = option(help="a candidate answer (repeatable), multiple choice", factory=list)
    show_inputs: bool = option(False, "also print the token sequences built for each example (start, delimiter and "
                                      "extract tokens named; both orders for similarity; one sequence per choice or "
                                      "window)")
    long_inputs: str | None = option(None, "inputs longer than the context (default: what the run was fine-tuned "
                                           "with): " + LONG_INPUTS_HELP, choices=LONG_INPUTS)
    json: bool = option(False, "print one JSON object per example")


def predict_command(o: PredictOptions, columns: Columns) -> None:
    """`gptn predict`: label a file's examples (scored when labeled) or one typed on the command line."""
    from .describe import describe_inputs
    require_one_input(o.file, o.text)
    model, tokenizer = load_task_model(o.run, o.device)
    spec = model.spec
    spec.long_inputs = o.long_inputs or spec.long_inputs
    examples = read_task_file(o.file, spec.task, columns, spec.regression, require_labels=False).examples if o.file \
        else [example_from_texts(spec, o.text, o.text_b, o.choice)]
    records = predict(model, tokenizer, examples)
    for x, r in zip(examples, records):
        if o.show_inputs:
            r["inputs"] = describe_inputs(spec, x, tokenizer, model.gpt.config)
            if not o.json:
                print("\n".join("  " + line for line in r["inputs"]))
        print(json.dumps(r, ensure_ascii=False) if o.json else format_prediction(spec, r))
    if records and all("label" in r for r in records):
        metrics = compute_metrics(spec, [r["prediction"] for r in records], [r["label"] for r in records])
        print(f"{len(records)} labeled examples: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
              file=sys.stderr if o.json else sys.stdout)


def example_from_texts(spec: TaskSpec, text: str, text_b: str | None = None, choices: list[str] = ()) -> Example:
    """One example typed on the command line, checked against what the task reads (one line naming
    what is missing or extra)."""
    pair = spec.kind.texts == 2
    if pair != (text_b is not None):
        raise GptnError(f"a {spec.task} model needs " + ("--text and --text-b" if pair else "--text only"))
    if spec.kind.choices != bool(choices) or len(choices) == 1:
        raise GptnError("--choice is for multiple-choice models, which need two or more" if choices and
                        not spec.kind.choices else "a multiple-choice model needs two or more --choice")
    return Example((text,) + ((text_b,) if pair else ()), None, tuple(choices))


def format_prediction(spec: TaskSpec, r: dict) -> str:
    """A record of `predict` as `gptn predict` prints it: the prediction, its probability, the input."""
    if spec.regression:
        return f"{r['prediction']:.3f}\t" + " | ".join(r["input"])
    if spec.kind.choices:
        return f"{r['prediction']}\t{max(r['probs']):.1%}\t{r['choices'][r['prediction']]}"
    return f"{r['prediction']}\t{r['probs'][r['prediction']]:.1%}\t" + " | ".join(r["input"])


__all__ = ["TASK_TYPES", "Example", "Columns", "TaskData", "read_task_file", "input_sequences", "collate", "Batch",
           "TaskSpec", "TaskModel", "l3_loss", "task_loss", "compute_metrics", "FinetuneConfig", "finetune", "load_task_model",
           "predict", "evaluate_task", "example_from_texts", "format_prediction"]
