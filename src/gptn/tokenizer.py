"""Tokenizers: GPT-2's byte-level BPE, a byte-level BPE trained on your corpus, and characters.

All share one interface (`encode`, `decode`, `vocab_size`, `special_tokens`) and are saved beside
every model, so a run always reloads the tokenizer it was trained with. Special tokens: end-of-text
(document separator) and GPT-1's start, delimiter and extract tokens for transfer learning
(Radford et al. 2018 §3.3), appended after the ordinary vocabulary.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

from .config import GptnError, read_json
from .normalize import normalize, parse_steps

EOT = "<|endoftext|>"
START, DELIM, EXTRACT = "<|start|>", "<|delim|>", "<|extract|>"
GPT1_SPECIALS = (START, DELIM, EXTRACT)
META = "gptn_tokenizer.json"
# GPT-2's pre-tokenisation regex (contractions, letters, digits, other, whitespace).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (used in vocab/merges files)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _unicode_to_bytes(s: str) -> bytes:
    decoder = _byte_decoder()
    try:
        return bytes(decoder[c] for c in s)
    except KeyError as e:
        raise GptnError(f"vocabulary entry {s!r} is not in GPT-2's byte-level alphabet ({e})") from None


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


class Tokenizer:
    """Common interface. `special_tokens` maps each special token's text to its id."""

    kind = "base"
    normalize: tuple[str, ...] = ()  # normalisation steps applied before encoding (see normalize.py)

    def __init__(self, special_tokens: dict[str, int]):
        self.special_tokens = dict(special_tokens)
        self._specials_changed()

    def with_normalization(self, steps: tuple[str, ...]) -> "Tokenizer":
        """Apply `steps` to all text this tokenizer encodes from now on (saved with it); returns self."""
        self.normalize = tuple(steps)
        return self

    def _specials_changed(self) -> None:
        self._id_to_special = {i: s for s, i in self.special_tokens.items()}
        names = sorted(self.special_tokens, key=len, reverse=True)  # longest first: no prefix wins
        self._special_split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    # --- to implement -----------------------------------------------------------------------
    @property
    def base_vocab_size(self) -> int:
        raise NotImplementedError

    def _encode_ordinary(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode_bytes(self, ids: list[int]) -> bytes:
        raise NotImplementedError

    def _save_files(self, folder: Path) -> dict:
        raise NotImplementedError

    # --- shared ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return max([self.base_vocab_size - 1, *self.special_tokens.values()]) + 1

    @property
    def eot_id(self) -> int:
        return self.special_tokens[EOT]

    def add_special_tokens(self, names=GPT1_SPECIALS) -> "Tokenizer":
        """Append special tokens (by default GPT-1's start, delimiter, extract); returns self."""
        for name in names:
            if name not in self.special_tokens:
                self.special_tokens[name] = self.vocab_size
        self._specials_changed()
        return self

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings are ordinary text unless `allow_special`."""
        if not allow_special or self._special_split is None:
            return self._encode_ordinary(normalize(text, self.normalize))
        ids: list[int] = []
        for i, part in enumerate(self._special_split.split(text)):
            if i % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self._encode_ordinary(normalize(part, self.normalize)))
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._encode_ordinary_batch([normalize(t, self.normalize) for t in texts])

    def _encode_ordinary_batch(self, texts: list[str]) -> list[list[int]]:
        return [self._encode_ordinary(t) for t in texts]

    def decode_bytes(self, ids) -> bytes:
        out, run = [], []
        n_base = self.base_vocab_size
        for i in ids:
            i = int(i)
            if i in self._id_to_special:
                if run:
                    out.append(self._decode_bytes(run))
                    run = []
                out.append(self._id_to_special[i].encode())
            else:
                if not 0 <= i < n_base:
                    raise GptnError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
                run.append(i)
        if run:
            out.append(self._decode_bytes(run))
        return b"".join(out)

    def decode(self, ids) -> str:
        """Text of `ids`; a byte sequence cut inside a UTF-8 character shows as U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"kind": self.kind, "special_tokens": self.special_tokens, **self._save_files(folder)}
        if self.normalize:
            meta["normalize"] = list(self.normalize)
        (folder / META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")

    def describe(self) -> dict:
        """What identifies this tokenizer (kept in corpus manifests to catch mismatches)."""
        out = {"kind": self.kind, "vocab_size": self.vocab_size, "fingerprint": self.fingerprint()}
        if self.normalize:
            out["normalize"] = list(self.normalize)
        return out

    def fingerprint(self) -> str:
        """A short hash of everything that decides the ids (vocabulary, merges, special tokens)."""
        import hashlib
        parts = [self.kind, sorted(self.special_tokens.items()), self._identity()]
        content = json.dumps(parts + ([list(self.normalize)] if self.normalize else []), ensure_ascii=False)
        return hashlib.sha256(content.encode()).hexdigest()[:16]

    def _identity(self):
        raise NotImplementedError

    def same_vocabulary(self, other: "Tokenizer") -> bool:
        """True when both give every text the same ids: the same vocabulary, merges, normalisation and
        shared special tokens (one may have more specials, e.g. GPT-1's, added by fine-tuning)."""
        shared = set(self.special_tokens) & set(other.special_tokens)
        return (self.kind == other.kind and self._identity() == other._identity()
                and self.normalize == other.normalize and EOT in shared
                and all(self.special_tokens[t] == other.special_tokens[t] for t in shared))


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2's scheme) from a vocabulary and a merge list.

    Encoding runs in tiktoken when the ids follow the merge order (true for GPT-2's files, which is
    what tiktoken itself requires), and in Hugging Face `tokenizers` otherwise; both implement the
    same merges.
    """

    kind = "bpe"

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], special_tokens: dict[str, int] | None = None,
                 name: str = "bpe"):
        specials = dict(special_tokens or {})
        if EOT in vocab and EOT not in specials:
            specials[EOT] = vocab[EOT]
        self.vocab = {t: i for t, i in vocab.items() if t not in specials}
        self.merges = merges
        self.name = name
        self._base_vocab_size = max(self.vocab.values()) + 1
        super().__init__(specials)
        if EOT not in self.special_tokens:
            self.add_special_tokens([EOT])
        self._id_to_bytes = {i: _unicode_to_bytes(t) for t, i in self.vocab.items()}
        self._tiktoken = self._build_tiktoken()
        self._hf = None if self._tiktoken is not None else self._build_hf()

    @property
    def base_vocab_size(self) -> int:
        return self._base_vocab_size

    def _merge_order_matches_ids(self) -> bool:
        expected = 256
        for a, b in self.merges:
            if self.vocab.get(a + b) != expected:
                return False
            expected += 1
        return len(self.vocab) == expected and all(
            self.vocab.get(c, -1) < 256 for c in bytes_to_unicode().values())

    def _build_tiktoken(self):
        if not self._merge_order_matches_ids():
            return None
        import tiktoken
        ranks = {b: i for i, b in self._id_to_bytes.items()}
        return tiktoken.Encoding(name=f"gptn-{self.name}", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={})

    def _build_hf(self):
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
        tok = HFTokenizer(models.BPE(vocab=dict(self.vocab), merges=list(self.merges)))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        return tok

    @property
    def backend(self) -> str:
        return "tiktoken" if self._tiktoken is not None else "tokenizers"

    def _encode_ordinary(self, text: str) -> list[int]:
        if self._tiktoken is not None:
            return self._tiktoken.encode_ordinary(text)
        return self._hf.encode(text, add_special_tokens=False).ids

    def _encode_ordinary_batch(self, texts: list[str]) -> list[list[int]]:
        if self._tiktoken is not None:
            return self._tiktoken.encode_ordinary_batch(texts, num_threads=1)
        return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def _decode_bytes(self, ids: list[int]) -> bytes:
        try:
            return b"".join(self._id_to_bytes[i] for i in ids)
        except KeyError as e:
            raise GptnError(f"token id {e.args[0]} is not in the vocabulary") from None

    def _identity(self):
        return [sorted(self.vocab.items(), key=lambda kv: kv[1]), self.merges]

    def _save_files(self, folder: Path) -> dict:
        vocab = dict(self.vocab)
        vocab.update(self.special_tokens)
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        with open(folder / "merges.txt", "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
            f.writelines(f"{a} {b}\n" for a, b in self.merges)
        return {"name": self.name}


class CharTokenizer(Tokenizer):
    """One token per character of a fixed alphabet (the classic Tiny Shakespeare char model)."""

    kind = "char"

    def __init__(self, chars: list[str], special_tokens: dict[str, int] | None = None):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        super().__init__(special_tokens or {})
        if EOT not in self.special_tokens:
            self.add_special_tokens([EOT])

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    @property
    def base_vocab_size(self) -> int:
        return len(self.chars)

    def _encode_ordinary(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise GptnError(f"character {e.args[0]!r} is not in this character tokenizer's alphabet "
                            f"({len(self.chars)} characters)") from None

    def _decode_bytes(self, ids: list[int]) -> bytes:
        return "".join(self.chars[i] for i in ids).encode("utf-8")

    def _identity(self):
        return self.chars

    def _save_files(self, folder: Path) -> dict:
        return {"chars": self.chars}


# ----------------------------------------------------------------------------------------------
# Loading and training


def _read_merges(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").split("\n")
    merges = []
    for line in lines:
        if not line or line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise GptnError(f"{path}: malformed merge line {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def load_tokenizer(source: str | Path) -> Tokenizer:
    """A tokenizer from a folder: gptn's own, GPT-2's originals (encoder.json + vocab.bpe),
    Hugging Face's (vocab.json + merges.txt, or tokenizer.json)."""
    folder = Path(source)
    if not folder.is_dir():
        raise GptnError(f"tokenizer folder {folder} does not exist")
    meta_path = folder / META
    meta = read_json(meta_path) if meta_path.is_file() else None
    try:
        tokenizer = _load_tokenizer(folder, meta)
        return tokenizer.with_normalization(parse_steps(meta.get("normalize"))) if meta else tokenizer
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, UnicodeDecodeError) as e:
        # a file cut short, a key or value of the wrong kind: the files do not make a tokenizer
        raise GptnError(f"the tokenizer files in {folder} are damaged ({type(e).__name__}: {e})") from None


def _load_tokenizer(folder: Path, meta: dict | None) -> Tokenizer:
    if meta is not None and meta.get("kind") == "char":
        return CharTokenizer(meta["chars"], meta["special_tokens"])
    specials = meta["special_tokens"] if meta else None
    name = meta.get("name", "bpe") if meta else "gpt2"
    for vocab_name, merges_name in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
        if (folder / vocab_name).is_file() and (folder / merges_name).is_file():
            vocab = read_json(folder / vocab_name)
            return BPETokenizer(vocab, _read_merges(folder / merges_name), specials, name=name)
    if (folder / "tokenizer.json").is_file():
        data = read_json(folder / "tokenizer.json")
        model = data.get("model", {})
        added = {t["content"]: t["id"] for t in data.get("added_tokens", []) if t.get("special")}
        if model.get("type") == "WordLevel" and all(len(t) == 1 for t in model["vocab"] if t not in added):
            chars = sorted((i, t) for t, i in model["vocab"].items() if t not in added)  # what export-hf writes
            return CharTokenizer([t for _, t in chars], {**added, **(specials or {})})
        if model.get("type") != "BPE":
            raise GptnError(f"{folder / 'tokenizer.json'}: only byte-level BPE tokenizers are supported, "
                            f"found {model.get('type')!r}")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        return BPETokenizer(model["vocab"], merges, {**added, **(specials or {})}, name=name)
    raise GptnError(f"{folder} holds no tokenizer (expected {META}, vocab.json + merges.txt, "
                    "encoder.json + vocab.bpe, or tokenizer.json)")


def gpt2_tokenizer() -> BPETokenizer:
    """GPT-2's tokenizer through tiktoken (fetched once and cached by tiktoken when online)."""
    import tiktoken
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises requests/OSError variants when offline
        raise GptnError(f"could not fetch GPT-2's BPE files ({type(e).__name__}); offline, pass a folder "
                        "holding encoder.json + vocab.bpe instead of 'gpt2'") from None
    enc_bytes = {i: enc.decode_single_token_bytes(i) for i in range(enc.n_vocab) if i != enc.eot_token}
    ranks = {b: i for i, b in enc_bytes.items()}
    b2u = bytes_to_unicode()
    to_str = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    merges = []
    for i in range(256, len(ranks)):
        a, b = _split_token(enc_bytes[i], ranks, i)
        merges.append((to_str(a), to_str(b)))
    vocab = {to_str(b): i for i, b in enc_bytes.items()}
    return BPETokenizer(vocab, merges, {EOT: enc.eot_token}, name="gpt2")


def _split_token(token: bytes, ranks: dict[bytes, int], max_rank: int) -> tuple[bytes, bytes]:
    """The pair whose merge made `token`: run BPE on its bytes with ranks below its own."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = min(range(len(parts) - 1), key=lambda j: ranks.get(parts[j] + parts[j + 1], max_rank + 1))
        if ranks.get(parts[best] + parts[best + 1], max_rank + 1) >= max_rank:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts[0], parts[1]


def train_bpe(texts, vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (end-of-text included) on an iterator of texts."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers
    if vocab_size < 257:
        raise GptnError(f"bpe:{vocab_size}: a byte-level BPE needs at least 257 tokens (256 bytes + end-of-text)")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    data = json.loads(tok.to_str())
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    vocab = data["model"]["vocab"]
    eot = vocab.pop(EOT)
    # Ids in merge order (bytes first) let the fast tiktoken backend encode this vocabulary too.
    b2u = bytes_to_unicode()
    ordered = [b2u[b] for b in range(256)] + [a + b for a, b in merges]
    new_vocab = {t: i for i, t in enumerate(dict.fromkeys(ordered))}
    if len(new_vocab) != len(ordered):  # a token reachable by two merges: keep the trainer's ids
        new_vocab, eot_id = vocab, eot
    else:
        eot_id = len(new_vocab)
    return BPETokenizer(new_vocab, merges, {EOT: eot_id}, name=f"bpe{vocab_size}")


def resolve_tokenizer(spec: str, texts=None) -> Tokenizer:
    """`char`, `bpe:N` (trained on `texts`), `gpt2`, or a folder (see `load_tokenizer`)."""
    if spec == "char":
        if texts is None:
            raise GptnError("the char tokenizer is built from the corpus; no texts were given")
        chars = set()
        for t in texts:
            chars.update(t)
        return CharTokenizer(sorted(chars))
    if spec.startswith("bpe:"):
        try:
            n = int(spec[4:])
        except ValueError:
            raise GptnError(f"--tokenizer {spec}: expected bpe:N with N an integer") from None
        if texts is None:
            raise GptnError("a BPE tokenizer is trained on the corpus; no texts were given")
        return train_bpe(texts, n)
    if spec == "gpt2":
        return gpt2_tokenizer()
    if Path(spec).is_dir():
        return load_tokenizer(spec)
    raise GptnError(f"--tokenizer {spec!r}: expected char, bpe:N, gpt2 or a tokenizer folder")


def copy_hf_tokenizer_files(tokenizer: Tokenizer, out: Path, n_ctx: int) -> list[str]:
    """Write a tokenizer `AutoTokenizer.from_pretrained(out)` loads and that gives gptn's ids:
    tokenizer.json (Hugging Face `tokenizers`: byte-level BPE, or one token per character), its special
    tokens registered as special, `model_max_length` = n_ctx; BPE also as vocab.json + merges.txt for
    the slow GPT2Tokenizer. Returns notes for the user (what the export cannot carry)."""
    from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    specials = sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])
    if isinstance(tokenizer, BPETokenizer):
        tokenizer._save_files(out)
        hf = HFTokenizer(models.BPE(vocab={**tokenizer.vocab, **tokenizer.special_tokens}, merges=list(tokenizer.merges)))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        tokenizer_class = "GPT2TokenizerFast"
    elif isinstance(tokenizer, CharTokenizer):
        vocab = {**tokenizer.stoi, **tokenizer.special_tokens}
        hf = HFTokenizer(models.WordLevel(vocab=vocab, unk_token=EOT))  # gptn refuses an unknown character
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
        hf.decoder = decoders.Fuse()
        tokenizer_class = "PreTrainedTokenizerFast"
    else:  # pragma: no cover - every gptn tokenizer is one of the two
        raise GptnError(f"no Hugging Face form for a {tokenizer.kind} tokenizer")
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name, _ in specials])
    hf.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": tokenizer_class, "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
        "additional_special_tokens": [name for name, _ in specials if name != EOT],
        "model_max_length": n_ctx, "add_prefix_space": False, "clean_up_tokenization_spaces": False}, indent=2) + "\n")
    notes = []
    if tokenizer.normalize:
        notes.append(f"the run's tokenizer normalises text first ({','.join(tokenizer.normalize)}); the exported "
                     "tokenizer does not: apply gptn.normalize.normalize(text, steps) before encoding")
    return notes


__all__ = ["Tokenizer", "BPETokenizer", "CharTokenizer", "load_tokenizer", "train_bpe", "gpt2_tokenizer",
           "resolve_tokenizer", "EOT", "START", "DELIM", "EXTRACT", "GPT1_SPECIALS"]
