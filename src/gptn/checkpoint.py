"""Run directories: a model's config, weights and tokenizer (and training state), saved atomically.

Layout of a run directory:
    RUN/checkpoint/config.json        the resolved GPTConfig
    RUN/checkpoint/model.safetensors  weights, gptn (= Hugging Face GPT-2) names, nn.Linear layout
    RUN/checkpoint/tokenizer/         the tokenizer the model was trained with
    RUN/checkpoint/train_state.pt     optimizer, schedule, RNG and step (pretraining runs; the batches follow from seed and step)
    RUN/checkpoint/meta.json          what wrote it (step, kind), the SHA-256 of every other file, sealed

A checkpoint is written into RUN/checkpoint.tmp and swapped in with renames, so a crash at any
moment leaves either the previous checkpoint or the new one, never a mixture.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import GPTConfig, GptnError, read_json

CHECKPOINT = "checkpoint"
TRAIN_CONFIG = "train_config.json"  # a pretraining run's resolved PretrainConfig, inside its checkpoint


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def exclusive_lock(lock_file: Path, folder: Path):
    """Hold an exclusive lock on `lock_file` (created if needed) while writing into `folder`, so two
    processes never write one run or corpus. The operating system drops the lock when its process
    ends, so a killed run never blocks its own resume."""
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_file, "a")
    except FileExistsError:
        raise GptnError(f"{lock_file.parent} exists and is not a folder") from None
    except OSError as e:
        raise GptnError(f"cannot write in {lock_file.parent}: {e.strerror}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise GptnError(f"{folder} is being written by another gptn process; wait for it to finish "
                        "or choose another folder") from None
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def read_train_config(run: str | Path) -> dict:
    """A pretraining run's resolved options: from its checkpoint (written with it, atomically), or beside it
    in runs written before that."""
    run = Path(run)
    inside = checkpoint_dir(run) / TRAIN_CONFIG if has_checkpoint(run) else None
    return read_json(inside if inside is not None and inside.is_file() else run / TRAIN_CONFIG)


def run_lock(run_dir: str | Path):
    """The lock of a run directory (RUN/.lock)."""
    return exclusive_lock(Path(run_dir) / ".lock", Path(run_dir))


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


def run_kind(run_dir: str | Path) -> str | None:
    """What a run directory holds: "pretrain", "finetune", "import-hf" (meta.json's kind), "model" for a
    checkpoint without one, or None when it holds no checkpoint."""
    if not has_checkpoint(run_dir):
        return None
    return str(read_meta(checkpoint_dir(run_dir)).get("kind", "model"))


def claim_out(out: str | Path, writer: str, source: str | Path | None = None, resumable: Path | None = None) -> None:
    """Refuse, before anything is written, an output folder a command would destroy: its own source,
    or one that holds a run already (unless `resumable`, the writer's own unfinished state, is there
    to resume). `writer` names the command for the message."""
    out = Path(out)
    if source is not None and out.resolve() == Path(source).resolve():
        raise GptnError(f"{writer}: --out {out} is the source run itself; write to another folder")
    kind = run_kind(out) if out.exists() else None
    if kind is not None and not (resumable is not None and resumable.exists()):
        what = {"pretrain": "a pretraining run", "finetune": "a fine-tuned run", "import-hf": "an imported model",
                "pretrain-snapshot": "a pretraining snapshot"}.get(kind, "a model")
        raise GptnError(f"{writer}: {out} already holds {what}; choose another --out (or remove it first)")


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


# What a full or failing disk raises, in whichever library met it (torch.save: RuntimeError).
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def write_error(folder: Path, e: Exception, needed: int, what: str, after: str) -> GptnError:
    """One line for a write that failed: the folder, the reason, the space needed and free."""
    free = shutil.disk_usage(next((p for p in [Path(folder), *Path(folder).parents] if p.exists()), Path("/"))).free
    return GptnError(f"cannot write {what} in {folder}: {getattr(e, 'strerror', None) or e} (it needs about "
                     f"{needed / 2**20:,.1f} MiB, {free / 2**20:,.1f} MiB are free there); {after}")


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
    try:
        _write_checkpoint(tmp, config, state_dict, tokenizer, train_state, meta, extra_files, extra_tensors)
    except WRITE_ERRORS as e:
        shutil.rmtree(tmp, ignore_errors=True)
        tensors = [*state_dict.values(), *(t for group in (extra_tensors or {}).values() for t in group.values())]
        needed = sum(t.numel() * t.element_size() for t in tensors) * (3 if train_state is not None else 1)
        raise write_error(run_dir, e, needed, "the checkpoint" + (" with its optimizer state" if train_state else ""),
                          "the previous checkpoint, if any, is intact") from None
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _write_checkpoint(tmp: Path, config, state_dict, tokenizer, train_state, meta, extra_files, extra_tensors) -> None:
    """save_checkpoint's files, written and synced in `tmp`."""
    tmp.mkdir()
    config.save(tmp / "config.json")
    # One metadata key: safetensors writes the metadata map in hash order, so two keys made identical
    # runs differ byte for byte (and in their checksums).
    save_file(state_dict, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(tmp / "tokenizer")
    if train_state is not None:
        torch.save(train_state, tmp / "train_state.pt")
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    for name, tensors in (extra_tensors or {}).items():
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
    files = sorted(f.relative_to(tmp).as_posix() for f in tmp.rglob("*") if f.is_file())
    meta = {**(meta or {}), "weights_sha256": _sha256(tmp / "model.safetensors"),
            "files_sha256": {name: _sha256(tmp / name) for name in files if name != "model.safetensors"}}
    (tmp / "meta.json").write_text(json.dumps({**meta, "meta_sha256": _seal(meta)}, indent=2) + "\n")
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(tmp)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def read_meta(ckpt: Path) -> dict:
    """A checkpoint's meta.json ({} when it has none): its kind, source and the checksums of its files.
    It is sealed with a checksum of its own content, so a damaged or edited meta.json is named, not
    trusted (a meta.json written before the seal is read as it is)."""
    path = Path(ckpt) / "meta.json"
    if not path.is_file():
        return {}
    meta = read_json(path)
    seal = meta.pop("meta_sha256", None)
    if seal is not None and seal != _seal(meta):
        raise GptnError(f"{path} does not match its own checksum: the file was changed or damaged after it was saved")
    return meta


def _seal(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def read_metrics(run: str | Path) -> list[dict]:
    """The records of RUN/metrics.jsonl. It is a log: a line cut short by a crash, or damaged, is
    skipped rather than made an error (the checkpoint, not the log, is what a run resumes from)."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):  # every record has its step
            records.append(record)
    return records


def verify_files(ckpt: Path, names: list[str] | None = None) -> None:
    """Check the checkpoint's files (all but the weights, which read_weights checks as it reads them, and
    the training state, checked when resumed; or `names`) against the checksums meta.json holds: a
    changed tokenizer or config would otherwise load silently and decode or compute wrongly."""
    meta_file = ckpt / "meta.json"
    sums = read_meta(ckpt).get("files_sha256") or {}  # none: a bare model folder, or a run saved before checksums
    if not isinstance(sums, dict):
        raise GptnError(f"{meta_file}: files_sha256 is not a mapping of file -> checksum")
    for name, expected in sums.items():
        if (names is None and name == "train_state.pt") or (names is not None and name not in names):
            continue
        path = ckpt / name
        if not path.is_file():
            raise GptnError(f"{path} is missing from the checkpoint ({meta_file.name} lists it)")
        if _sha256(path) != expected:
            raise GptnError(f"{path} does not match the checksum in {meta_file.name}: the file was changed or "
                            "damaged after it was saved")


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; a truncated, empty or altered file is a one-line error naming it
    (checked against the checksum meta.json holds, when the checkpoint was written with one)."""
    path = Path(path)
    meta_file = path.parent / "meta.json"
    if path.name == "model.safetensors" and meta_file.is_file():
        expected = read_meta(path.parent).get("weights_sha256")
        if expected and _sha256(path) != expected:
            raise GptnError(f"{path} does not match the checksum in {meta_file.name}: the file was altered or "
                            "damaged after it was saved")
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError, OSError: a damaged file, not a bug of ours
        raise GptnError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None


def read_train_state(path: str | Path) -> dict:
    """The training state saved beside a checkpoint (optimizer, RNG, loader, schedule)."""
    verify_files(Path(path).parent, [Path(path).name])
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, EOFError, unpickling errors
        raise GptnError(f"{path} is damaged and cannot be read ({type(e).__name__}); resume from a copy of the run "
                        "or start a new --out") from None
    if not isinstance(state, dict) or "step" not in state:
        raise GptnError(f"{path} does not hold a gptn training state")
    return state


def load_config(run_dir: str | Path) -> GPTConfig:
    ckpt = checkpoint_dir(run_dir)
    verify_files(ckpt, ["config.json"])
    return GPTConfig.load(ckpt / "config.json")


def read_run(run_dir: str | Path) -> tuple[Path, GPTConfig, object]:
    """(checkpoint folder, config, tokenizer or None) of a run, its files verified; the weights are left
    for whoever needs them (read_weights checks them as it reads)."""
    from .tokenizer import load_tokenizer

    ckpt = checkpoint_dir(run_dir)
    verify_files(ckpt)
    tokenizer = load_tokenizer(ckpt / "tokenizer") if (ckpt / "tokenizer").is_dir() else None
    return ckpt, GPTConfig.load(ckpt / "config.json"), tokenizer


def load_model(run_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load (model, tokenizer or None) from a run directory; the model is in eval mode."""
    from .model import GPT

    ckpt, config, tokenizer = read_run(run_dir)
    model = GPT(config)
    load_weights(model, read_weights(ckpt / "model.safetensors"), source=str(ckpt))
    return model.to(device=device, dtype=dtype).eval(), tokenizer


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
