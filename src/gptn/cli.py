"""The `gptn` command: each subcommand is a thin call into the library."""

from __future__ import annotations

import argparse
import json
import sys

from .config import GptnError

COMMANDS = {}


def command(name, help):
    def register(fn):
        COMMANDS[name] = (fn, help)
        return fn
    return register


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _bytes(x: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if x >= scale:
            return f"{x / scale:.1f} {unit}"
    return f"{x:.0f} B"


def _positive_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


# --- model core ---------------------------------------------------------------------------------

@command("sizes", "every preset with its exact parameter count and training compute beside GPT-3's Table D.1")
def cmd_sizes(sub):
    sub.add_argument("--tokens", type=_positive_float, default=300e9, help="training tokens (default 300e9)")
    sub.add_argument("--json", action="store_true", help="print JSON instead of a table")

    def run(args):
        from .compute import preset_table
        rows = preset_table(args.tokens)
        if args.json:
            print(json.dumps(rows, indent=2))
            return
        head = f"{'preset':<12} {'layers':>6} {'d_model':>7} {'heads':>5} {'d_head':>6} {'ctx':>5} " \
               f"{'batch':>6} {'lr':>8} {'params':>8} {'paper':>8} {'6ND FLOPs':>10} {'paper':>9} " \
               f"{'PF/s-days':>9} {'paper':>7} {'+attn FLOPs':>11}"
        print(head)
        for r in rows:
            paper = lambda v, fmt: (fmt(v) if v else "-")  # noqa: E731
            print(f"{r['name']:<12} {r['n_layer']:>6} {r['d_model']:>7} {r['n_head']:>5} {r['d_head']:>6} "
                  f"{r['n_ctx']:>5} {_si(r['batch_tokens'] or 0):>6} {r['learning_rate'] or 0:>8.2e} "
                  f"{_si(r['params']):>8} {paper(r['paper_params'], _si):>8} {r['flops_6nd']:>10.3g} "
                  f"{paper(r['paper_flops'], lambda v: f'{v:.3g}'):>9} {r['pf_days_6nd']:>9.3g} "
                  f"{paper(r['paper_pf_days'], lambda v: f'{v:.3g}'):>7} {r['flops_with_attention']:>11.3g}")
        print(f"(compute for {args.tokens:.3g} training tokens; 'paper' = GPT-3 Table D.1)")
    return run


@command("compute", "plan a training run: parameters, FLOPs, PF/s-days, memory and time to train")
def cmd_compute(sub):
    sub.add_argument("--preset", default="gpt3-175b", help="model preset (see `gptn sizes`)")
    sub.add_argument("--config", help="a config JSON file instead of a preset")
    sub.add_argument("--tokens", type=_positive_float, default=300e9, help="training tokens")
    sub.add_argument("--gpus", type=int, default=1, help="number of accelerators")
    sub.add_argument("--peak", type=_positive_float, default=1e15, help="peak FLOP/s per accelerator (default 1e15)")
    sub.add_argument("--mfu", type=_positive_float, default=1.0, help="sustained fraction of the peak (default 1.0)")
    sub.add_argument("--micro-batch", type=int, default=1, help="sequences per accelerator per step (memory)")
    sub.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    sub.add_argument("--json", action="store_true")

    def run(args):
        from .compute import plan
        config = _model_config(args.preset, args.config)
        p = plan(config, args.tokens, args.gpus, args.peak, args.mfu, args.micro_batch, args.precision)
        if args.json:
            print(json.dumps(p, indent=2))
            return
        m = p["memory_bytes"]
        print(f"parameters            {p['params']:,} ({_si(p['params'])})")
        print(f"training tokens       {_si(p['tokens'])}")
        print(f"compute (6ND)         {p['flops_6nd']:.3e} FLOPs = {p['pf_days_6nd']:,.4g} PF/s-days")
        print(f"compute (+attention)  {p['flops_with_attention']:.3e} FLOPs = {p['pf_days_with_attention']:,.4g} PF/s-days")
        print(f"memory ({args.precision}, micro-batch {args.micro_batch} x {config.n_ctx}): weights {_bytes(m['weights'])}, "
              f"gradients {_bytes(m['gradients'])}, Adam {_bytes(m['optimizer'])}, activations {_bytes(m['activations'])} "
              f"({_bytes(m['activations_checkpointed'])} with checkpointing)")
        print(f"total                 {_bytes(m['total'])} ({_bytes(m['total_checkpointed'])} with activation checkpointing)")
        print(f"time on {args.gpus} x {args.peak:.3g} FLOP/s at {args.mfu:.0%}: {p['days']:,.4g} days ({p['years']:,.3g} years)")
    return run


def _model_config(preset: str | None, config_file: str | None, overrides: dict | None = None):
    from .config import GPTConfig, get_preset
    config = GPTConfig.load(config_file) if config_file else get_preset(preset).config
    return config.replace(**overrides) if overrides else config


@command("import-hf", "convert a Hugging Face GPT-2 / GPT-1 checkpoint (folder or hub id) into a gptn run")
def cmd_import_hf(sub):
    sub.add_argument("src", help="Hugging Face model folder (config.json + weights) or hub id")
    sub.add_argument("out", help="gptn run directory to write")

    def run(args):
        from .hf import import_hf
        path = import_hf(args.src, args.out)
        print(f"imported {args.src} -> {path}")
    return run


@command("export-hf", "write a gptn run as a Hugging Face folder (AutoModelForCausalLM loads it)")
def cmd_export_hf(sub):
    sub.add_argument("run", help="gptn run directory")
    sub.add_argument("out", help="folder to write (must be new or empty)")

    def run(args):
        from .hf import export_hf
        path = export_hf(args.run, args.out)
        print(f"exported {args.run} -> {path}")
    return run


# --- data ---------------------------------------------------------------------------------------

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

    def run(args):
        from .data import prepare
        m = prepare(args.sources, args.tokenizer, args.out, val_fraction=args.val_fraction, seed=args.seed,
                    text_field=args.text_field, dtype=args.dtype, workers=args.workers)
        print(f"prepared {args.out}: {m['documents']['train']:,} + {m['documents']['val']:,} documents, "
              f"{m['tokens']['train']:,} train + {m['tokens']['val']:,} val tokens ({m['dtype']}), "
              f"tokenizer {m['tokenizer']['kind']} with {m['tokenizer']['vocab_size']:,} tokens")
    return run


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
