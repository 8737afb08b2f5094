"""Decode speed of the `gpt2` (124M) config on CPU, greedy: gptn at fp32 / bf16 / fp16 / int8 beside Hugging Face
`generate` (fp32), CTranslate2 (fp32, int8) and llama.cpp (F16, Q8_0: the CPU engines people pick), all in one run.

Prompt 16 tokens, 256 new tokens, batch 1 and batch 8, the same random weights everywhere (exported with
`gptn export-hf`, converted by CTranslate2's own converter; `gptn export-gguf` for llama.cpp, run through
llama-cpp-python at batch 1 only: its Python API decodes one sequence); gptn as `gptn generate --dtype D` runs it
(gptn.inference.prepare_for_inference). The batch-1 bandwidth limit of each dtype is the copy bandwidth
measured in this run over the weight bytes read per token: a bound only where the last-level cache is small
beside the weights (a CPU whose L3 holds much of them, like the AMX Xeon's 300 MiB, passes it). Also: a
1 x 1024 prefill (last-position logits) at each dtype beside Hugging Face fp32 and bf16.

Each engine runs in its own worker process (multiprocessing, spawn), and the runs alternate between
engines rep by rep, the best of REPS kept: a CTranslate2 Generator alive in the same process slowed
gptn's decoding by 25-35% here (its idle thread pool doubled the futex calls of torch's), and
alternation spreads this machine's slow and fast phases over every engine alike.

Quality, on a model trained in this run (a 4 x 256 GPT, `bpe:8192`, --quality-minutes of pretraining on
the first Gutenberg books; or --quality-run RUN --quality-corpus CORPUS): validation perplexity and
greedy-token agreement of bf16 / fp16 / int8 against fp32, and HellaSwag zero-shot accuracy on the same items;
llama.cpp's validation perplexity at F16 and Q8_0 on the same windows, from the same model exported to GGUF.
On a CPU without native bf16, bf16 is judged a second time with its prompt path computing what it computes on a
CPU with it (emulated), since that path rounds activations too.

Targets (issues 22, 39): int8 >= 1.0x CTranslate2 int8 and fp32 >= 1.1x CTranslate2 fp32 at batch 1 and 8;
bf16 >= 1.7x fp32 at batch 1 (fp16, the other 2-byte path, reported beside it); fp32 >= 1.25x / 1.5x Hugging Face;
prefill no slower than Hugging Face's; int8 >= 1.0x llama.cpp Q8_0 and fp16 >= 1.0x llama.cpp F16 at batch 1.

Results go to results/generate-KIND.json, one file per CPU kind (common.cpu_kind: intel-amx, amd-avx512bf16,
amd-avx2): each kind's speed paths are chosen by what measures faster there, and its figures are its own.

    python benchmarks/generate.py [--quality-minutes 6 | --quality-run RUN --quality-corpus CORPUS] [--dtypes fp32,bf16,fp16,int8]
"""

import argparse
import copy
import math
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import SHARED, cpu_kind, machine, table, write_results  # noqa: E402

from gptn.checkpoint import save_checkpoint  # noqa: E402
from gptn.config import get_preset  # noqa: E402
from gptn.generate import generate_ids  # noqa: E402
from gptn.sampling import SamplingConfig  # noqa: E402
from gptn.gguf_export import export_gguf  # noqa: E402
from gptn.hf import export_hf  # noqa: E402
from gptn.inference import prepare_for_inference  # noqa: E402
from gptn.runtime import native_bf16  # noqa: E402
from gptn.model import GPT  # noqa: E402
from gptn.tokenizer import load_tokenizer  # noqa: E402

PROMPT, NEW, REPS = 16, 256, 5
GGUF_TYPES = {"F16": "f16", "Q8_0": "q8_0"}  # llama.cpp's name -> export-gguf --type


def copy_bandwidth(nbytes=512 * 2**20, reps=10) -> float:
    """Bytes moved per second (read + write) by a large tensor copy."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def convert_ct2(hf_folder: Path, work: Path):
    """CTranslate2's own converter on the exported folder, at fp32 and int8 (in the main process: it runs
    torch, which the CTranslate2 worker then never touches)."""
    from ctranslate2.converters import TransformersConverter
    for ct in ("float32", "int8"):
        TransformersConverter(str(hf_folder)).convert(str(work / f"ct2-{ct}"), quantization=ct)


def engine(kind: str, work: Path, dtypes: list[str]) -> dict:
    """name -> (decode(prompt ids, prompt tokens) -> new ids, prefill(ids (1, T)) or None), for one worker."""
    sampling = SamplingConfig(max_new_tokens=NEW, greedy=True)
    if kind != "ct2":
        torch.set_num_threads(2)
    if kind == "gptn":
        from gptn.checkpoint import load_model
        models = {d: prepare_for_inference(load_model(work / "run")[0], d) for d in dtypes}

        def prefill(m):
            return lambda ids: m(ids, last_only=True)
        return {f"gptn {d}": (lambda ids, toks, m=m: generate_ids(m, ids, sampling), prefill(m)) for d, m in models.items()}
    if kind == "hf":
        import transformers
        hf = transformers.AutoModelForCausalLM.from_pretrained(work / "hf").eval()
        hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)

        def decode(ids, toks):
            ids = torch.tensor(ids)
            return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW,
                               min_new_tokens=NEW, use_cache=True, pad_token_id=0)[:, PROMPT:].tolist()
        return {"HF fp32": (decode, lambda ids: hf(ids, logits_to_keep=1)),
                "HF bf16": (None, lambda ids: hf_bf16(ids, logits_to_keep=1))}
    if kind == "llama":
        return llama_engine(work)
    import ctranslate2
    generators = {ct: ctranslate2.Generator(str(work / f"ct2-{ct}"), device="cpu", compute_type=ct, intra_threads=2)
                  for ct in ("float32", "int8")}

    def ct2_decode(generator):
        def decode(ids, toks):
            results = generator.generate_batch(toks, max_length=NEW, min_length=NEW, sampling_topk=1,
                                               include_prompt_in_result=False)
            return [r.sequences_ids[0] for r in results]
        return decode
    return {"CTranslate2 fp32": (ct2_decode(generators["float32"]), None),
            "CTranslate2 int8": (ct2_decode(generators["int8"]), None)}


def llama_engine(work: Path) -> dict:
    """llama.cpp at F16 and Q8_0 through llama-cpp-python, 2 threads, greedy; batch 1 (its Python API
    decodes one sequence: a batch is refused rather than run row by row)."""
    import llama_cpp
    fns = {}
    for name in GGUF_TYPES:
        llm = llama_cpp.Llama(model_path=str(work / f"model-{name}.gguf"), n_ctx=1024, n_batch=1024, n_threads=2,
                              n_threads_batch=2, verbose=False)

        def decode(ids, toks, llm=llm):
            assert len(ids) == 1, "llama-cpp-python decodes one sequence"
            out = []
            for token in llm.generate(ids[0], top_k=1, temp=0.0, reset=True):
                out.append(token)
                if len(out) == NEW:
                    break
            return [out]

        def prefill(ids, llm=llm):
            llm.reset()
            llm.eval(ids[0].tolist())
        fns[f"llama.cpp {name}"] = (decode, prefill)
    return fns


def llama_perplexity(run: str, windows) -> dict:
    """llama.cpp's validation perplexity of `run` exported to GGUF, on the windows gptn's dtypes are judged on."""
    import llama_cpp
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kind in GGUF_TYPES.items():
            path = export_gguf(run, Path(tmp) / f"{name}.gguf", kind)
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=windows[0][0].shape[1], logits_all=True, n_threads=2,
                                  verbose=False)
            nll = []
            for x, y in windows:
                for row, target in zip(x.tolist(), y.tolist()):
                    llm.reset()
                    llm.eval(row)
                    logits = torch.tensor(llm.scores[:len(row)], dtype=torch.float64)
                    nll.append(torch.nn.functional.cross_entropy(logits, torch.tensor(target)).item())
            out[f"llama.cpp {name}"] = {"val_ppl": math.exp(sum(nll) / len(nll))}
    return out


def worker(conn, kind: str, work: Path, dtypes: list[str]):
    """Serve (decode | prefill, name, args) requests with (seconds, output) until None."""
    fns = engine(kind, work, dtypes)
    conn.send({name: (d is not None, p is not None) for name, (d, p) in fns.items()})
    with torch.no_grad():
        while (request := conn.recv()) is not None:
            what, name, args = request
            decode, prefill = fns[name]
            if what == "decode":
                conn.send(timed(lambda: decode(*args)))
            else:
                conn.send((timed(lambda: prefill(args))[0], None))


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of positions where two greedy outputs agree, up to the first difference of each row
    (after one token differs the rows continue from different text)."""
    same = total = 0
    for x, y in zip(a, b):
        n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), len(x))
        same, total = same + n, total + len(x)
    return same / total


def train_quality_model(work: Path, minutes: float) -> tuple[str, str]:
    """A small GPT pretrained here on the first Gutenberg books, so that bf16 / int8 are judged on
    weights that mean something (random weights give flat distributions that hide rounding)."""
    from gptn.data import prepare
    from gptn.pretrain import PretrainConfig, pretrain
    prepare([str(SHARED / "gutenberg" / "books-00.jsonl")], "bpe:8192", work / "books-corpus", max_docs=40,
            val_fraction=0.1, progress=False)
    pretrain(PretrainConfig(corpus=str(work / "books-corpus"), out=str(work / "books-run"), preset="mini",
                            overrides={"n_layer": 4, "n_head": 4, "d_model": 256, "n_ctx": 128, "dropout": 0.0,
                                       "bias": False},
                            optimizer="muon", batch_tokens=2048, steps=100_000, max_seconds=60 * minutes,
                            eval_interval=100_000, checkpoint_interval=100_000, progress=False))
    return str(work / "books-run"), str(work / "books-corpus")


BF16_NATIVE_EMULATED = "bf16, native-bf16 CPU (emulated)"


def emulate_native_bf16_prompts(model: torch.nn.Module) -> None:
    """On a CPU without native bf16: give bf16's prompt path what oneDNN computes there on a CPU with it
    (bf16 inputs and weights, fp32 sums, a bf16 result), so that one run judges both kinds of CPU."""
    from gptn.inference import _Bf16Linear
    layers = [m.forward for m in model.modules() if isinstance(m, torch.nn.Linear)] + [model.inference_head]
    for f in layers:
        if isinstance(f, _Bf16Linear):
            w = f.weight.detach().bfloat16().float()
            b = None if f.bias is None else f.bias.detach().bfloat16().float()
            f.prompt_path = lambda x, w=w, b=b: torch.nn.functional.linear(x.bfloat16().float(), w, b).bfloat16()


def quality(run: str, corpus: str, dtypes: list[str]) -> dict:
    """Perplexity, greedy agreement and HellaSwag zero-shot of each dtype against fp32, on a trained model."""
    from gptn.checkpoint import load_model
    from gptn.data import BatchLoader, Corpus
    from gptn.fewshot import evaluate_fewshot, load_task
    base, tok = load_model(run)
    c = Corpus(corpus)
    windows = list(BatchLoader(c, "val", base.config.n_ctx, 16).eval_batches(25, 16))
    prompts = [x[i, :16].tolist() for x, _ in windows for i in range(8)]  # 200: one early near-tie flip costs a row
    task = load_task("hellaswag", SHARED)
    variants = [(d, d) for d in dtypes]
    if "bf16" in dtypes and not native_bf16():
        variants.append((BF16_NATIVE_EMULATED, "bf16"))
    out, ref = {}, None
    for name, dtype in variants:
        model = prepare_for_inference(copy.deepcopy(base), dtype)
        if name == BF16_NATIVE_EMULATED:
            emulate_native_bf16_prompts(model)
        with torch.no_grad():
            logits = [model(x).float() for x, _ in windows]
        nll = sum(torch.nn.functional.cross_entropy(lg.flatten(0, 1), y.flatten()).item()
                  for lg, (_, y) in zip(logits, windows)) / len(windows)
        argmax = torch.cat([lg.argmax(-1).flatten() for lg in logits])
        greedy = generate_ids(model, prompts, SamplingConfig(max_new_tokens=32, greedy=True))
        hs = evaluate_fewshot(model, tok, task, 0, limit=1000)
        out[name] = {"val_ppl": math.exp(nll), "hellaswag_acc": hs.value, "hellaswag_stderr": hs.stderr,
                     "hellaswag_items": hs.examples}
        if ref is None:
            ref = out[name] | {"greedy": greedy, "argmax": argmax}
        out[name]["ppl_vs_fp32"] = out[name]["val_ppl"] / ref["val_ppl"] - 1
        # Free-running: each row's share of tokens before its first difference (strict: one near-tie
        # flipped ends the row). Teacher-forced: the most likely next token at every validation position.
        out[name]["greedy_agreement_vs_fp32"] = agreement(greedy, ref["greedy"])
        out[name]["argmax_agreement_vs_fp32"] = (argmax == ref["argmax"]).float().mean().item()
        print(f"quality {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in out[name].items()), flush=True)
    for name, r in llama_perplexity(run, windows).items():
        out[name] = {**r, "ppl_vs_fp32": r["val_ppl"] / ref["val_ppl"] - 1}
        print(f"quality {name}: val_ppl {r['val_ppl']:.4f}, vs gptn fp32 {out[name]['ppl_vs_fp32']:+.4f}", flush=True)
    return {"run": run, "corpus": corpus, "val_windows": 25 * 16, "greedy_prompts": len(prompts), **out}


class Workers:
    """One worker process per engine; `run` sends a request to the worker that holds `name`."""

    def __init__(self, work: Path, dtypes: list[str]):
        ctx = mp.get_context("spawn")
        self.procs, self.conns, self.has = [], {}, {}
        for kind in ("gptn", "hf", "ct2", "llama"):
            here, there = ctx.Pipe()
            proc = ctx.Process(target=worker, args=(there, kind, work, dtypes), daemon=True)
            proc.start()
            self.procs.append((proc, here))
            for name, has in here.recv().items():
                self.conns[name], self.has[name] = here, has

    def run(self, what: str, name: str, args):
        self.conns[name].send((what, name, args))
        return self.conns[name].recv()

    def close(self):
        for proc, conn in self.procs:
            conn.send(None)
            proc.join()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="fp32,bf16,fp16,int8")
    ap.add_argument("--quality-minutes", type=float, default=6.0, help="pretraining of the quality model (0: none)")
    ap.add_argument("--quality-run")
    ap.add_argument("--quality-corpus")
    ap.add_argument("--reps", type=int, default=REPS, help="alternating runs of each engine, the best kept")
    args = ap.parse_args()
    dtypes = args.dtypes.split(",")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    config = get_preset("gpt2").config.replace(dropout=0.0)
    tok = load_tokenizer(SHARED / "gpt2-bpe")  # CTranslate2's converter needs a vocabulary
    torch.manual_seed(0)
    base = GPT(config).eval()
    work = Path(tempfile.mkdtemp())
    quality_res = None
    if not args.quality_run and args.quality_minutes > 0:
        args.quality_run, args.quality_corpus = train_quality_model(work, args.quality_minutes)
    if args.quality_run:
        quality_res = quality(args.quality_run, args.quality_corpus, dtypes)
    save_checkpoint(work / "run", config, base.state_dict(), tokenizer=tok)
    export_hf(work / "run", work / "hf", say=lambda m: None)
    convert_ct2(work / "hf", work)
    for name, kind in GGUF_TYPES.items():
        export_gguf(work / "run", work / f"model-{name}.gguf", kind)
    n_weights = sum(p.numel() for n, p in base.named_parameters() if n != "wpe.weight")
    del base
    bandwidth = copy_bandwidth()
    workers = Workers(work, dtypes)
    decoders = [n for n, (decodes, _) in workers.has.items() if decodes]
    prefillers = [n for n, (_, prefills) in workers.has.items() if prefills]
    bytes_per_weight = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}
    g = torch.Generator().manual_seed(1)
    id_to_token = {i: t for t, i in {**tok.vocab, **tok.special_tokens}.items()}
    rows, res = [], {}
    for batch in (1, 8):
        ids = torch.randint(0, config.vocab_size, (batch, PROMPT), generator=g).tolist()
        request = (ids, [[id_to_token[i] for i in row] for row in ids])
        engines = [n for n in decoders if batch == 1 or not n.startswith("llama.cpp")]
        for name in engines:  # warm-up: first-call allocations and kernel choices
            workers.run("decode", name, request)
        seconds, outputs = {n: [] for n in engines}, {}
        for _ in range(args.reps):
            for name in engines:
                t, outputs[name] = workers.run("decode", name, request)
                seconds[name].append(t)
        ref = outputs.get("gptn fp32", outputs["HF fp32"])
        res[f"batch{batch}"] = {name: {"tokens_per_s": batch * NEW / min(ts),
                                       "tokens_per_s_each_run": [batch * NEW / t for t in ts],
                                       "agreement_vs_fp32": agreement(outputs[name], ref)}
                                for name, ts in seconds.items()}
        for name, r in res[f"batch{batch}"].items():
            rows.append((f"batch {batch}", name, f"{r['tokens_per_s']:.1f}", f"{r['agreement_vs_fp32']:.3f}"))
    long = torch.randint(0, config.vocab_size, (1, 1024), generator=g)
    prefill = {n: [] for n in prefillers}
    for _ in range(max(3, args.reps)):
        for name in prefillers:
            # Not repeated past a minute: HF bf16 on a CPU without native bf16 (emulated) took 150 s a run here.
            if not prefill[name] or min(prefill[name]) < 60:
                prefill[name].append(workers.run("prefill", name, long)[0])
    prefill = {n: min(ts) for n, ts in prefill.items()}
    workers.close()
    ratios = {}
    for b in (1, 8):
        r = {k: v["tokens_per_s"] for k, v in res[f"batch{b}"].items()}
        ratios.update({f"ratio_int8_vs_ct2_batch{b}": r.get("gptn int8", 0) / r["CTranslate2 int8"],
                       f"ratio_fp32_vs_ct2_batch{b}": r.get("gptn fp32", 0) / r["CTranslate2 fp32"],
                       f"ratio_batch{b}": r.get("gptn fp32", 0) / r["HF fp32"]})
    r1 = {k: v["tokens_per_s"] for k, v in res["batch1"].items()}
    ratios.update({"ratio_int8_vs_llamacpp_q8_batch1": r1.get("gptn int8", 0) / r1["llama.cpp Q8_0"],
                   "ratio_fp16_vs_llamacpp_f16_batch1": r1.get("gptn fp16", 0) / r1["llama.cpp F16"]})
    for half in ("bf16", "fp16"):
        if f"gptn {half}" in r1 and "gptn fp32" in r1:
            ratios[f"ratio_{half}_vs_fp32_batch1"] = r1[f"gptn {half}"] / r1["gptn fp32"]
    limits = {d: bandwidth / (n_weights * bytes_per_weight[d]) for d in dtypes}
    res.update(ratios)
    res.update({
        "bandwidth_bytes_per_s": bandwidth, "weights_per_token": n_weights,
        "bandwidth_limit_tokens_per_s_batch1": limits,
        "fraction_of_bandwidth_limit_batch1": {d: r1[f"gptn {d}"] / limits[d] for d in dtypes},
        "prefill_1x1024_seconds": {d: prefill[f"gptn {d}"] for d in dtypes},
        "hf_prefill_1x1024_seconds": prefill["HF fp32"], "hf_bf16_prefill_1x1024_seconds": prefill["HF bf16"],
        "llamacpp_prefill_1x1024_seconds": {n: prefill[f"llama.cpp {n}"] for n in GGUF_TYPES},
        "prompt_tokens": PROMPT, "new_tokens": NEW, "reps": args.reps,
        "targets": {"ratio_int8_vs_ct2_batch1": 1.0, "ratio_int8_vs_ct2_batch8": 1.0, "ratio_fp32_vs_ct2_batch1": 1.1,
                    "ratio_fp32_vs_ct2_batch8": 1.1, "ratio_bf16_vs_fp32_batch1": 1.7, "ratio_fp16_vs_fp32_batch1": 1.7,
                    "ratio_batch1": 1.25, "ratio_batch8": 1.5, "ratio_int8_vs_llamacpp_q8_batch1": 1.0,
                    "ratio_fp16_vs_llamacpp_f16_batch1": 1.0},
        "native_bf16": native_bf16(), "machine": machine()})
    import ctranslate2
    import llama_cpp
    res["machine"]["ctranslate2"] = ctranslate2.__version__
    res["machine"]["llama_cpp_python"] = llama_cpp.__version__
    print(table(rows, ("greedy decode", "engine", "tok/s", "same tokens as gptn fp32 (share)")))
    print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    print("batch-1 bandwidth limit: " + ", ".join(f"{d} {limits[d]:.1f} tok/s ({res['fraction_of_bandwidth_limit_batch1'][d]:.0%} reached)"
                                                  for d in dtypes) + f" at {bandwidth / 1e9:.1f} GB/s copy")
    print("prefill 1x1024 (last-position logits): " + ", ".join(f"{n} {t * 1e3:.0f} ms" for n, t in prefill.items()))
    if quality_res:
        res["quality"] = quality_res
    print("wrote", write_results(f"generate-{cpu_kind()}", res))


if __name__ == "__main__":
    main()
