"""The `gptn` command: each subcommand is a thin call into the library."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

from .config import GptnError
from .options import add_options, from_options

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
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


# --- model core ---------------------------------------------------------------------------------

@command("sizes", "every preset with its exact parameter count and training compute beside GPT-3's Table D.1")
def cmd_sizes(sub):
    sub.add_argument("--tokens", type=_positive_float, default=300e9, help="training tokens (default 300e9)")
    sub.add_argument("--json", action="store_true", help="print JSON instead of a table")

    def run(args):
        from .compute import preset_table
        from .config import DATA, LECTURE_SLIPS
        rows = preset_table(args.tokens)
        if args.json:
            print(json.dumps(rows, indent=2))
            return
        head = f"{'preset':<12} {'layers':>6} {'d_model':>7} {'heads':>5} {'d_head':>6} {'ctx':>5} " \
               f"{'batch':>6} {'paper':>5} {'lr':>8} {'params':>8} {'paper':>8} {'6ND FLOPs':>10} {'paper':>9} " \
               f"{'PF/s-days':>9} {'paper':>7} {'+attn FLOPs':>11}  norm"
        print(head)
        for r in rows:
            paper = lambda v, fmt: (fmt(v) if v else "-")  # noqa: E731
            mark = lambda key: "*" if key in r["paper_shape"] else ""  # noqa: E731
            print(f"{r['name']:<12} {r['n_layer']:>6} {str(r['d_model']) + mark('d_model'):>7} "
                  f"{str(r['n_head']) + mark('n_head'):>5} {r['d_head']:>6} "
                  f"{r['n_ctx']:>5} {_si(r['batch_tokens'] or 0):>6} {r['paper_batch'] or '-':>5} "
                  f"{r['learning_rate'] or 0:>8.2e} "
                  f"{_si(r['params']):>8} {paper(r['paper_params'], _si):>8} {r['flops_6nd']:>10.3g} "
                  f"{paper(r['paper_flops'], lambda v: f'{v:.3g}'):>9} {r['pf_days_6nd']:>9.3g} "
                  f"{paper(r['paper_pf_days'], lambda v: f'{v:.3g}'):>7} {r['flops_with_attention']:>11.3g}  "
                  + ("pre-LN + final LN" if r["final_layer_norm"] else "post-LN"))
        print(f"(compute for {args.tokens:.3g} training tokens; 'paper' = GPT-3 Table 2.1 for the batch, "
              "Table D.1 for parameters and compute; batch = sequences x 2048 tokens, which Table 2.1 rounds)")
        for r in rows:
            if r["paper_shape"]:
                print(f"* {r['name']}: {r['note']}")
        print("norm: post-LN is GPT-1's x = LN(x + sublayer(x)); pre-LN + final LN is GPT-2/3's "
              "x = x + sublayer(LN(x)) with one more LayerNorm after the last block")
        print("pretraining data:")
        for family, data in DATA.items():
            print(f"  {family.upper():<5} {data}")
        print("the lecture's own slips:")
        for slip in LECTURE_SLIPS:
            print(f"  - {slip}")
    return run


@command("compute", "plan a training run: parameters, FLOPs, PF/s-days, memory and time to train")
def cmd_compute(sub):
    sub.add_argument("--preset", default="gpt3-175b", help="model preset (see `gptn sizes`)")
    sub.add_argument("--config", help="a config JSON file instead of a preset")
    sub.add_argument("--tokens", type=_positive_float, default=300e9, help="training tokens")
    sub.add_argument("--gpus", type=_positive_int, default=1, help="number of accelerators")
    sub.add_argument("--peak", type=_positive_float, default=1e15, help="peak FLOP/s per accelerator (default 1e15)")
    sub.add_argument("--mfu", type=_positive_float, default=1.0, help="sustained fraction of the peak (default 1.0)")
    sub.add_argument("--micro-batch", type=_positive_int, default=1, help="sequences per accelerator per step (memory)")
    sub.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="the precision of the memory estimate (weights, gradients, activations)")
    sub.add_argument("--json", action="store_true", help="print JSON instead of text")

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
    sub.add_argument("--normalize", metavar="STEPS",
                     help="rewrite the text first and save the steps with the tokenizer, so fine-tuning, "
                          "prediction and generation apply them too: html (<br /> tags out), lower, punct "
                          "(Penn Treebank punctuation and contractions), or sst = all three (SST-2's text)")

    def run(args):
        from .data import prepare
        m = prepare(args.sources, args.tokenizer, args.out, val_fraction=args.val_fraction, seed=args.seed,
                    text_field=args.text_field, dtype=args.dtype, workers=args.workers, normalize=args.normalize)
        print(f"prepared {args.out}: {m['documents']['train']:,} + {m['documents']['val']:,} documents, "
              f"{m['tokens']['train']:,} train + {m['tokens']['val']:,} val tokens ({m['dtype']}), "
              f"tokenizer {m['tokenizer']['kind']} with {m['tokenizer']['vocab_size']:,} tokens"
              + (f", text normalised ({','.join(m['tokenizer']['normalize'])})" if m['tokenizer'].get('normalize') else ""))
    return run


# --- pretraining --------------------------------------------------------------------------------

def _parse_overrides(pairs: list[str]) -> dict:
    from .config import GPTConfig
    import dataclasses
    types = {f.name: f.type for f in dataclasses.fields(GPTConfig)}
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or key not in types:
            raise GptnError(f"--set {pair!r}: expected KEY=VALUE with KEY one of {sorted(types)}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value  # plain strings such as norm=post
    return out


@command("pretrain", "pretrain a GPT on a prepared corpus (resumes when --out holds a run); works under torchrun")
def cmd_pretrain(sub):
    from .pretrain import PretrainConfig
    sub.add_argument("corpus", help="a folder written by `gptn prepare`")
    sub.add_argument("--out", required=True, help="run directory (an existing run is resumed)")
    sub.add_argument("--init-from", metavar="SRC",
                     help="start a new run from the weights of SRC (a gptn run, a fine-tuned run or a folder "
                          "`gptn import-hf` wrote) with a fresh optimizer, schedule and loader: continued "
                          "(domain-adaptive) pretraining; the corpus must use SRC's tokenizer")
    sub.add_argument("--preset", help="model size (default mini; see `gptn sizes`)")
    sub.add_argument("--model-config", help="a GPTConfig JSON file instead of a preset")
    sub.add_argument("--set", action="append", metavar="KEY=VALUE", dest="overrides",
                     help="override a model field, e.g. --set dropout=0 --set n_ctx=128 (repeatable)")
    sub.add_argument("--arch", choices=["gpt", "bert"], help="gpt: decoder, next-token objective (default); "
                     "bert: bidirectional encoder, masked-LM objective (for the GPT-vs-BERT contrast)")
    add_options(sub, PretrainConfig)

    def run(args):
        from .pretrain import PretrainConfig, pretrain
        cfg = from_options(PretrainConfig, args, corpus=args.corpus, out=args.out, init_from=args.init_from,
                           preset=args.preset, model_config=args.model_config,
                           overrides={**_parse_overrides(args.overrides), **({"arch": args.arch} if args.arch else {})})
        s = pretrain(cfg)
        if int(os.environ.get("RANK", "0")) == 0 and s["steps"] == s["start_step"] == 0 and s["val"]:
            vocab = s["config"]["vocab_size"]
            print(f"{s['run']}: the untrained model (random weights, step 0): validation loss "
                  f"{s['val']['val_loss']:.4f}; a uniform guess over {vocab:,} tokens scores ln {vocab:,} = "
                  f"{math.log(vocab):.4f}")
        elif int(os.environ.get("RANK", "0")) == 0 and s["steps"] == s["start_step"]:
            print(f"{s['run']}: nothing to train, already at step {s['steps']}")
        elif int(os.environ.get("RANK", "0")) == 0:
            val = s["val"]
            print(f"trained {s['run']}: steps {s['start_step']} -> {s['steps']}, {s['params']:,} parameters, "
                  f"last loss {s['last_loss']:.4f}" + (f", validation loss {val['val_loss']:.4f} "
                  f"(perplexity {val['val_ppl']:.2f}, {val['val_bpb']:.3f} bits/byte)" if val else "")
                  + (f"; loss curve {s['loss_curve']}" if s.get("loss_curve") else ""))
    return run


@command("quickstart", "prepare an embedded corpus, pretrain a small GPT for a few minutes on CPU, then sample")
def cmd_quickstart(sub):
    sub.add_argument("--out", default="runs/quickstart", help="where to write (default runs/quickstart)")
    sub.add_argument("--minutes", type=_positive_float, default=4.0, help="training time budget (default 4)")
    sub.add_argument("--source", action="append", dest="sources",
                     help="corpus source instead of the embedded default (repeatable)")
    sub.add_argument("--prompt", help="prompt for the next-token probabilities (default \"for i in\" on the "
                                      "embedded corpus, \"After running I am\" on another)")
    sub.add_argument("--no-progress", action="store_true", help="no progress bar or per-step lines (evaluations are still printed)")

    def run(args):
        from .quickstart import quickstart
        quickstart(args.out, args.sources, args.minutes, prompt=args.prompt, progress=not args.no_progress)
    return run


# --- generation ---------------------------------------------------------------------------------

DTYPE_HELP = ("weights for decoding: fp32 (default), bf16, fp16 (CPU: fp16 weights, fp32 arithmetic, fbgemm), "
              "int8 (CPU: int8 weights per output channel, fbgemm), or auto (CPU: fp16; CUDA: bf16)")


def _load_run(run: str, device: str = "cpu", dtype: str = "fp32"):
    from .inference import load_for_inference
    return load_for_inference(run, device, dtype, say=lambda m: print(m, file=sys.stderr))


@command("next", "the most likely next tokens after a prompt, with their probabilities (a BERT run: the word "
                 "at [MASK])")
def cmd_next(sub):
    sub.add_argument("run", help="run directory")
    sub.add_argument("prompt", help="the text so far, e.g. \"After running I am\" (a BERT run: a text with one "
                                    "[MASK], e.g. \"the cat [MASK] on the mat\")")
    sub.add_argument("--top", type=int, default=5, help="how many tokens to show (default 5)")
    sub.add_argument("--words", help="comma-separated continuations to score as well, e.g. tired,hot,thirsty "
                     "(a word of several tokens: the product of its tokens' probabilities)")
    sub.add_argument("--json", action="store_true", help="print [{token, id, prob}, ...] (with --words: "
                     "{\"top\": [...], \"words\": [{word, tokens, prob}, ...]})")
    sub.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    sub.add_argument("--dtype", default="fp32", help=DTYPE_HELP)

    def run(args):
        from .generate import next_token_probs, word_probs
        if args.top < 1:
            raise GptnError(f"--top must be >= 1, got {args.top}")
        words = [w.strip() for w in (args.words or "").split(",") if w.strip()]
        if args.words is not None and not words:
            raise GptnError("--words: expected comma-separated words, e.g. --words tired,hot")
        model, tok = _load_run(args.run, args.device, args.dtype)
        if not model.config.causal:  # BERT: the masked word, read from both sides
            from .bert import fill_mask
            filled = fill_mask(model, tok, args.prompt, args.top, words)
            rows, named = filled["top"], filled["words"]
        else:
            rows = next_token_probs(model, tok, args.prompt, args.top)
            named = word_probs(model, tok, args.prompt, words) if words else []
        if args.json:
            print(json.dumps({"top": rows, "words": named} if words else rows, ensure_ascii=False))
            return
        print(f"after {args.prompt!r}:" if model.config.causal else f"at [MASK] in {args.prompt!r} (both sides read):")
        for r in rows:
            print(f"  {r['token']!r:<16} {_probability(r['prob']):>9}  {_bar(r['prob'])}")
        if named:
            print("named words: probability, rank in the vocabulary, share among the named words "
                  "(several tokens: the product of their probabilities)")
            for r in named:
                print(f"  {r['word']!r:<16} {_probability(r['prob']):>9}  rank {r['rank']:<7,} "
                      f"share {r['share']:6.1%}  {_bar(r['share'])}"
                      + (f"  ({r['tokens']} tokens)" if r["tokens"] > 1 else ""))
    return run


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
        if args.json:
            print(json.dumps(info, ensure_ascii=False))
        else:
            print("\n".join(format_model(info, args.run)))
    return run


@command("detect", "is a text machine-generated? GLTR's token ranks under a run's model, and a calibrated "
                   "probability (--fit HUMAN MACHINE trains the classifier)")
def cmd_detect(sub):
    sub.add_argument("run", help="run directory (the scoring model)")
    sub.add_argument("file", nargs="?", help="a text file (one document), a .jsonl of {\"text\"} (one per line) "
                                             "or a folder of .txt files")
    sub.add_argument("--text", help="the text itself instead of a file")
    sub.add_argument("--fit", nargs=2, metavar=("HUMAN", "MACHINE"),
                     help="fit the classifier on human and machine-generated documents (same formats as FILE) "
                          "and save it as RUN/detector.json (or --detector)")
    sub.add_argument("--detector", help="the classifier to use or write (default RUN/detector.json, else the default)")
    sub.add_argument("--tokens", action="store_true", help="also print every token with its rank bucket")
    sub.add_argument("--json", action="store_true", help="print JSON instead of text")
    sub.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")

    def run(args):
        from .detect import DETECTOR_FILE, Detector, bucket, detector_for, read_documents, token_stats
        if args.fit:
            if args.file or args.text:
                raise GptnError("--fit takes the HUMAN and MACHINE documents only")
            model, tok = _load_run(args.run, args.device, "fp32")
            rows = [[token_stats(model, tok, d).features() for d in read_documents(f)] for f in args.fit]
            detector = Detector.fit(*rows, fitted_on=f"{len(rows[0])} human ({args.fit[0]}), {len(rows[1])} "
                                                     f"machine ({args.fit[1]}) documents")
            out = Path(args.detector or Path(args.run) / DETECTOR_FILE)
            detector.save(out)
            train_acc = (sum(detector.probability(r) < 0.5 for r in rows[0]) +
                         sum(detector.probability(r) >= 0.5 for r in rows[1])) / (len(rows[0]) + len(rows[1]))
            print(f"fitted on {detector.fitted_on}: training accuracy {train_acc:.1%}; saved {out}")
            return
        if (args.file is None) == (args.text is None):
            raise GptnError("give either FILE or --text (or --fit HUMAN MACHINE)")
        docs = read_documents(args.file) if args.file else [args.text]
        detector = detector_for(args.run, args.detector)
        model, tok = _load_run(args.run, args.device, "fp32")
        for i, doc in enumerate(docs):
            stats = token_stats(model, tok, doc)
            feats = stats.features()
            p = detector.probability(feats)
            if args.json:
                record = {"document": i, "machine_probability": p, **feats, "tokens": len(stats.tokens)}
                if args.tokens:
                    record["per_token"] = [{"token": tok.decode([t]), "rank": r, "logprob": lp}
                                           for t, r, lp in zip(stats.tokens, stats.ranks, stats.logprobs)]
                print(json.dumps(record, ensure_ascii=False))
                continue
            print(f"document {i}: P(machine-generated) {p:.1%}  ({len(stats.tokens)} tokens: top-10 {feats['top10']:.0%}, "
                  f"top-100 {feats['top100']:.0%}, top-1000 {feats['top1000']:.0%}, rest {feats['rest']:.0%}; "
                  f"mean log-prob {feats['mean_logprob']:.2f}, mean entropy {feats['mean_entropy']:.2f})")
            if args.tokens:
                print("  " + " ".join(f"{tok.decode([t])!r}[{bucket(r)}]" for t, r in zip(stats.tokens, stats.ranks)))
        if not args.json:
            print(f"(detector: {detector.fitted_on})")
    return run


def _check_output(path: str, flag: str) -> None:
    """An output file the command will write at its end: refused now if it cannot be written."""
    p = Path(path)
    if p.is_dir():
        raise GptnError(f"{flag} {path} is a folder; give a file name")
    folder = p.parent
    if not folder.is_dir():
        raise GptnError(f"{flag} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise GptnError(f"{flag} {path}: cannot write there")


def _read_text_arg(path: str, what: str) -> str:
    """The UTF-8 text of a file named on the command line (- for standard input), or one line naming the problem."""
    try:
        if path == "-":
            return sys.stdin.buffer.read().decode("utf-8")
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GptnError(f"{what} {path}: cannot read it as UTF-8 text ({e})") from None


def _probability(p: float) -> str:
    """A percentage with two decimals, or scientific notation when that would print 0.00%."""
    return f"{p:.2%}" if p >= 5e-5 else f"{p:.2e}"


def _bar(fraction: float, width: int = 40) -> str:
    return "█" * round(fraction * width)  # no bar for what rounds to zero width


def _sampling_args(sub):
    from .sampling import SamplingConfig
    d = SamplingConfig()
    sub.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="tokens to generate per sample")
    sub.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    sub.add_argument("--top-k", type=int, default=d.top_k, help="sample among the k most likely tokens only")
    sub.add_argument("--top-p", type=float, default=d.top_p,
                     help="nucleus sampling: keep the smallest set of tokens with this mass")
    sub.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty, help="divide the logits of tokens already present (CTRL's penalty; 1 = off)")
    sub.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    sub.add_argument("--greedy", action="store_true", help="always take the most likely token")
    sub.add_argument("--seed", type=int, help="seed for reproducible sampling")


def _unescape(text: str) -> str:
    """The escapes a shell user types for a stop string (`--stop "\\n"`): \\n, \\t, \\r and \\\\."""
    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[m.group(1)], text)


def _sampling_from(args):
    from .sampling import SamplingConfig
    return SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                          stop=[_unescape(s) for s in args.stop],
                          greedy=args.greedy, seed=args.seed)


@command("generate", "sample text from a run (streams as tokens arrive; several prompts are batched)")
def cmd_generate(sub):
    sub.add_argument("run", help="run directory")
    sub.add_argument("--prompt", action="append", default=[],
                     help="prompt (repeatable; empty = start of a document)")
    sub.add_argument("--prompt-file", action="append", default=[],
                     help="a UTF-8 file whose whole text is a prompt (repeatable; - reads standard input)")
    sub.add_argument("--num-samples", type=_positive_int, default=1, help="samples per prompt")
    sub.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    sub.add_argument("--dtype", default="fp32", help=DTYPE_HELP)
    sub.add_argument("--no-stream", action="store_true", help="print each sample when it is complete")
    _sampling_args(sub)

    def run(args):
        from .generate import generate
        from .model import require_decoder
        sampling = _sampling_from(args)
        prompts = args.prompt + [_read_text_arg(f, "--prompt-file") for f in args.prompt_file] or [""]
        model, tok = _load_run(args.run, args.device, args.dtype)
        require_decoder(model, "generate text")  # before any output is streamed
        rows = len(prompts) * args.num_samples
        stream = warn = None
        if rows == 1 and not args.no_stream:
            print(prompts[0], end="", flush=True)
            mid_line = [bool(prompts[0]) and not prompts[0].endswith("\n")]

            def stream(_row, text):
                print(text, end="", flush=True)
                if text:
                    mid_line[0] = not text.endswith("\n")

            def warn(message):  # a notice starts on a line of its own, not inside the streamed text
                print(("\n" if mid_line[0] else "") + f"gptn: {message}", file=sys.stderr, flush=True)
                mid_line[0] = False
        results = generate(model, tok, prompts, sampling, args.num_samples, stream=stream, warn=warn)
        if stream is not None:
            print()
            return
        for p, samples in zip(prompts, results):
            for i, text in enumerate(samples):
                print(f"--- prompt {p!r}, sample {i + 1} ---")
                print(p + text)
    return run


@command("score", "per-token log-probabilities, log-likelihood, perplexity and bits per byte of a text")
def cmd_score(sub):
    sub.add_argument("run", help="run directory")
    sub.add_argument("file", nargs="?", help="a UTF-8 text file")
    sub.add_argument("--text", help="the text itself instead of a file")
    sub.add_argument("--stride", type=_positive_int, help="window step for texts longer than the context (default n_ctx/2)")
    sub.add_argument("--tokens", action="store_true", help="also print every token's log-probability")
    sub.add_argument("--json", action="store_true", help="print JSON instead of text")
    sub.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    sub.add_argument("--dtype", default="fp32", help=DTYPE_HELP)

    def run(args):
        from .scoring import score
        if (args.file is None) == (args.text is None):
            raise GptnError("give either FILE or --text")
        text = _read_text_arg(args.file, "FILE") if args.file is not None else args.text
        model, tok = _load_run(args.run, args.device, args.dtype)
        s = score(model, tok, text, stride=args.stride)
        summary = {"tokens": len(s.tokens), "bytes": s.n_bytes, "log_likelihood": s.total_logprob,
                   "perplexity": s.perplexity, "bits_per_byte": s.bits_per_byte}
        if args.json:
            if args.tokens:
                summary["per_token"] = [{"token": tok.decode([t]), "id": t, "logprob": lp}
                                        for t, lp in zip(s.tokens, s.logprobs)]
            print(json.dumps(summary, ensure_ascii=False))
            return
        if args.tokens:
            for t, lp in zip(s.tokens, s.logprobs):
                print(f"{tok.decode([t])!r:<20} {lp:9.4f}")
        print(f"tokens {summary['tokens']:,}  bytes {summary['bytes']:,}  log-likelihood {s.total_logprob:.2f} nats  "
              f"perplexity {s.perplexity:.3f}  bits/byte {s.bits_per_byte:.4f}")
    return run


# --- transfer learning ----------------------------------------------------------------------------

def _column_args(sub):
    sub.add_argument("--text-col", help="column with the text (premise, sentence A, context); "
                                        "GLUE, multiple-choice JSONL and HellaSwag layouts need no column flags")
    sub.add_argument("--text-b-col", help="column with the second text (hypothesis, sentence B)")
    sub.add_argument("--label-col", help="column with the label (class, score or right choice's index)")
    sub.add_argument("--choices-col", help="JSONL field with the list of candidate answers")


def _columns_from(args):
    from .tasks import Columns
    return Columns(args.text_col, args.text_b_col, args.label_col, args.choices_col)


@command("finetune", "fine-tune a pretrained run on a labeled task (GPT-1: start/delim/extract tokens, "
                     "a linear head, L3 = L2 + λ·L1)")
def cmd_finetune(sub):
    from .finetune import FinetuneConfig
    from .task_types import TASK_TYPES
    sub.add_argument("run", help="pretrained run directory (or an imported model folder)")
    sub.add_argument("--task", choices=list(TASK_TYPES), help="task type (default: recognised from the file's layout)")
    sub.add_argument("--train", required=True, help="training examples (TSV, CSV, JSONL, HellaSwag .txt)")
    sub.add_argument("--val", help="validation examples; the best checkpoint by its metric is kept")
    sub.add_argument("--out", required=True, help="run directory for the fine-tuned model")
    _column_args(sub)
    add_options(sub, FinetuneConfig)

    def run(args):
        from .finetune import finetune
        cfg = from_options(FinetuneConfig, args, run=args.run, out=args.out, train=args.train, val=args.val,
                           task=args.task, columns=_columns_from(args))
        result = finetune(cfg)
        if int(os.environ.get("RANK", "0")) != 0:
            return
        best = result["best"]
        print(f"{result['task']}: {result['train_examples']} examples, {result['steps']} steps, "
              f"{result['seconds']:.0f} s; best {result['metric']} {best['value']:.4f} at epoch {best['epoch']} "
              f"(step {best['step']}); saved to {result['checkpoint']}")
    return run


@command("predict", "label new inputs with a fine-tuned run (from a file or the command line)")
def cmd_predict(sub):
    from .finetune import LONG_INPUTS, LONG_INPUTS_HELP
    sub.add_argument("run", help="fine-tuned run directory")
    sub.add_argument("file", nargs="?", help="examples to label (same layouts as finetune; labels optional, "
                                             "and scored when present)")
    sub.add_argument("--text", help="the text (or premise / sentence A / context)")
    sub.add_argument("--text-b", help="the second text, for entailment and similarity")
    sub.add_argument("--choice", action="append", default=[], help="a candidate answer (repeatable), multiple choice")
    _column_args(sub)
    sub.add_argument("--json", action="store_true", help="print one JSON object per example")
    sub.add_argument("--show-inputs", action="store_true",
                     help="also print the token sequences built for each example (start, delimiter and extract "
                          "tokens named; both orders for similarity; one sequence per choice or window)")
    sub.add_argument("--long-inputs", choices=LONG_INPUTS,
                     help="inputs longer than the context (default: what the run was fine-tuned with): "
                          + LONG_INPUTS_HELP)
    sub.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")

    def run(args):
        from .finetune import compute_metrics, load_task_model, predict
        from .tasks import Example, read_task_file
        if (args.file is None) == (args.text is None):
            raise GptnError("give either FILE or --text")
        model, tok = load_task_model(args.run, args.device)
        spec = model.spec
        spec.long_inputs = args.long_inputs or spec.long_inputs
        if args.file:
            data = read_task_file(args.file, spec.task, _columns_from(args), spec.regression, require_labels=False)
            examples = data.examples
        else:
            pair = spec.kind.texts == 2
            if pair != (args.text_b is not None):
                raise GptnError(f"a {spec.task} model needs " + ("--text and --text-b" if pair else "--text only"))
            if spec.kind.choices != bool(args.choice):
                raise GptnError("--choice is for multiple-choice models, which need two or more"
                                if args.choice else "a multiple-choice model needs two or more --choice")
            if args.choice and len(args.choice) < 2:
                raise GptnError("a multiple-choice model needs two or more --choice")
            examples = [Example((args.text,) + ((args.text_b,) if pair else ()), None, tuple(args.choice))]
        records = predict(model, tok, examples)
        if args.show_inputs:
            from .describe import describe_inputs
            for x, r in zip(examples, records):
                r["inputs"] = describe_inputs(spec, x, tok, model.gpt.config)
        for r in records:
            if args.show_inputs and not args.json:
                print("\n".join("  " + line for line in r["inputs"]))
            if args.json:
                print(json.dumps(r, ensure_ascii=False))
            elif spec.regression:
                print(f"{r['prediction']:.3f}\t" + " | ".join(r["input"]))
            elif spec.kind.choices:
                print(f"{r['prediction']}\t{max(r['probs']):.1%}\t{r['choices'][r['prediction']]}")
            else:
                print(f"{r['prediction']}\t{r['probs'][r['prediction']]:.1%}\t" + " | ".join(r["input"]))
        labeled = [r for r in records if "label" in r]
        if labeled and len(labeled) == len(records):
            metrics = compute_metrics(spec, [r["prediction"] for r in records], [r["label"] for r in records])
            summary = f"{len(records)} labeled examples: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            print(summary, file=sys.stderr if args.json else sys.stdout)
    return run


# --- in-context learning --------------------------------------------------------------------------

def _shots(text: str) -> list[int]:
    try:
        shots = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shots takes comma-separated integers like 0,1,8, not {text!r}") from None
    if not shots or min(shots) < 0:
        raise argparse.ArgumentTypeError(f"--shots needs one or more integers >= 0, got {text!r}")
    return shots


@command("fewshot", "zero-, one- and few-shot evaluation (GPT-3 in-context learning, no gradient update)")
def cmd_fewshot(sub):
    from .fewshot import BUILTIN_TASKS, NORMALIZATIONS
    sub.add_argument("run", help="run directory")
    sub.add_argument("--task", required=True, help=f"a built-in task ({', '.join(BUILTIN_TASKS)}) or a task file "
                                                   "(.json / .yaml)")
    sub.add_argument("--shots", type=_shots, default=[0, 1, 8], help="values of K, e.g. 0,1,8 (default)")
    sub.add_argument("--limit", type=int, help="evaluate a seeded random subset of this many examples")
    sub.add_argument("--normalization", choices=NORMALIZATIONS, help="multiple choice: how answers' "
                     "log-likelihoods are compared (default: the task's)")
    sub.add_argument("--seed", type=int, default=1234, help="seed for drawing demonstrations")
    sub.add_argument("--batch-size", type=_positive_int, default=32, help="requests scored per forward pass")
    sub.add_argument("--data-dir", help="folder with the built-in tasks' data (default $GPTN_DATA_DIR or a "
                                        "shared/data folder above the current one)")
    sub.add_argument("--records", help="write every example's prompt, scores and answer here (JSONL)")
    sub.add_argument("--plot", help="write a PNG of the metric against K here")
    sub.add_argument("--json", action="store_true", help="print one JSON object per K")
    sub.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    sub.add_argument("--dtype", default="fp32", help=DTYPE_HELP)

    def run(args):
        from .fewshot import evaluate_fewshot, load_task, plot_metric_vs_shots
        if args.limit is not None and args.limit < 1:
            raise GptnError(f"--limit must be >= 1, got {args.limit}")
        for flag, path in (("--records", args.records), ("--plot", args.plot)):
            if path:
                _check_output(path, flag)  # before the evaluation, not after it
        task = load_task(args.task, args.data_dir)
        model, tok = _load_run(args.run, args.device, args.dtype)
        results = []
        if not args.json:
            print(f"{task.name} ({task.kind}); chance {task.chance if task.chance is not None else 'n/a'}")
            print(f"{'K':>3}  {'metric':<28} {'value':>8}  {'± stderr':>9}  {'examples':>8}  {'demos used':>10}  "
                  f"{'truncated':>9}")
        for k in args.shots:
            r = evaluate_fewshot(model, tok, task, k, limit=args.limit, seed=args.seed, batch_size=args.batch_size,
                                 normalization=args.normalization)
            results.append(r)
            if args.json:
                print(json.dumps({"k": k, "metric": r.metric, "value": r.value, "stderr": r.stderr,
                                  "examples": r.examples, "demos_used": r.demos_used, "truncated": r.truncated,
                                  "metrics": r.metrics, "chance": task.chance}))
            else:
                print(f"{k:>3}  {r.metric:<28} {r.value:>8.4f}  {r.stderr:>9.4f}  {r.examples:>8}  {r.demos_used:>10.2f}  "
                      f"{r.truncated:>9}")
        short = [r for r in results if r.demos_used < r.k]
        for r in short:
            print(f"gptn fewshot: K={r.k}: on average only {r.demos_used:.2f} of {r.k} demonstrations fit the context "
                  f"window of {model.config.n_ctx} tokens; this row is not {r.k}-shot", file=sys.stderr)
        if any(r.truncated for r in results):
            print(f"gptn fewshot: 'truncated' counts examples whose prompt (or answer) lost its start to fit the "
                  f"context window of {model.config.n_ctx} tokens, as lm-evaluation-harness does", file=sys.stderr)
        if args.records:
            with open(args.records, "w") as f:
                for r in results:
                    for rec in r.records:
                        f.write(json.dumps({"k": r.k, **rec}, ensure_ascii=False) + "\n")
        if args.plot:
            path = plot_metric_vs_shots(results, task, Path(args.plot))
            if not args.json:
                print(f"plot: {path}")
    return run


@command("lm-eval", "run lm-evaluation-harness's own command line on a run (the `lm-eval` extra): "
                    "gptn lm-eval RUN --tasks T --num_fewshot K [any other lm_eval flag]")
def cmd_lm_eval(sub):
    sub.add_argument("run", help="run directory")
    sub.add_argument("harness_args", nargs=argparse.REMAINDER, metavar="...",
                     help="passed to lm_eval as given (--tasks, --num_fewshot, --limit, --include_path, "
                          "--output_path, --batch_size, --device, ...); --model_args are added to pretrained=RUN")

    def run(args):
        try:
            from lm_eval.__main__ import cli_evaluate

            from .integrations import lm_eval as _  # noqa: F401  # registers the model "gptn"
        except ImportError:
            raise GptnError("this needs lm-evaluation-harness: pip install 'gptn[lm-eval]'") from None
        rest = list(args.harness_args)
        extra = ""
        for flag in ("--model_args", "--model-args"):
            while flag in rest:
                i = rest.index(flag)
                if i + 1 == len(rest):
                    raise GptnError(f"{flag} needs a value, e.g. {flag} batch_size=16")
                extra += "," + rest.pop(i + 1)
                rest.pop(i)
        if any(a == "--model" or a.startswith("--model=") for a in rest):
            raise GptnError("gptn lm-eval always evaluates the gptn run it is given; drop --model")
        if not Path(args.run).is_dir():
            raise GptnError(f"run {args.run} does not exist")
        if not any(a == "--device" or a.startswith("--device=") for a in rest):  # the harness assumes CUDA
            import torch
            rest += ["--device", "cuda" if torch.cuda.is_available() else "cpu"]
        argv, sys.argv = sys.argv, ["lm-eval", "--model", "gptn", "--model_args", f"pretrained={args.run}{extra}", *rest]
        try:
            cli_evaluate()
        finally:
            sys.argv = argv
    return run


# --- serving ------------------------------------------------------------------------------------

@command("serve", "serve a run over HTTP with the OpenAI completions API (the `serve` extra)")
def cmd_serve(sub):
    from .engine import MAX_BATCH, MAX_QUEUE, PREFILL_CHUNK
    from .protocol import KEEP_ALIVE_SECONDS, MAX_CONNECTIONS, REQUEST_SECONDS
    sub.add_argument("run", help="run directory")
    sub.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    sub.add_argument("--port", type=int, default=8000, help="port to listen on")
    sub.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every path but /health "
                     "(the API docs included)")
    sub.add_argument("--model-name", help="the model id clients ask for (default: the run folder's name)")
    sub.add_argument("--max-batch", type=int, default=MAX_BATCH,
                     help=f"most rows decoded together, and most completions (prompts x n) in one request (default {MAX_BATCH})")
    sub.add_argument("--max-body", type=int, help="largest request body in bytes, refused with 413 before "
                     "parsing (default 1 KiB per context token, at least 1 MiB)")
    sub.add_argument("--max-queue", type=int, default=MAX_QUEUE,
                     help=f"most requests waiting to start; more get 429 (default {MAX_QUEUE})")
    sub.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK,
                     help="most prompt tokens prefilled per step, so a long prompt does not stall running "
                     f"streams (default {PREFILL_CHUNK})")
    sub.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    sub.add_argument("--dtype", default="fp32", help=DTYPE_HELP)
    sub.add_argument("--request-timeout", type=float, default=REQUEST_SECONDS, metavar="SECONDS",
                     help=f"close a connection whose request (headers and body) has not fully arrived this long "
                     f"after it began (default {REQUEST_SECONDS:g}); idle keep-alive connections close after "
                     f"{KEEP_ALIVE_SECONDS:g} s")
    sub.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                     help=f"open connections beyond which new ones get 503 (default {MAX_CONNECTIONS})")

    def run(args):
        from .serve import serve
        if not 0 < args.port < 65536:
            raise GptnError(f"--port must be in 1..65535, got {args.port}")
        if args.max_body is not None and args.max_body < 1:
            raise GptnError(f"--max-body must be >= 1, got {args.max_body}")
        serve(args.run, host=args.host, port=args.port, api_key=args.api_key, model_name=args.model_name,
              max_batch=args.max_batch, device=args.device, dtype=args.dtype, max_body=args.max_body,
              max_queue=args.max_queue, prefill_chunk=args.prefill_chunk,
              request_seconds=args.request_timeout, max_connections=args.max_connections)
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
    except OSError as e:  # the filesystem or the network said no: unwritable, full, a file where a folder goes
        print(f"gptn {args.command}: error: {_os_error(e)}", file=sys.stderr)
        return 2
    return 0


def _os_error(e: OSError) -> str:
    import errno
    import shutil
    where = f"{e.filename}: " if e.filename else ""
    text = f"{where}{e.strerror or e}"
    if e.errno == errno.ENOSPC and e.filename:
        folder = next((p for p in Path(os.path.abspath(e.filename)).parents if p.exists()), Path("/"))
        text += f" ({shutil.disk_usage(folder).free / 2**20:.0f} MiB free on that disk; the previous checkpoint, if any, is intact)"
    return text


if __name__ == "__main__":
    sys.exit(main())
