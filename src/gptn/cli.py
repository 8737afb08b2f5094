"""The `gptn` command. Most subcommands are an options dataclass and the library function that takes
it: the arguments are generated from the fields (gptn.options), so each one's name, default and help
are written once, beside the code that uses them. The rest declare a few arguments of their own."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from .compute import PlanOptions, print_plan
from .config import GptnError
from .detect import DetectOptions, detect_command
from .fewshot import FewshotOptions, report_fewshot
from .finetune import FinetuneConfig, PredictOptions, predict_command
from .generate import GenerateOptions, NextOptions, print_generations, show_next
from .options import add_options, from_options, positive
from .pretrain import PretrainConfig
from .protocol import ServeConfig
from .sampling import SamplingConfig
from .scoring import ScoreOptions, print_score
from .tasks import Columns

COMMANDS = {}


def command(name, help):
    def register(fn):
        COMMANDS[name] = (fn, help)
        return fn
    return register


def options_command(name: str, help: str, fn, *classes, config_file: bool = False):
    """A command whose arguments are the fields of `classes` and which calls fn(one instance of each)."""
    def setup(sub):
        for i, cls in enumerate(classes):
            add_options(sub, cls, config_file and i == 0)
        return lambda args: fn(*(from_options(cls, args) for cls in classes))
    command(name, help)(setup)


def _is_main() -> bool:  # under torchrun, rank 0 speaks
    return int(os.environ.get("RANK", "0")) == 0


# --- model core ---------------------------------------------------------------------------------

@command("sizes", "every preset with its exact parameter count and training compute beside GPT-3's Table D.1")
def cmd_sizes(sub):
    sub.add_argument("--tokens", type=positive(float), default=300e9, help="training tokens (default 300e9)")
    sub.add_argument("--json", action="store_true", help="print JSON instead of a table")

    def run(args):
        from .compute import format_preset_table, preset_table
        rows = preset_table(args.tokens)
        print(json.dumps(rows, indent=2) if args.json else "\n".join(format_preset_table(rows, args.tokens)))
    return run


options_command("compute", "plan a training run: parameters, FLOPs, PF/s-days, memory and time to train",
                print_plan, PlanOptions)


@command("import-hf", "convert a Hugging Face GPT-2 / GPT-1 checkpoint (folder or hub id) into a gptn run")
def cmd_import_hf(sub):
    sub.add_argument("src", help="Hugging Face model folder (config.json + weights) or hub id")
    sub.add_argument("out", help="gptn run directory to write")

    def run(args):
        from .hf import import_hf
        print(f"imported {args.src} -> {import_hf(args.src, args.out)}")
    return run


@command("export-hf", "write a gptn run as a Hugging Face folder (AutoModelForCausalLM loads it)")
def cmd_export_hf(sub):
    sub.add_argument("run", help="gptn run directory")
    sub.add_argument("out", help="folder to write (must be new or empty)")

    def run(args):
        from .hf import export_hf
        print(f"exported {args.run} -> {export_hf(args.run, args.out)}")
    return run


@command("export-gguf", "write a gptn run as a GGUF file for llama.cpp (ollama, LM Studio, llama-cpp-python)")
def cmd_export_gguf(sub):
    from .gguf_export import TYPES
    sub.add_argument("run", help="gptn run directory (a pre-LN GPT with a byte-level BPE tokenizer)")
    sub.add_argument("out", help="the .gguf file to write (must not exist)")
    sub.add_argument("--type", default="f16", choices=TYPES,
                     help="weight type: f32, f16 (default) or q8_0 (8-bit blocks of 32; vectors stay f32)")

    def run(args):
        from .gguf_export import export_gguf
        path = export_gguf(args.run, args.out, args.type)
        print(f"exported {args.run} -> {path} ({args.type}, {path.stat().st_size / 2**20:,.1f} MiB)")
    return run


# --- data and pretraining -----------------------------------------------------------------------

@command("prepare", "tokenize text files, folders, globs, .jsonl or .parquet (or `stdlib`) into token shards")
def cmd_prepare(sub):
    sub.add_argument("sources", nargs="+", metavar="SOURCE",
                     help="text files, folders, globs, .jsonl/.parquet files, or `stdlib` (the Python "
                          "standard library's sources: an embedded corpus that needs no download)")
    sub.add_argument("--tokenizer", required=True,
                     help="char, bpe:N (train N tokens on the corpus), gpt2, or a tokenizer folder")
    sub.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    sub.add_argument("--val-fraction", type=float, default=0.005, help="share of documents held out (default 0.005)")
    sub.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    sub.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet (default text)")
    sub.add_argument("--dtype", default="auto", help="token dtype: auto (uint16 when it fits), uint16 or uint32")
    sub.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    sub.add_argument("--normalize", metavar="STEPS",
                     help="rewrite the text first and save the steps with the tokenizer, so fine-tuning, "
                          "prediction and generation apply them too: html (<br /> tags out), lower, punct "
                          "(Penn Treebank punctuation and contractions), or sst = all three (SST-2's text)")

    def run(args):
        from .data import prepare
        m = prepare(args.sources, args.tokenizer, args.out, val_fraction=args.val_fraction, seed=args.seed,
                    text_field=args.text_field, dtype=args.dtype, workers=args.workers, normalize=args.normalize)
        tok = m["tokenizer"]
        print(f"prepared {args.out}: {m['documents']['train']:,} + {m['documents']['val']:,} documents, "
              f"{m['tokens']['train']:,} train + {m['tokens']['val']:,} val tokens ({m['dtype']}), "
              f"tokenizer {tok['kind']} with {tok['vocab_size']:,} tokens"
              + (f", text normalised ({','.join(tok['normalize'])})" if tok.get("normalize") else ""))
    return run


@command("pretrain", "pretrain a GPT on a prepared corpus (resumes when --out holds a run); works under torchrun")
def cmd_pretrain(sub):
    add_options(sub, PretrainConfig)
    sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                     help="override a model field, e.g. --set dropout=0 --set n_ctx=128 (repeatable)")
    sub.add_argument("--arch", choices=["gpt", "bert"], help="gpt: decoder, next-token objective (default); "
                     "bert: bidirectional encoder, masked-LM objective (for the GPT-vs-BERT contrast)")

    def run(args):
        from .config import GPTConfig
        from .pretrain import format_summary, pretrain
        overrides = {**GPTConfig.parse_overrides(args.overrides), **({"arch": args.arch} if args.arch else {})}
        summary = pretrain(from_options(PretrainConfig, args, overrides=overrides))
        if _is_main():
            print(format_summary(summary))
    return run


@command("quickstart", "prepare an embedded corpus, pretrain a small GPT for a few minutes on CPU, then sample")
def cmd_quickstart(sub):
    sub.add_argument("--out", default="runs/quickstart", help="where to write (default runs/quickstart)")
    sub.add_argument("--minutes", type=positive(float), default=4.0, help="training time budget (default 4)")
    sub.add_argument("--source", action="append", dest="sources",
                     help="corpus source instead of the embedded default (repeatable)")
    sub.add_argument("--prompt", help="prompt for the next-token probabilities (default \"for i in\" on the "
                                      "embedded corpus, \"After running I am\" on another)")
    sub.add_argument("--no-progress", action="store_true",
                     help="no progress bar or per-step lines (evaluations are still printed)")

    def run(args):
        from .quickstart import quickstart
        quickstart(args.out, args.sources, args.minutes, prompt=args.prompt, progress=not args.no_progress)
    return run


# --- looking at a model, generating, scoring -----------------------------------------------------

options_command("next", "the most likely next tokens after a prompt, with their probabilities (a BERT run: the word "
                        "at [MASK])", show_next, NextOptions)


@command("inspect", "a run's model as the lecture draws it: h0 = U·W_e + W_p, the blocks, softmax(h_n·W_e^T), "
                    "parameters per part and the attention mask")
def cmd_inspect(sub):
    sub.add_argument("run", help="run directory (pretrained, BERT or fine-tuned)")
    sub.add_argument("--text", default="After running I am", help="the input whose attention mask is drawn")
    sub.add_argument("--json", action="store_true", help="print JSON instead of text")

    def run(args):
        from .checkpoint import checkpoint_dir, load_model
        from .describe import describe_model, format_model
        from .finetune import TASK_FILE, load_task_model
        if (checkpoint_dir(args.run) / TASK_FILE).is_file():
            task_model, tok = load_task_model(args.run)
            model, spec = task_model.gpt, task_model.spec
        else:
            (model, tok), spec = load_model(args.run), None
        info = describe_model(model, tok, args.text, spec)
        print(json.dumps(info, ensure_ascii=False) if args.json else "\n".join(format_model(info, args.run)))
    return run


options_command("detect", "is a text machine-generated? GLTR's token ranks under a run's model, and a calibrated "
                          "probability (--fit HUMAN MACHINE trains the classifier)", detect_command, DetectOptions)
options_command("generate", "sample text from a run (streams as tokens arrive; several prompts are batched)",
                print_generations, GenerateOptions, SamplingConfig)
options_command("score", "per-token log-probabilities, log-likelihood, perplexity and bits per byte of a text",
                print_score, ScoreOptions)


# --- transfer learning and in-context learning ----------------------------------------------------

def _finetune(cfg: FinetuneConfig, columns: Columns) -> None:
    from .finetune import finetune
    r = finetune(dataclasses.replace(cfg, columns=columns))
    if _is_main():
        best = r["best"]
        kept = (f"best {r['metric']} {best['value']:.4f} at epoch {best['epoch']} (step {best['step']})"
                if best["value"] is not None else "the final model (no --val)")
        print(f"{r['task']}: {r['train_examples']} examples, {r['steps']} steps, {r['seconds']:.0f} s; {kept}; saved to "
              f"{r['checkpoint']}")


options_command("finetune", "fine-tune a pretrained run on a labeled task (GPT-1: start/delim/extract tokens, a "
                            "linear head, L3 = L2 + λ·L1)", _finetune, FinetuneConfig, Columns, config_file=True)
options_command("predict", "label new inputs with a fine-tuned run (from a file or the command line)",
                predict_command, PredictOptions, Columns)
options_command("fewshot", "zero-, one- and few-shot evaluation (GPT-3 in-context learning, no gradient update)",
                report_fewshot, FewshotOptions)


@command("lm-eval", "run lm-evaluation-harness's own command line on a run (the `lm-eval` extra): "
                    "gptn lm-eval RUN --tasks T --num_fewshot K [any other lm_eval flag]")
def cmd_lm_eval(sub):
    sub.add_argument("run", help="run directory")
    sub.add_argument("harness_args", nargs=argparse.REMAINDER, metavar="...",
                     help="passed to lm_eval as given (--tasks, --num_fewshot, --limit, --include_path, "
                          "--output_path, --batch_size, --device, ...); --model_args are added to pretrained=RUN")

    def run(args):
        try:
            from .integrations.lm_eval import run_harness  # registers the model "gptn"
        except ImportError:
            raise GptnError("this needs lm-evaluation-harness: pip install 'gptn[lm-eval]'") from None
        run_harness(args.run, args.harness_args)
    return run


# --- serving ------------------------------------------------------------------------------------

def _serve(cfg: ServeConfig) -> None:
    from .serve import serve  # the `serve` extra, imported once the options are known to be good
    serve(cfg)


options_command("serve", "serve a run over HTTP with the OpenAI completions API (the `serve` extra)", _serve,
                ServeConfig, config_file=True)


# --- entry point --------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptn", description="The GPT-n family, end to end.")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (setup, help) in COMMANDS.items():
        sub = subs.add_parser(name, help=help, description=help)
        sub.set_defaults(_handler=setup(sub))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args._handler(args)
    except GptnError as e:
        print(f"gptn {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gptn {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the filesystem or the network said no: unwritable, full, a file where a folder goes
        print(f"gptn {args.command}: error: {_os_error(e)}", file=sys.stderr)
        return 2
    return 0


def _os_error(e: OSError) -> str:
    import errno
    import shutil
    text = (f"{e.filename}: " if e.filename else "") + f"{e.strerror or e}"
    if e.errno == errno.ENOSPC and e.filename:
        folder = next((p for p in Path(os.path.abspath(e.filename)).parents if p.exists()), Path("/"))
        text += f" ({shutil.disk_usage(folder).free / 2**20:.0f} MiB free on that disk; the previous checkpoint, if any, is intact)"
    return text


if __name__ == "__main__":
    sys.exit(main())
