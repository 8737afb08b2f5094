"""`gptn export-gguf RUN OUT.gguf`: a run as a GGUF file that llama.cpp (and ollama, LM Studio,
llama-cpp-python) loads as its GPT-2 architecture.

The file is written with the `gguf` package from llama.cpp's own repository, the way its
convert_hf_to_gguf.py writes a Hugging Face GPT-2: the same tensor names and metadata keys, the
byte-level BPE vocabulary with its merges, the tied output read from the token embedding. What
llama.cpp's GPT-2 graph cannot compute is refused in one line: GPT-1's post-LN blocks, GPT-3's sparse
layers, the BERT-style encoder, a character vocabulary, a tokenizer that normalises text first.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from .checkpoint import WRITE_ERRORS, checkpoint_dir, load_model, write_error
from .config import GptnError
from .model import with_zero_biases
from .tokenizer import BPETokenizer, bytes_to_unicode

TYPES = ("f32", "f16", "q8_0")  # what --type accepts: llama.cpp's names
Q8_BLOCK = 32  # Q8_0 quantises rows in blocks of 32 values

# gptn's parameter names -> llama.cpp's GPT-2 tensor names (gguf.TENSOR_NAMES for MODEL_ARCH.GPT2)
_BLOCK_NAMES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
                "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
_TOP_NAMES = {"wte": "token_embd", "wpe": "position_embd", "ln_f": "output_norm"}


def gguf_name(name: str) -> str:
    """The GGUF tensor name of a gptn parameter (h.3.mlp.c_fc.weight -> blk.3.ffn_up.weight)."""
    m = re.fullmatch(r"h\.(\d+)\.(.+)\.(weight|bias)", name)
    if m:
        return f"blk.{m[1]}.{_BLOCK_NAMES[m[2]]}.{m[3]}"
    stem, kind = name.rsplit(".", 1)
    return f"{_TOP_NAMES[stem]}.{kind}"


def check_exportable(config, tokenizer) -> None:
    """Refuse, in one line, a model or tokenizer llama.cpp's GPT-2 architecture cannot represent."""
    if not config.causal:
        raise GptnError("a BERT-style encoder cannot be exported to GGUF: llama.cpp's GPT-2 is a decoder")
    if config.norm != "pre":
        raise GptnError("a post-LN (GPT-1) model cannot be exported to GGUF: llama.cpp's GPT-2 has pre-LN blocks "
                        "and a final LayerNorm")
    if config.attention != "dense":
        raise GptnError("a model with sparse attention layers cannot be exported to GGUF: llama.cpp's GPT-2 is dense")
    if not isinstance(tokenizer, BPETokenizer):
        what = {"char": "a character", None: "no"}.get(getattr(tokenizer, "kind", None), f"a {tokenizer.kind}")
        raise GptnError(f"a run with {what} tokenizer cannot be exported to GGUF: llama.cpp's GPT-2 reads a "
                        "byte-level BPE vocabulary")
    if tokenizer.normalize:
        raise GptnError(f"this run's tokenizer normalises text first ({', '.join(tokenizer.normalize)}), which "
                        "llama.cpp would not do: its tokens would differ from the ones the model was trained on")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise GptnError("export-gguf needs llama.cpp's gguf package: pip install 'gptn[gguf]'") from None
    return gguf


def vocabulary(tokenizer: BPETokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens, token types and merges as llama.cpp's GPT-2 tokenizer reads them: byte-level strings by
    id, specials as control tokens, ids the model has but the tokenizer does not as unused [PAD{i}]."""
    gguf = _gguf()

    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for text, i in tokenizer.vocab.items():
        tokens[i], types[i] = text, int(gguf.TokenType.NORMAL)
    for text, i in tokenizer.special_tokens.items():
        tokens[i], types[i] = text, int(gguf.TokenType.CONTROL)
    # Byte tokens are normal tokens in GPT-2's byte-level scheme; every byte must have one.
    missing = [c for c in bytes_to_unicode().values() if c not in tokenizer.vocab]
    if missing:
        raise GptnError(f"the tokenizer lacks {len(missing)} of the 256 byte tokens byte-level BPE needs")
    return tokens, types, [f"{a} {b}" for a, b in tokenizer.merges]


def _tensor(array: np.ndarray, name: str, kind: str):
    """(data, raw_dtype) for one tensor at the file type `kind`: as llama.cpp's converter does, vectors
    (norms, biases) and the position embedding stay f32, and a matrix whose rows are not a whole number
    of Q8_0 blocks is written f16."""
    gguf = _gguf()

    if kind == "f32" or array.ndim < 2 or name.startswith("position_embd"):
        return array.astype(np.float32), None
    if kind == "q8_0" and array.shape[-1] % Q8_BLOCK == 0:
        qtype = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(array.astype(np.float32), qtype), qtype
    return array.astype(np.float16), None


def export_gguf(run: str | Path, out: str | Path, kind: str = "f16") -> Path:
    """Write `run` as the GGUF file `out` (a new file: an existing one is refused) at file type `kind`."""
    from .finetune import TASK_FILE

    gguf = _gguf()

    if kind not in TYPES:
        raise GptnError(f"--type must be one of {', '.join(TYPES)}, not {kind!r}")
    if (checkpoint_dir(run) / TASK_FILE).is_file():
        raise GptnError(f"{run} is a fine-tuned classifier; GGUF holds a language model: export the run it was "
                        "fine-tuned from")
    out = Path(out)
    if out.exists():
        raise GptnError(f"{out} already exists; give a new file name")
    if not out.parent.is_dir():
        raise GptnError(f"the folder {out.parent} does not exist")
    model, tokenizer = load_model(run)
    config = model.config
    check_exportable(config, tokenizer)
    tokens, types, merges = vocabulary(tokenizer, config.vocab_size)
    state = with_zero_biases(model.state_dict())  # llama.cpp's GPT-2 needs every bias
    state = {k: v.float().numpy() for k, v in state.items()}

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
        writer.add_name(Path(run).resolve().name)
        writer.add_context_length(config.n_ctx)
        writer.add_embedding_length(config.d_model)
        writer.add_feed_forward_length(config.d_ff)
        writer.add_block_count(config.n_layer)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_eps)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")  # GPT-2's pre-tokenizing regex: what gptn's byte-level BPE uses
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(tokenizer.eot_id)
        writer.add_eos_token_id(tokenizer.eot_id)
        writer.add_add_bos_token(False)  # gptn starts a prompt with its first token, not an end-of-text
        for name, value in state.items():
            data, raw_dtype = _tensor(value, gguf_name(name), kind)
            writer.add_tensor(gguf_name(name), data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(out)
    except WRITE_ERRORS as e:
        tmp.unlink(missing_ok=True)
        needed = sum(v.size * (4 if kind == "f32" else 2) for v in state.values())
        raise write_error(out.parent, e, needed, "the GGUF file", "nothing was written") from None
    return out
