"""Model configuration and the named presets of the GPT-n family."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path


class GptnError(Exception):
    """A user mistake: the CLI prints its message on one line and exits with code 2."""


def read_json(path: str | Path, kind: type = dict):
    """The JSON value of a file gptn or another tool wrote (an object unless `kind` says otherwise), or
    one line naming the file when it is unreadable, cut short, not UTF-8 or of the wrong type."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GptnError(f"cannot read {path}: {e}") from None
    if not isinstance(value, kind):
        raise GptnError(f"{path} is damaged: it holds a JSON {type(value).__name__}, not a {kind.__name__}")
    return value


def read_text(path: str, what: str) -> str:
    """The UTF-8 text of a file a user named (- for standard input), or one line naming the problem."""
    try:
        return sys.stdin.buffer.read().decode("utf-8") if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GptnError(f"{what} {path}: cannot read it as UTF-8 text ({e})") from None


def require_one_input(file: str | None, text: str | None, alternative: str = "") -> None:
    """A command that reads FILE or --text: exactly one of them (one line saying so)."""
    if (file is None) == (text is None):
        raise GptnError("give either FILE or --text" + alternative)


def check_output(path: str, flag: str) -> None:
    """An output file a command will write at its end: refused now if it cannot be written."""
    p = Path(path)
    if p.is_dir():
        raise GptnError(f"{flag} {path} is a folder; give a file name")
    if not p.parent.is_dir():
        raise GptnError(f"{flag} {path}: the folder {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise GptnError(f"{flag} {path}: cannot write there")


def is_number(value) -> bool:
    """A finite int or float (not a bool, not NaN or infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_whole(value) -> bool:
    """An int (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


# Fields that default to a function of other fields: set to None (or left out), they are computed.
DERIVED = {
    "d_ff": lambda c: 4 * c.d_model,  # GPT-1/2/3: the MLP is four times the model width
}


@dataclass
class GPTConfig:
    """Everything that determines a GPT's shape; validated on creation.

    norm="post" is GPT-1 (x = LN(x + sublayer(x)), no final LayerNorm);
    norm="pre" is GPT-2/3 (x = x + sublayer(LN(x)), plus a final LayerNorm).
    attention="sparse" is GPT-3's pattern: odd layers only see the last `sparse_band` tokens.
    arch="bert" turns the same blocks into a bidirectional encoder (no causal mask, segment
    embeddings) trained by masked-language modelling: the contrast of the lecture's last part.
    """

    vocab_size: int = 50257
    n_ctx: int = 1024
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    d_ff: int | None = None  # None: derived, 4 * d_model (DERIVED)
    dropout: float = 0.1
    norm: str = "pre"
    attention: str = "dense"
    sparse_band: int = 256
    bias: bool = True
    layer_norm_eps: float = 1e-5
    arch: str = "gpt"  # "gpt": decoder, left-to-right; "bert": encoder, both directions

    def __post_init__(self):
        # Which fields were derived (left None) is remembered, so that replace() derives them again
        # from the overridden values: --set d_model=256 on a 128-wide preset gives d_ff 1024, not 512.
        derived = frozenset(name for name in DERIVED if getattr(self, name) is None)
        object.__setattr__(self, "_derived", derived)
        for name in sorted(derived):
            setattr(self, name, DERIVED[name](self))
        for name in ("vocab_size", "n_ctx", "n_layer", "n_head", "d_model", "d_ff", "sparse_band"):
            value = getattr(self, name)
            if not is_whole(value) or value <= 0:
                raise GptnError(f"config: {name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_head:
            raise GptnError(
                f"config: d_model={self.d_model} is not divisible by n_head={self.n_head}"
            )
        if not is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise GptnError(f"config: dropout must be a number in [0, 1), got {self.dropout!r}")
        if not isinstance(self.bias, bool):
            raise GptnError(f"config: bias must be true or false, got {self.bias!r}")
        if not is_number(self.layer_norm_eps) or not self.layer_norm_eps > 0:
            raise GptnError(f"config: layer_norm_eps must be a positive number, got {self.layer_norm_eps!r}")
        if self.norm not in ("pre", "post"):
            raise GptnError(f"config: norm must be 'pre' (GPT-2/3) or 'post' (GPT-1), got {self.norm!r}")
        if self.attention not in ("dense", "sparse"):
            raise GptnError(f"config: attention must be 'dense' or 'sparse', got {self.attention!r}")
        if self.arch not in ("gpt", "bert"):
            raise GptnError(f"config: arch must be 'gpt' (decoder) or 'bert' (encoder), got {self.arch!r}")
        if self.arch == "bert" and self.attention != "dense":
            raise GptnError("config: the BERT-style encoder uses dense attention only")

    @property
    def causal(self) -> bool:
        """Whether each position sees only the positions before it (GPT) or all of them (BERT)."""
        return self.arch == "gpt"

    @property
    def segment_embeddings(self) -> bool:
        """Whether inputs carry sentence-A/B segment embeddings (BERT) beside W_e and W_p."""
        return self.arch == "bert"

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise GptnError(f"config: unknown keys {unknown}; accepted: {sorted(known)}")
        return cls(**d)

    @classmethod
    def parse_overrides(cls, pairs: list[str]) -> dict:
        """Field values from KEY=VALUE texts (`--set dropout=0 --set norm=post`): JSON values, else strings."""
        names = sorted(f.name for f in dataclasses.fields(cls))
        out = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or key not in names:
                raise GptnError(f"--set {pair!r}: expected KEY=VALUE with KEY one of {names}")
            try:
                out[key] = json.loads(value)
            except json.JSONDecodeError:
                out[key] = value  # plain strings such as norm=post
        return out

    def replace(self, **overrides) -> "GPTConfig":
        """A new config with `overrides`; a derived field (DERIVED) is derived again from the new
        values unless the overrides name it or it was set explicitly."""
        return self.from_dict({**self.to_dict(), **{name: None for name in self._derived}, **overrides})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "GPTConfig":
        try:
            return cls.from_dict(read_json(path))
        except GptnError as e:
            raise GptnError(f"{path}: {e}" if str(path) not in str(e) else str(e)) from None


@dataclass(frozen=True)
class Preset:
    """A named model size, with the pretraining batch (tokens) and learning rate it was trained with."""

    config: GPTConfig
    batch_tokens: int | None = None
    learning_rate: float | None = None
    paper_params: float | None = None  # GPT-3 Table D.1 parameter column (total, embeddings included)
    paper_flops: float | None = None  # GPT-3 Table D.1 total train compute, FLOPs (300B tokens)
    paper_pf_days: float | None = None
    note: str = field(default="", compare=False)
    paper_batch: str | None = None  # GPT-3 Table 2.1's batch column as printed ("0.5M")
    paper_shape: dict = field(default_factory=dict, compare=False)  # Table 2.1 figures we corrected (see note)
    data: str = ""  # what the generation was pretrained on (DATA)


# What each generation was pretrained on (GPT-1 §4.1; GPT-2 §2.1; GPT-3 §2.2 and Table 2.2).
DATA = {
    "gpt1": "BooksCorpus: ~7,000 unpublished books (~800M words), long contiguous text",
    "gpt2": "WebText: 8M documents (40 GB) from pages linked on Reddit with 3+ karma, Wikipedia removed",
    "gpt3": "300B tokens: Common Crawl (45 TB of compressed plaintext filtered to 570 GB, 60% of the mix), "
            "WebText2 22%, Books1 8%, Books2 8%, Wikipedia 3%",
}
# Slips in the lecture's own slides, beside what the papers say (`gptn sizes` lists them).
LECTURE_SLIPS = (
    "13B: the lecture's table prints d_model 5140 (as GPT-3's Table 2.1 does); 40 heads x 128 = 5120",
    "XL: 24 heads of 128 for d_model 2048 (Table 2.1 too); 2048 / 128 = 16 heads",
    "'peta' is 10^15 operations per second, not the 10^5 the lecture writes",
    "GPT-3 was not trained on 45 TB: that is Common Crawl's raw plaintext; filtered, it was 570 GB, "
    "and the model saw 300B tokens of a mix",
)

GPT3_TOKENS = 300e9  # every GPT-3 model was trained on 300B tokens (paper §2.2)
# GPT-3 Table 2.1 gives batch sizes as 0.5M/1M/2M/3.2M tokens: 256/512/1024/1536 sequences of 2048.
_SEQ = 2048


_PAPER_BATCH = {256: "0.5M", 512: "1M", 1024: "2M", 1536: "3.2M"}  # Table 2.1 rounds 256 x 2048 = 524,288 to 0.5M


def _gpt3(n_layer, d_model, n_head, batch_seqs, lr, params, flops, pf_days, note="", paper_shape=None):
    cfg = GPTConfig(vocab_size=50257, n_ctx=2048, n_layer=n_layer, n_head=n_head, d_model=d_model,
                    dropout=0.0, norm="pre")
    return Preset(cfg, batch_seqs * _SEQ, lr, params, flops, pf_days, note, _PAPER_BATCH[batch_seqs],
                  paper_shape or {}, DATA["gpt3"])


PRESETS: dict[str, Preset] = {
    # Tiny CPU presets: seconds per step on a laptop.
    "tiny": Preset(GPTConfig(vocab_size=512, n_ctx=64, n_layer=2, n_head=2, d_model=64, dropout=0.0),
                   batch_tokens=64 * 16, learning_rate=1e-3),
    "mini": Preset(GPTConfig(vocab_size=50257, n_ctx=256, n_layer=4, n_head=4, d_model=128, dropout=0.0),
                   batch_tokens=256 * 16, learning_rate=1e-3),
    "small": Preset(GPTConfig(vocab_size=50257, n_ctx=512, n_layer=6, n_head=6, d_model=384, dropout=0.0),
                    batch_tokens=512 * 32, learning_rate=6e-4),
    # GPT-1 (Radford et al. 2018 §4.1): 12 layers, 768 wide, 12 heads, 512 context, post-LN,
    # 40,000 BPE merges + 478 base symbols; trained with batch 64 x 512 and max lr 2.5e-4.
    "gpt1": Preset(GPTConfig(vocab_size=40478, n_ctx=512, n_layer=12, n_head=12, d_model=768,
                             dropout=0.1, norm="post"), batch_tokens=64 * 512, learning_rate=2.5e-4,
                   data=DATA["gpt1"]),
    # GPT-2 (Radford et al. 2019, Table 2) as released; lr/batch were not published, so we use
    # GPT-3's values for the matching sizes.
    "gpt2": Preset(GPTConfig(n_layer=12, n_head=12, d_model=768), 512 * 1024, 6e-4, data=DATA["gpt2"]),
    "gpt2-medium": Preset(GPTConfig(n_layer=24, n_head=16, d_model=1024), 512 * 1024, 3e-4, data=DATA["gpt2"]),
    "gpt2-large": Preset(GPTConfig(n_layer=36, n_head=20, d_model=1280), 512 * 1024, 2.5e-4, data=DATA["gpt2"]),
    "gpt2-xl": Preset(GPTConfig(n_layer=48, n_head=25, d_model=1600), 512 * 1024, 2e-4, data=DATA["gpt2"]),
    # GPT-3 (Brown et al. 2020, Table 2.1; parameters and compute from Table D.1).
    "gpt3-small": _gpt3(12, 768, 12, 256, 6.0e-4, 125e6, 2.25e20, 2.60),
    "gpt3-medium": _gpt3(24, 1024, 16, 256, 3.0e-4, 356e6, 6.41e20, 7.42),
    "gpt3-large": _gpt3(24, 1536, 16, 256, 2.5e-4, 760e6, 1.37e21, 15.8),
    "gpt3-xl": _gpt3(
        24, 2048, 16, 512, 2.0e-4, 1320e6, 2.38e21, 27.5,
        note="Table 2.1 prints 24 heads of d_head 128 for d_model 2048 (24 x 128 = 3072). d_model "
             "2048 is what the 1.3B parameter count needs, and d_head 128 is shared by every larger "
             "model, so we keep both and use 2048 / 128 = 16 heads.", paper_shape={"n_head": 24}),
    "gpt3-2.7b": _gpt3(32, 2560, 32, 512, 1.6e-4, 2650e6, 4.77e21, 55.2),
    "gpt3-6.7b": _gpt3(32, 4096, 32, 1024, 1.2e-4, 6660e6, 1.20e22, 139),
    "gpt3-13b": _gpt3(
        40, 5120, 40, 1024, 1.0e-4, 12850e6, 2.31e22, 268,
        note="Table 2.1 prints d_model 5140 with 40 heads of 128; 5140 is not divisible by 40 and "
             "40 x 128 = 5120, which also gives the 12.85B parameters of Table D.1, so d_model=5120.",
        paper_shape={"d_model": 5140}),
    "gpt3-175b": _gpt3(96, 12288, 96, 1536, 0.6e-4, 174600e6, 3.14e23, 3640),
}


def get_preset(name: str) -> Preset:
    """Look a preset up by name, with a one-line error listing the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise GptnError(f"unknown preset {name!r}; choose from: {', '.join(PRESETS)}") from None
