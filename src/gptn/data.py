"""Corpus preparation (any text in, token shards out) and the batch loader for pretraining.

A prepared corpus is a folder:
    manifest.json          tokenizer, dtype, counts of documents / bytes / tokens per split, shards
    tokenizer/             the tokenizer the tokens were made with
    train-00000.tok ...    token shards: a 32-byte header (magic, version, dtype, count) + tokens
    val-00000.tok ...

Documents are separated by end-of-text. The train/validation split is by document, decided by a
hash of the document's index and the seed, so it is the same on every machine and run. Input
problems are handled as follows (and said on stderr): a path that does not exist, an empty corpus,
a binary file named explicitly, or an output folder that already holds something are errors; a
binary file, a file that is not valid UTF-8 or a .jsonl without the text field found inside a folder
or glob is skipped with one warning naming the file (and the byte offset or line of the problem).
"""

from __future__ import annotations

import csv
import glob as globlib
import hashlib
import json
import os
import re
import shutil
import struct
import sys
import sysconfig
import time
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

import numpy as np

from .config import GptnError, read_json
from .checkpoint import exclusive_lock
from .normalize import normalize as normalize_text, parse_steps
from .tokenizer import Tokenizer, load_tokenizer, resolve_tokenizer

MAGIC = b"GPTNTOK\0"
VERSION = 1
HEADER = struct.Struct("<8sIIQ8x")  # magic, version, bytes per token, token count, reserved (32 bytes)
DTYPES = {2: np.uint16, 4: np.uint32}
STDLIB = "stdlib"  # the embedded default corpus: this interpreter's standard library sources
SHARD_TOKENS = 256 * 2**20  # tokens per shard file before a new one is started
CHUNK_CHARS = 1 << 20  # documents longer than this are tokenized in pieces, in parallel; also the work unit
MIN_DOCS_FOR_DOC_SPLIT = 20


def warn(message: str) -> None:
    print(f"gptn: warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Shard format


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    """Write one token shard (uint16 or uint32)."""
    tokens = np.ascontiguousarray(tokens)
    if tokens.dtype not in (np.uint16, np.uint32):
        raise GptnError(f"shards hold uint16 or uint32 tokens, not {tokens.dtype}")
    with open(path, "wb") as f:
        f.write(HEADER.pack(MAGIC, VERSION, tokens.dtype.itemsize, tokens.size))
        f.write(tokens.tobytes())


class ShardWriter:
    """Appends token arrays to numbered shard files, rolling over at `max_tokens`."""

    def __init__(self, folder: Path, split: str, dtype, max_tokens: int = SHARD_TOKENS):
        self.folder, self.split, self.dtype, self.max_tokens = folder, split, np.dtype(dtype), max_tokens
        self.files: list[str] = []
        self._f = None
        self._count = 0
        self.total = 0

    def _open(self):
        name = f"{self.split}-{len(self.files):05d}.tok"
        self.files.append(name)
        self._f = open(self.folder / name, "wb")
        self._f.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, 0))
        self._count = 0

    def _close(self):
        if self._f is not None:
            self._f.seek(0)
            self._f.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self._count))
            self._f.close()
            self._f = None

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while tokens.size:
            if self._f is None or self._count >= self.max_tokens:
                self._close()
                self._open()
            take = tokens[: self.max_tokens - self._count]
            self._f.write(take.tobytes())
            self._count += take.size
            self.total += take.size
            tokens = tokens[take.size:]

    def close(self) -> list[str]:
        self._close()
        return self.files


def read_shard(path: str | Path) -> np.ndarray:
    """Memory-map a shard's tokens (no copy), checking its header."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
    except OSError as e:
        raise GptnError(f"cannot read shard {path}: {e}") from None
    if len(head) < HEADER.size:
        raise GptnError(f"{path}: not a gptn token shard (file too short)")
    magic, version, itemsize, count = HEADER.unpack(head)
    if magic != MAGIC:
        raise GptnError(f"{path}: not a gptn token shard (bad magic)")
    if version != VERSION:
        raise GptnError(f"{path}: shard format version {version}, this gptn reads version {VERSION}")
    if itemsize not in DTYPES:
        raise GptnError(f"{path}: unknown token size {itemsize}")
    expected = HEADER.size + count * itemsize
    if path.stat().st_size != expected:
        raise GptnError(f"{path}: truncated or corrupt ({path.stat().st_size} bytes, header says {expected})")
    if count == 0:
        return np.zeros(0, dtype=DTYPES[itemsize])
    return np.memmap(path, dtype=DTYPES[itemsize], mode="r", offset=HEADER.size, shape=(count,))


# ----------------------------------------------------------------------------------------------
# Sources


@dataclass
class Document:
    text: str
    source: str


# Left out of the embedded corpus: installed packages, and folders that are mostly data tables
# (codec maps, Unicode names, pydoc's topic dump) or test fixtures rather than code.
_STDLIB_SKIP = {"site-packages", "dist-packages", "encodings", "pydoc_data", "test", "tests", "idle_test"}


def stdlib_files() -> list[Path]:
    """The .py files of the running interpreter's standard library: real code on every machine."""
    files = []
    for folder, subdirs, names in os.walk(sysconfig.get_paths()["stdlib"]):
        subdirs[:] = sorted(d for d in subdirs if d not in _STDLIB_SKIP)  # prune, don't walk site-packages
        files.extend(Path(folder) / n for n in names if n.endswith(".py"))
    return sorted(files)


def _is_binary(data: bytes) -> bool:
    return b"\0" in data[:8192]


def _read_text(path: Path, explicit: bool) -> str | None:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise GptnError(f"cannot read {path}: {e.strerror}") from None
    if _is_binary(data):
        if explicit:
            raise GptnError(f"{path} is a binary file, not text")
        warn(f"skipping binary file {path}")
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        warn(f"skipping {path}: invalid UTF-8 at byte offset {e.start}")
        return None


def expand_sources(sources: list[str]) -> list[tuple[Path, bool]]:
    """Files named by `sources` (files, folders, globs, or `stdlib`), each with whether it was named explicitly."""
    if not sources:
        raise GptnError("no corpus sources given")
    files: list[tuple[Path, bool]] = []
    for src in sources:
        if src == STDLIB:
            files.extend((p, False) for p in stdlib_files())
            continue
        path = Path(src)
        if path.is_file():
            files.append((path, True))
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not found:
                raise GptnError(f"corpus source {src} is a folder with no files in it")
            files.extend((p, False) for p in found)
        elif any(ch in src for ch in "*?["):
            matches = sorted(Path(p) for p in globlib.glob(src, recursive=True) if Path(p).is_file())
            if not matches:
                raise GptnError(f"no file matches {src!r}")
            files.extend((p, False) for p in matches)
        else:
            raise GptnError(f"corpus source {src} does not exist")
    return files


def iter_documents(sources: list[str] | list[tuple[Path, bool]], text_field: str = "text",
                   skipped: set | None = None) -> Iterator[Document]:
    """Documents from the sources (or from `expand_sources`' files): one per text file, one per JSONL line / Parquet row.

    A file found inside a folder or glob that holds no text (binary, not UTF-8, a .jsonl without the
    text field) is skipped with a warning; pass the same `skipped` set to a second pass over the
    same files and it skips them without warning again."""
    files = sources if sources and isinstance(sources[0], tuple) else expand_sources(sources)
    skipped = set() if skipped is None else skipped
    for path, explicit in files:
        if path in skipped:
            continue
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            yield from _jsonl_documents(path, text_field, explicit, skipped)
        elif suffix == ".parquet":
            yield from _parquet_documents(path, text_field)
        else:
            text = _read_text(path, explicit)
            if text is None:
                skipped.add(path)
            elif text:
                yield Document(text, str(path))


def _jsonl_documents(path: Path, field: str, explicit: bool = True, skipped: set | None = None) -> Iterator[Document]:
    first = True
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            problem = None
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                problem = f"{path}:{lineno}: invalid JSON ({e})"
            else:
                if not isinstance(record, dict) or field not in record:
                    problem = f"{path}:{lineno}: no field {field!r} (use --text-field to name the text field)"
            if problem and first and not explicit:  # a .jsonl that is not a corpus file, found in a folder
                warn(f"skipping {problem}")
                if skipped is not None:
                    skipped.add(path)
                return
            if problem:
                raise GptnError(problem)
            first = False
            if not isinstance(record[field], str):
                raise GptnError(f"{path}:{lineno}: field {field!r} is not a string")
            if record[field]:
                yield Document(record[field], f"{path}:{lineno}")


def _parquet_documents(path: Path, field: str) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise GptnError(f"{path}: reading Parquet needs pyarrow (pip install 'gptn[parquet]')") from None
    table = pq.ParquetFile(path)
    if field not in table.schema_arrow.names:
        raise GptnError(f"{path}: no column {field!r}; columns: {table.schema_arrow.names}")
    row = 0
    for batch in table.iter_batches(columns=[field]):
        for text in batch.column(0).to_pylist():
            row += 1
            if text:
                yield Document(text, f"{path}#{row}")


# ----------------------------------------------------------------------------------------------
# Tokenizing in parallel

# GPT-2's pre-tokenizer always splits between "<non-space>\n" and a following non-space character,
# so pieces cut there tokenize exactly as the whole text does.
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")


def split_for_tokenizing(text: str, chunk_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut a long text into pieces (at safe line boundaries) whose tokens concatenate to the whole's."""
    if len(text) <= chunk_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > chunk_chars:
        m = _SAFE_CUT.search(text, start + chunk_chars)
        if m is None:
            break
        pieces.append(text[start:m.start()])
        start = m.start()
    pieces.append(text[start:])
    return pieces


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_dir: str | None) -> None:
    global _worker_tokenizer
    if tokenizer_dir is not None:  # spawned workers load it; forked ones inherit it
        _worker_tokenizer = load_tokenizer(tokenizer_dir)


def _encode_tasks(batch):
    """Tokenize a batch of (doc_index, pieces, is_last_part) items: one IPC round trip per ~1 MB."""
    out = []
    for doc_index, pieces, last in batch:
        ids = []
        for piece in pieces:
            ids.extend(_worker_tokenizer._encode_ordinary(piece))
        if last:
            ids.append(_worker_tokenizer.eot_id)
        out.append((doc_index, np.asarray(ids, dtype=np.uint32)))
    return out


def _bounded_imap(pool, fn, items, window: int):
    """pool.imap in order, but with at most `window` items in flight: Pool.imap alone would read the
    whole corpus ahead into its queue, and large corpora must not need to fit in memory."""
    import itertools
    items = iter(items)
    while chunk := list(itertools.islice(items, window)):
        yield from pool.imap(fn, chunk)


def is_validation(doc_index: int, seed: int, val_fraction: float) -> bool:
    """Deterministic split by document: a hash of (seed, index), not Python's salted hash()."""
    digest = hashlib.blake2b(f"{seed}:{doc_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def _holdout_tail(docs: list[Document], val_fraction: float) -> list[tuple[Document, bool]]:
    """With too few documents to split by document, hold out the tail of each (at a line boundary)."""
    out = []
    for doc in docs:
        cut = int(len(doc.text) * (1 - val_fraction))
        nl = doc.text.rfind("\n", 0, cut)
        cut = nl + 1 if nl > 0 else cut
        if 0 < cut < len(doc.text):
            out += [(Document(doc.text[:cut], doc.source), False), (Document(doc.text[cut:], doc.source), True)]
        else:
            out.append((doc, False))
    return out


# ----------------------------------------------------------------------------------------------
# prepare


def _dtype_for(vocab_size: int, requested: str) -> np.dtype:
    if requested == "auto":
        return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
    if requested not in ("uint16", "uint32"):
        raise GptnError(f"--dtype must be auto, uint16 or uint32, not {requested!r}")
    if requested == "uint16" and vocab_size > 2**16:
        raise GptnError(f"a vocabulary of {vocab_size} tokens does not fit in uint16 (at most 65,536); use uint32")
    return np.dtype(requested)


def _check_out(out: Path) -> None:
    if out.exists():
        if (out / "manifest.json").exists():
            raise GptnError(f"{out} already holds a prepared corpus; choose another --out or remove it")
        if not out.is_dir() or any(out.iterdir()):
            raise GptnError(f"{out} exists and is not an empty folder")


def prepare(sources: list[str], tokenizer: str | Tokenizer, out: str | Path, val_fraction: float = 0.005,
            seed: int = 0, text_field: str = "text", dtype: str = "auto", workers: int | None = None,
            max_docs: int | None = None, progress: bool = True, normalize: str | tuple | None = None) -> dict:
    """Tokenize `sources` into token shards in `out`; returns the manifest.

    `normalize` (e.g. "sst", see normalize.py) rewrites every document first; the steps are saved
    with the tokenizer, so every later encode of this corpus's models applies them too.

    Written to a temporary folder and renamed at the end, so an interrupted run never leaves a
    corpus that later loads as if complete; two prepares of one output are refused (a lock).
    """

    out = Path(out)
    with exclusive_lock(out.with_name(f".{out.name}.lock"), out):
        return _prepare(sources, tokenizer, out, val_fraction, seed, text_field, dtype, workers, max_docs, progress,
                        normalize)


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary folders left by a killed `prepare` of the same output (their process is gone)."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _prepare(sources, tokenizer, out: Path, val_fraction, seed, text_field, dtype, workers, max_docs, progress,
             normalize) -> dict:
    from tqdm import tqdm

    _check_out(out)
    _remove_stale_temporaries(out)
    if not 0.0 <= val_fraction < 1.0:
        raise GptnError(f"val_fraction must be in [0, 1), got {val_fraction}")
    files = expand_sources(sources)  # fails early on a missing path
    steps = parse_steps(normalize)
    skipped: set = set()  # warned about in the first pass over the files (training the tokenizer)

    def documents():
        n = 0
        for doc in iter_documents(files, text_field, skipped):
            if max_docs is not None and n >= max_docs:
                return
            if steps and not (doc := Document(normalize_text(doc.text, steps), doc.source)).text:
                continue
            n += 1
            yield doc

    if isinstance(tokenizer, str):
        needs_corpus = tokenizer == "char" or tokenizer.startswith("bpe:")
        tokenizer = resolve_tokenizer(tokenizer, (d.text for d in documents()) if needs_corpus else None)
    if steps and tokenizer.normalize not in ((), steps):
        raise GptnError(f"the tokenizer already normalises its text ({','.join(tokenizer.normalize)}); "
                        f"--normalize {','.join(steps)} would apply other steps")
    steps = steps or tokenizer.normalize  # a given tokenizer's own steps apply to the corpus too
    tokenizer.with_normalization(steps)
    token_dtype = _dtype_for(tokenizer.vocab_size, dtype)

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tokenizer.save(tmp / "tokenizer")
        writers = {s: ShardWriter(tmp, s, token_dtype) for s in ("train", "val")}
        counts = {s: {"documents": 0, "bytes": 0, "tokens": 0} for s in ("train", "val")}

        # Decide the split. Few documents (e.g. one big text file): hold out each one's tail instead.
        docs_iter = documents()
        head = []
        for doc in docs_iter:
            head.append(doc)
            if len(head) >= MIN_DOCS_FOR_DOC_SPLIT:
                break
        if not head:
            raise GptnError("the corpus is empty: no documents with text in " + ", ".join(sources))
        if len(head) < MIN_DOCS_FOR_DOC_SPLIT and val_fraction > 0:
            labelled = iter(_holdout_tail(head, val_fraction))
        else:
            import itertools
            labelled = ((d, is_validation(i, seed, val_fraction))
                        for i, d in enumerate(itertools.chain(head, docs_iter)))

        meta: dict[int, tuple[str, int]] = {}

        def tasks():
            batch, size = [], 0
            for i, (doc, is_val) in enumerate(labelled):
                split = "val" if is_val else "train"
                meta[i] = (split, len(doc.text.encode("utf-8")))
                for piece_index, piece in enumerate(pieces := split_for_tokenizing(doc.text)):
                    batch.append((i, [piece], piece_index == len(pieces) - 1))
                    size += len(piece)
                    if size >= CHUNK_CHARS:
                        yield batch
                        batch, size = [], 0
            if batch:
                yield batch

        n_workers = workers or os.cpu_count() or 1
        bar = tqdm(desc="tokenizing", unit="B", unit_scale=True, disable=not progress, file=sys.stderr) \
            if sys.stderr.isatty() or not progress else _PlainProgress("tokenizing")
        global _worker_tokenizer
        _worker_tokenizer = tokenizer
        if n_workers > 1:
            fork = sys.platform == "linux"
            pool = get_context("fork" if fork else "spawn").Pool(
                n_workers, initializer=_init_worker, initargs=(None if fork else str(tmp / "tokenizer"),))
            results = (r for batch in _bounded_imap(pool, _encode_tasks, tasks(), 4 * n_workers) for r in batch)
        else:
            pool = None
            results = (r for batch in map(_encode_tasks, tasks()) for r in batch)
        try:
            last_doc = -1
            for doc_index, ids in results:
                split, nbytes = meta[doc_index]
                writers[split].write(ids)
                counts[split]["tokens"] += int(ids.size)
                if doc_index != last_doc:
                    counts[split]["documents"] += 1
                    counts[split]["bytes"] += nbytes
                    bar.update(nbytes)
                    last_doc = doc_index
                    meta.pop(doc_index - 1, None)
        finally:
            if pool is not None:
                pool.terminate()
            bar.close()
        if counts["train"]["tokens"] == 0:
            raise GptnError("the corpus is empty after splitting: no training tokens")
        shards = {s: w.close() for s, w in writers.items()}
        manifest = {
            "format": "gptn-corpus", "version": VERSION,
            "tokenizer": tokenizer.describe(), "dtype": token_dtype.name,
            "sources": [str(s) for s in sources], "seed": seed, "val_fraction": val_fraction,
            "split_by": "document" if len(head) >= MIN_DOCS_FOR_DOC_SPLIT or val_fraction == 0 else "document tail",
            "documents": {s: c["documents"] for s, c in counts.items()},
            "bytes": {s: c["bytes"] for s, c in counts.items()},
            "tokens": {s: c["tokens"] for s, c in counts.items()},
            "shards": shards,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        _check_out(out)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# ----------------------------------------------------------------------------------------------
# Loading


class Corpus:
    """A prepared corpus: its manifest, tokenizer and memory-mapped shards (opened once)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / "manifest.json"
        if not path.is_file():
            raise GptnError(f"{self.folder} is not a prepared corpus (no manifest.json); run `gptn prepare` first")
        self.manifest = read_json(path)
        if self.manifest.get("format") != "gptn-corpus":
            raise GptnError(f"{path}: not a gptn corpus manifest")
        shards, counts = self.manifest.get("shards"), [self.manifest.get(k) for k in ("tokens", "bytes")]
        if not (isinstance(shards, dict) and all(isinstance(v, list) and all(isinstance(n, str) for n in v)
                                                 for v in shards.values())
                and all(isinstance(c, dict) and all(isinstance(v, int) for v in c.values()) for c in counts)):
            raise GptnError(f"{path} is damaged: its shards, tokens or bytes are missing or of the wrong type")
        self.tokenizer = load_tokenizer(self.folder / "tokenizer")
        self._splits: dict[str, list[np.ndarray]] = {}

    def check_ids(self, vocab_size: int) -> None:
        """A shard holding a token id the model has no row for is a damaged (or foreign) file."""
        for split in ("train", "val"):
            for name, shard in zip(self.manifest["shards"].get(split, []), self.shards(split)):
                if shard.size and int(shard.max()) >= vocab_size:
                    raise GptnError(f"{self.folder / name} holds token id {int(shard.max())}, outside the "
                                    f"vocabulary of {vocab_size}: the shard is damaged or from another corpus")

    def shards(self, split: str) -> list[np.ndarray]:
        if split not in self._splits:
            self._splits[split] = [read_shard(self.folder / name) for name in self.manifest["shards"].get(split, [])]
        return self._splits[split]

    def tokens(self, split: str) -> int:
        return int(self.manifest["tokens"].get(split, 0))

    def bytes_per_token(self, split: str = "val") -> float:
        """Average UTF-8 bytes per token (to turn nats per token into bits per byte)."""
        tokens = self.tokens(split) or self.tokens("train")
        nbytes = self.manifest["bytes"].get(split) if self.tokens(split) else self.manifest["bytes"]["train"]
        return nbytes / max(tokens, 1)


class BatchLoader:
    """Random windows of n_ctx + 1 tokens, a pure function of (seed, step): resuming at step s sees
    exactly the batches an uninterrupted run would have seen.

    Each step draws one global batch of `global_batch` windows; rank r of `world` takes the r-th
    contiguous slice of it and splits that into `accum` micro-batches. So N ranks together see the
    same windows as one rank with the whole batch.
    """

    def __init__(self, corpus: Corpus, split: str, n_ctx: int, global_batch: int, seed: int = 0,
                 rank: int = 0, world: int = 1, accum: int = 1):
        if global_batch % (world * accum):
            raise GptnError(f"batch of {global_batch} sequences is not divisible across {world} ranks x "
                            f"{accum} accumulation steps")
        self.shards = [s for s in corpus.shards(split) if s.size > n_ctx + 1]
        if not self.shards:
            raise GptnError(f"{corpus.folder}: the {split} split has no shard longer than the context "
                            f"({n_ctx + 1} tokens needed)")
        self.n_ctx, self.global_batch, self.seed = n_ctx, global_batch, seed
        self.rank, self.world, self.accum = rank, world, accum
        starts = np.array([s.size - n_ctx for s in self.shards], dtype=np.int64)  # valid window starts per shard
        self._cum = np.concatenate([[0], np.cumsum(starts)])

    @property
    def micro_batch(self) -> int:
        return self.global_batch // (self.world * self.accum)

    def _windows(self, positions: np.ndarray) -> np.ndarray:
        out = np.empty((positions.size, self.n_ctx + 1), dtype=np.int64)
        shard_ids = np.searchsorted(self._cum, positions, side="right") - 1
        for row, (pos, sid) in enumerate(zip(positions, shard_ids)):
            start = pos - self._cum[sid]
            out[row] = self.shards[sid][start:start + self.n_ctx + 1]
        return out

    def step_batches(self, step: int):
        """The `accum` (x, y) micro-batches of this rank at `step`, as int64 torch tensors."""
        import torch
        rng = np.random.default_rng([self.seed, step])
        positions = rng.integers(0, self._cum[-1], size=self.global_batch)
        per_rank = self.global_batch // self.world
        mine = positions[self.rank * per_rank:(self.rank + 1) * per_rank]
        windows = torch.from_numpy(self._windows(mine))
        for micro in windows.split(self.micro_batch):
            yield micro[:, :-1], micro[:, 1:]

    def eval_batches(self, n_batches: int, batch_size: int):
        """A fixed set of windows (the same at every evaluation), for comparable validation losses."""
        import torch
        rng = np.random.default_rng([self.seed, 2**31 - 1])
        for _ in range(n_batches):
            w = torch.from_numpy(self._windows(rng.integers(0, self._cum[-1], size=batch_size)))
            yield w[:, :-1], w[:, 1:]


class _PlainProgress:
    """What a piped `prepare` prints instead of tqdm's \\r frames: a plain line every 10 seconds and at the end."""

    def __init__(self, name: str, every: float = 10.0):
        self.name, self.every, self.done = name, every, 0
        self.start = self.last = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        if time.perf_counter() - self.last >= self.every:
            self._say()
            self.last = time.perf_counter()

    def close(self) -> None:
        self._say()

    def _say(self) -> None:
        seconds = max(1e-9, time.perf_counter() - self.start)
        print(f"{self.name}: {self.done / 1e6:,.1f} MB in {seconds:.0f} s ({self.done / 1e6 / seconds:,.1f} MB/s)",
              file=sys.stderr, flush=True)


def read_records(path: str | Path) -> list[dict]:
    """Rows of a labeled-data file as dicts: JSONL (or a JSON list), CSV, or TSV (GLUE's: tabs only)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise GptnError(f"{path} is not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}); "
                        "expected a TSV, CSV or JSONL file") from None
    except OSError as e:
        raise GptnError(f"cannot read {path}: {e.strerror}") from None
    if path.suffix in (".jsonl", ".json"):
        if path.suffix == ".json" and text.lstrip().startswith("["):
            return json.loads(text)
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise GptnError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        return rows
    if path.suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    # GLUE's TSVs contain unbalanced quotes, so fields are split on tabs only (no CSV quoting).
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        return []
    header = lines[0].rstrip("\r").split("\t")
    rows = []
    for n, line in enumerate(lines[1:], 2):
        fields = line.rstrip("\r").split("\t")
        if len(fields) != len(header):
            raise GptnError(f"{path}:{n}: {len(fields)} tab-separated fields, the header has {len(header)}")
        rows.append(dict(zip(header, fields)))
    return rows
