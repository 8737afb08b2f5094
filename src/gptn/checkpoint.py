"""Run directories: a model's config, weights and tokenizer (and training state), saved atomically.

Layout of a run directory:
    RUN/checkpoint/config.json        the resolved GPTConfig
    RUN/checkpoint/model.safetensors  weights, gptn (= Hugging Face GPT-2) names, nn.Linear layout
    RUN/checkpoint/tokenizer/         the tokenizer the model was trained with
    RUN/checkpoint/train_state.pt     optimizer, scheduler, RNG and loader state (pretraining runs)
    RUN/checkpoint/meta.json          what wrote it (step, kind)

A checkpoint is written into RUN/checkpoint.tmp and swapped in with renames, so a crash at any
moment leaves either the previous checkpoint or the new one, never a mixture.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import GPTConfig, GptnError

CHECKPOINT = "checkpoint"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dir(run_dir: str | Path) -> Path:
    """The folder holding the newest complete checkpoint of a run (recovering from an interrupted swap)."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise GptnError(f"run directory {run_dir} does not exist")
    for name in (CHECKPOINT, CHECKPOINT + ".old"):  # .old exists alone only if a swap was cut short
        d = run_dir / name
        if (d / "config.json").is_file() and (d / "model.safetensors").is_file():
            return d
    if (run_dir / "config.json").is_file() and (run_dir / "model.safetensors").is_file():
        return run_dir  # a bare model folder
    raise GptnError(f"{run_dir} holds no gptn checkpoint (expected {run_dir / CHECKPOINT}/config.json "
                    "and model.safetensors)")


def has_checkpoint(run_dir: str | Path) -> bool:
    try:
        checkpoint_dir(run_dir)
        return True
    except GptnError:
        return False


def raw_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP (`module.`) and torch.compile (`_orig_mod.`) wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors under gptn's own names, ready for safetensors."""
    return {k: v.detach().to("cpu").contiguous() for k, v in raw_model(model).state_dict().items()}


def save_checkpoint(run_dir: str | Path, config: GPTConfig, state_dict: dict[str, torch.Tensor],
                    tokenizer=None, train_state: dict | None = None, meta: dict | None = None,
                    extra_files: dict[str, str] | None = None,
                    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write a complete checkpoint into RUN/checkpoint atomically and return its path.

    `extra_files` (name -> text) and `extra_tensors` (name -> tensors, as safetensors) travel with it,
    e.g. a fine-tuned run's task head."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp, final, old = run_dir / (CHECKPOINT + ".tmp"), run_dir / CHECKPOINT, run_dir / (CHECKPOINT + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    config.save(tmp / "config.json")
    save_file(state_dict, str(tmp / "model.safetensors"), metadata={"format": "pt", "writer": "gptn"})
    if tokenizer is not None:
        tokenizer.save(tmp / "tokenizer")
    if train_state is not None:
        torch.save(train_state, tmp / "train_state.pt")
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    for name, tensors in (extra_tensors or {}).items():
        save_file(tensors, str(tmp / name), metadata={"format": "pt", "writer": "gptn"})
    (tmp / "meta.json").write_text(json.dumps(meta or {}, indent=2) + "\n")
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_config(run_dir: str | Path) -> GPTConfig:
    return GPTConfig.load(checkpoint_dir(run_dir) / "config.json")


def load_model(run_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load (model, tokenizer or None) from a run directory; the model is in eval mode."""
    from .model import GPT
    from .tokenizer import load_tokenizer

    ckpt = checkpoint_dir(run_dir)
    config = GPTConfig.load(ckpt / "config.json")
    model = GPT(config)
    load_weights(model, load_file(str(ckpt / "model.safetensors")), source=str(ckpt))
    model.to(device=device, dtype=dtype).eval()
    tokenizer = load_tokenizer(ckpt / "tokenizer") if (ckpt / "tokenizer").is_dir() else None
    return model, tokenizer


def load_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with a one-line error naming missing/unexpected/mis-shaped tensors."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        raise GptnError(f"{source}: {'; '.join(parts)}")
    for k, v in state_dict.items():
        if v.shape != own[k].shape:
            raise GptnError(f"{source}: tensor {k} has shape {tuple(v.shape)}, the config needs {tuple(own[k].shape)}")
    model.load_state_dict(state_dict, strict=True)
