"""Import and export of Hugging Face GPT-2 (`gpt2`) and GPT-1 (`openai-gpt`) checkpoints.

gptn uses the same parameter names, so conversion is a key-for-key copy except for two details:
Hugging Face stores c_attn/c_proj/c_fc as `Conv1D` ([in, out], the transpose of nn.Linear), and
GPT-1 calls the embeddings `tokens_embed` / `positions_embed`.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import (WRITE_ERRORS, checkpoint_dir, claim_out, load_model, load_weights, read_meta, read_metrics,
                         read_train_config, read_weights, run_lock, save_checkpoint, write_error)
from .config import GPTConfig, GptnError, read_json
from .model import GPT, with_zero_biases
from .tokenizer import DELIM, EOT, EXTRACT, START, copy_hf_tokenizer_files, load_tokenizer

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_GPT1_NAMES = {"tokens_embed.": "wte.", "positions_embed.": "wpe."}


def _resolve_source(src: str) -> Path:
    path = Path(src)
    if path.is_dir():
        return path
    if path.exists():
        raise GptnError(f"{src} is a file; expected a Hugging Face model directory")
    if src.count("/") <= 1 and not src.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise GptnError(f"{src} is not a directory (install huggingface_hub to fetch hub ids)") from None
        try:
            return Path(snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.bin"]))
        except Exception as e:  # network or hub errors have many types
            raise GptnError(f"could not fetch {src!r} from the hub: {type(e).__name__}: {e}".splitlines()[0]) from None
    raise GptnError(f"{src} does not exist")


def config_from_hf(hf: dict, source: str = "config.json") -> GPTConfig:
    """gptn config from a Hugging Face GPT-2 / GPT-1 config.json dict."""
    model_type = hf.get("model_type")
    if model_type not in ("gpt2", "openai-gpt"):
        raise GptnError(f"{source}: model_type {model_type!r} is not a GPT-2 ('gpt2') or GPT-1 ('openai-gpt') checkpoint")
    act = hf.get("activation_function", "gelu_new") if model_type == "gpt2" else hf.get("afn", "gelu")
    # GPT-1's "gelu" in transformers is the tanh approximation (gelu_new).
    if act not in ("gelu_new", "gelu_pytorch_tanh") and not (model_type == "openai-gpt" and act == "gelu"):
        raise GptnError(f"{source}: activation {act!r} is not supported (gptn uses GELU, tanh form)")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise GptnError(f"{source}: {flag}=true is not supported")
    if hf.get("scale_attn_weights") is False:
        raise GptnError(f"{source}: scale_attn_weights=false is not supported")
    try:
        d_model = hf["n_embd"]
        return GPTConfig(
            vocab_size=hf["vocab_size"], n_ctx=hf["n_positions"], n_layer=hf["n_layer"], n_head=hf["n_head"],
            d_model=d_model, d_ff=hf.get("n_inner") or 4 * d_model, dropout=hf.get("resid_pdrop", 0.1),
            norm="pre" if model_type == "gpt2" else "post", layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        )
    except KeyError as e:
        raise GptnError(f"{source}: missing key {e.args[0]!r}") from None


def _read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a Hugging Face folder (one file, an index of shards, or pytorch_model.bin); a
    damaged file, or an index naming a file outside the folder, is one line naming it."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    bin_file = folder / "pytorch_model.bin"
    if single.is_file():
        return read_weights(single)
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise GptnError(f"{index} is damaged: no weight_map of tensor name -> shard file")
        out = {}
        for shard in sorted(set(weight_map.values())):
            path = (folder / shard).resolve()
            if folder.resolve() not in path.parents:
                raise GptnError(f"{index} names {shard!r}, a file outside {folder}")
            if not path.is_file():
                raise GptnError(f"{index} names {shard!r}, which {folder} does not hold")
            out.update(read_weights(path))
        return out
    if bin_file.is_file():
        try:
            return torch.load(bin_file, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated zip, or a pickle that is not plain tensors
            raise GptnError(f"{bin_file} is not a readable PyTorch weights file ({type(e).__name__})") from None
    raise GptnError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """Hugging Face names and Conv1D layout -> gptn names and nn.Linear layout."""
    out = {}
    for key, value in hf_state.items():
        if key.startswith("transformer."):
            key = key[len("transformer."):]
        if key == "lm_head.weight" or key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # the tied head and the old causal-mask buffers are not parameters
        if model_type == "openai-gpt":
            for hf_name, name in _GPT1_NAMES.items():
                if key.startswith(hf_name):
                    key = name + key[len(hf_name):]
        if key.endswith(_CONV1D):
            value = value.t()
        out[key] = value.contiguous()
    return out


def state_dict_to_hf(state: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """gptn names -> Hugging Face names (with the `transformer.` prefix) and Conv1D layout."""
    out = {}
    for key, value in state.items():
        if key.endswith(_CONV1D):
            value = value.t()
        if model_type == "openai-gpt":
            for hf_name, name in _GPT1_NAMES.items():
                if key.startswith(name):
                    key = hf_name + key[len(name):]
        out["transformer." + key] = value.detach().to("cpu").contiguous()
    return out


def load_hf(src: str) -> tuple[GPT, object]:
    """A gptn model (and tokenizer, when the folder has one) from a Hugging Face GPT-2/GPT-1 folder or hub id."""
    folder = _resolve_source(src)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise GptnError(f"{folder} is not a Hugging Face checkpoint: no config.json")
    hf_cfg = read_json(cfg_path)
    config = config_from_hf(hf_cfg, str(cfg_path))
    model = GPT(config)
    state = state_dict_from_hf(_read_hf_weights(folder), hf_cfg["model_type"])
    load_weights(model, state, source=str(folder))
    tokenizer = None
    try:
        tokenizer = load_tokenizer(folder)
    except GptnError:
        pass  # weights without tokenizer files are still a valid model
    return model.eval(), tokenizer


def import_hf(src: str, out: str | Path) -> Path:
    """`gptn import-hf SRC OUT`: convert a Hugging Face checkpoint into a gptn run directory (a new
    one: an existing run in OUT is refused, and OUT is locked while it is written)."""
    claim_out(out, "import-hf")
    model, tokenizer = load_hf(src)  # a bad source is refused before OUT is created
    with run_lock(out):
        claim_out(out, "import-hf")  # again under the lock: another process may have written it meanwhile
        return save_checkpoint(out, model.config, {k: v.contiguous() for k, v in model.state_dict().items()},
                               tokenizer=tokenizer, meta={"kind": "import-hf", "source": str(src)})


def hf_config(config: GPTConfig, tokenizer=None) -> dict:
    """The Hugging Face config.json for a gptn config (GPT-2 for pre-LN, GPT-1 for post-LN)."""
    if config.attention != "dense":
        raise GptnError("Hugging Face GPT-2 has no sparse attention; only dense models can be exported")
    common = {
        "vocab_size": config.vocab_size, "n_positions": config.n_ctx, "n_embd": config.d_model,
        "n_layer": config.n_layer, "n_head": config.n_head, "layer_norm_epsilon": config.layer_norm_eps,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "initializer_range": 0.02, "tie_word_embeddings": True,
    }
    eot = getattr(tokenizer, "eot_id", None)
    if config.norm == "pre":
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], **common,
                "n_inner": config.d_ff, "activation_function": "gelu_new",
                "bos_token_id": eot, "eos_token_id": eot}
    if config.d_ff != 4 * config.d_model:
        raise GptnError(f"Hugging Face GPT-1 fixes d_ff = 4 * d_model; this model has d_ff={config.d_ff}")
    return {"model_type": "openai-gpt", "architectures": ["OpenAIGPTLMHeadModel"], **common, "afn": "gelu"}


def export_hf(run: str | Path, out: str | Path, say=None) -> Path:
    """`gptn export-hf RUN OUT`: write a folder that `AutoModelForCausalLM.from_pretrained` (and, with
    the run's tokenizer, `AutoTokenizer`) loads; a fine-tuned run becomes a sequence-classification
    model (`pipeline("text-classification")`). `say` gets notes on what the export cannot carry."""
    from .finetune import TASK_FILE, load_task_model

    say = say or (lambda m: print(f"gptn export-hf: note: {m}", file=sys.stderr))
    finetuned = (checkpoint_dir(run) / TASK_FILE).is_file()
    if finetuned:
        task_model, tokenizer = load_task_model(run)
        model = task_model.gpt
    else:
        model, tokenizer = load_model(run)
    config = model.config
    if not config.causal:
        raise GptnError(f"{run} is a BERT-style encoder; export-hf writes GPT-2 / GPT-1 checkpoints only")
    hf_cfg = hf_config(config, tokenizer)
    state = with_zero_biases(model.state_dict())  # Hugging Face's GPT-2 has every bias
    if finetuned:
        hf_cfg.update(_classifier_config(run, task_model.spec, hf_cfg["model_type"], tokenizer))
        state.update(_classifier_weights(task_model, state))
        say("the head's bias is folded into the last LayerNorm's bias (Hugging Face's score layer has none), so "
            "this folder is a classifier only: export the run it was fine-tuned from for the language model")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise GptnError(f"{out} already exists and is not empty")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        score = {"score.weight": state.pop("score.weight")} if finetuned else {}
        save_file({**state_dict_to_hf(state, hf_cfg["model_type"]), **score}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        if tokenizer is not None:
            for note in copy_hf_tokenizer_files(tokenizer, out, config.n_ctx):
                say(note)
            if finetuned:
                _frame_like_gpt1(out, tokenizer, task_model.spec.task)
                say("the exported tokenizer truncates the end of an over-long input; gptn "
                    + ("reads it whole in windows" if task_model.spec.long_inputs == "windows" else "cuts its start"))
        if not finetuned:
            (out / "generation_config.json").write_text(json.dumps(generation_config(config, tokenizer), indent=2) + "\n")
        (out / "README.md").write_text(model_card(run, out, config, tokenizer, hf_cfg, task_model.spec if finetuned else None))
    except WRITE_ERRORS as e:
        shutil.rmtree(out, ignore_errors=True)  # it was empty or absent: nothing of the user's is lost
        needed = sum(t.numel() * t.element_size() for t in state.values())
        raise write_error(out, e, needed, "the Hugging Face export", "nothing was left half-written") from None
    return out


def generation_config(config: GPTConfig, tokenizer) -> dict:
    """generation_config.json: what `model.generate` reads (end of text, padding, the context length)."""
    eot = getattr(tokenizer, "eot_id", None)
    return {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot, "max_length": config.n_ctx,
            "do_sample": False}


def model_card(run, out: Path, config: GPTConfig, tokenizer, hf_cfg: dict, spec=None) -> str:
    """The exported folder's README.md: the model, its tokenizer, what it was trained on and how well, how to load it."""
    ckpt = checkpoint_dir(run)
    run = Path(run)
    meta = read_meta(ckpt)
    try:
        train_config = read_train_config(run)
    except GptnError:  # a run without one (imported, fine-tuned) or a damaged one: the card says less
        train_config = {}
    val = [r for r in read_metrics(run) if "val_loss" in r]
    from .compute import parameter_count
    norm = "pre-LayerNorm with a final LayerNorm (GPT-2/3)" if config.norm == "pre" else "post-LayerNorm (GPT-1)"
    lines = [f"# {run.name}", "", f"A GPT trained with [gptn](https://pypi.org/project/gptn/), exported as "
             f"`{hf_cfg['architectures'][0]}`.", "", "## Model", "",
             f"- {config.n_layer} layers, d_model {config.d_model}, {config.n_head} heads, d_ff {config.d_ff}, "
             f"context {config.n_ctx} tokens, {norm}, tied input / output embeddings, "
             f"{parameter_count(config):,} parameters",
             f"- tokenizer: {type(tokenizer).__name__ if tokenizer is not None else 'none saved'}, "
             f"{config.vocab_size:,} tokens" + (f", end of text id {tokenizer.eot_id}" if tokenizer is not None else ""),
             "", "## Training", ""]
    steps, batch = meta.get("step"), train_config.get("batch_tokens")
    if meta.get("kind") == "finetune":
        lines.append(f"- fine-tuned from `{meta.get('source')}` for {spec.task if spec else meta.get('task')}"
                     + (f" (labels {', '.join(spec.labels)})" if spec and spec.labels else "")
                     + (f"; {meta['metric']} {meta['value']:.4f} on its validation set" if meta.get("value") is not None
                        else f"; the final model after {steps:,} steps (no validation set)" if steps is not None else ""))
    else:
        lines.append(f"- corpus: `{meta.get('corpus', train_config.get('corpus', 'unknown'))}`")
        if steps is not None and batch:
            lines.append(f"- {steps:,} steps of {batch:,} tokens: {steps * batch:,} training tokens")
        if val:
            lines.append(f"- validation loss {val[-1]['val_loss']:.4f} nats per token (perplexity "
                         f"{val[-1]['val_ppl']:.2f}) at step {val[-1]['step']}")
    load = ("from transformers import pipeline\nclassify = pipeline(\"text-classification\", model=\"PATH\")"
            if spec else "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "model = AutoModelForCausalLM.from_pretrained(\"PATH\")\ntokenizer = AutoTokenizer.from_pretrained(\"PATH\")")
    lines += ["", "## Loading", "", "```python", load.replace("PATH", str(out)), "```", ""]
    return "\n".join(lines)


def _classifier_config(run, spec, model_type: str, tokenizer) -> dict:
    """config.json fields of GPT2ForSequenceClassification / OpenAIGPTForSequenceClassification: both
    read the last token that is not padding, which is GPT-1's extract token when the tokenizer frames
    the input (and pads with <|endoftext|>)."""
    if spec.pooling != "extract":
        raise GptnError(f"{run} pools h_n by its mean (--pooling {spec.pooling}); Hugging Face's sequence "
                        "classifiers read the last token: fine-tune with --pooling extract to export it")
    if spec.task not in ("classification", "entailment"):
        raise GptnError(f"{run} is a {spec.task} run; Hugging Face's sequence classifiers take one text or one "
                        "pair (GPT-1's similarity adds two orderings, multiple choice scores K): export "
                        "classification and entailment runs only")
    if tokenizer is None or any(t not in tokenizer.special_tokens for t in (START, DELIM, EXTRACT)):
        raise GptnError(f"{run} has no tokenizer with GPT-1's start / delimiter / extract tokens")
    labels = ["score"] if spec.regression else spec.labels
    architecture = "GPT2ForSequenceClassification" if model_type == "gpt2" else "OpenAIGPTForSequenceClassification"
    return {"architectures": [architecture], "num_labels": len(labels), "pad_token_id": tokenizer.eot_id,
            "id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)},
            "problem_type": "regression" if spec.regression else "single_label_classification"}


def _classifier_weights(task_model, state: dict) -> dict:
    """score.weight = the head's weight, and the head's bias b folded into the last LayerNorm's bias
    (+ pinv(W)·b, so that W·(h + Δ) = W·h + b exactly while W has full row rank)."""
    weight, bias = (p.detach().float() for p in (task_model.head.weight, task_model.head.bias))
    delta = torch.linalg.pinv(weight) @ bias
    if (weight @ delta - bias).abs().max() > 1e-4 * (1 + bias.abs().max()):
        raise GptnError("the head's bias cannot be folded into the last LayerNorm (its weight is rank-deficient)")
    config = task_model.gpt.config
    ln = "ln_f.bias" if config.norm == "pre" else f"h.{config.n_layer - 1}.ln_2.bias"
    base = state.get(ln, torch.zeros(config.d_model))
    return {ln: (base.float() + delta).to(base.dtype), "score.weight": weight.to(task_model.head.weight.dtype)}


def _frame_like_gpt1(out: Path, tokenizer, task: str) -> None:
    """The exported tokenizer adds GPT-1's framing itself: <|start|> A <|extract|>, or
    <|start|> A <|delim|> B <|extract|> for a pair, and pads with <|endoftext|>."""
    from tokenizers import Tokenizer as HFTokenizer, processors

    hf = HFTokenizer.from_file(str(out / "tokenizer.json"))
    specials = [(t, tokenizer.special_tokens[t]) for t in (START, DELIM, EXTRACT)]
    hf.post_processor = processors.TemplateProcessing(
        single=f"{START} $A {EXTRACT}", pair=f"{START} $A {DELIM} $B {EXTRACT}", special_tokens=specials)
    hf.save(str(out / "tokenizer.json"))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["pad_token"] = EOT
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")

