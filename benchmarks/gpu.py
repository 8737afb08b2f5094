"""Every GPU claim of gptn, checked by one prepared command.

On a machine with one CUDA GPU (H100 or H200; about 10 minutes of GPU time; nothing is downloaded):

    pip install torch==2.13.0      # or the CUDA build the machine has (any torch >= 2.4)
    pip install -e ".[dev,bench]"
    python benchmarks/gpu.py       # [--minutes 10] [--out benchmarks/results/gpu.json]

It runs, in this order, each step first checking the time left and skipping (saying so) rather than
overrunning:

1. correctness
   - train_step: one bf16-autocast training step of a small GPT on the GPU against the fp32 step on the
     CPU from the same weights and batch (loss within 2%, gradient cosine >= 0.99, update cosine >= 0.98);
   - finetune_autocast: `finetune` with --precision bf16 on the GPU and fp32, on a separable task (both
     reach accuracy 1.0);
   - decode_dtypes: a model pretrained in the run (Tiny Shakespeare, characters), read at bf16 and fp16
     against fp32 on the GPU: teacher-forced greedy agreement (>= 0.97), perplexity (within 1%),
     `next`'s top token, free-running greedy agreement (reported);
   - serve: `gptn serve --device cuda` answering echo + logprobs through the openai client, equal to
     `gptn score` (within 2e-3 nats a token);
   - fsdp: a 1-GPU FSDP2 pretraining run through torchrun (it completes, the loss falls);
2. speed: `gpt2` and `gpt2-medium` bf16 MFU at context 1024 (torch.compile), beside Hugging Face
   GPT2LMHeadModel (SDPA attention, compiled) at the same batch (`speed_ratio_vs_hf_gpu`), peak memory;
   the levers one at a time on `gpt2`: compile modes (default, max-autotune-no-cudagraphs, reduce-overhead
   = CUDA graphs), SDPA backends (flash, efficient, cudnn, math), the tied softmax layer's
   cross-entropy computed in chunks (logits never whole);
3. transfer: the transfer benchmark's GPU tier (needs ../shared/data: IMDB, GLUE SST-2) — an 8 x 512
   model pretrained ~5 minutes on IMDB's unlabeled + train reviews, SST-2 at 2,000 labels from it and
   from scratch (each arm's rate and λ chosen on a 500-sentence selection set), TF-IDF on the same
   labels, paired bootstrap intervals: `transfer.pretrained_minus_bow`.

Writes every result under its own key in the JSON (default benchmarks/results/gpu.json) and prints a
summary. Targets: `speed.gpt2.mfu` >= 0.50, `speed.gpt2.speed_ratio_vs_hf_gpu` >= 1.3, every
correctness check passed, `transfer.pretrained_minus_bow` >= +8 points.

`--smoke` runs the same steps on the CPU with tiny shapes (compile through dynamo's eager backend, the
transfer tier on a 2,000-review slice) in under a minute, and writes to --out (a test runs it in CI),
so every path the GPU run takes has run before a GPU is available.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SHARED, free_port, machine, median, table, wait_healthy  # noqa: E402

from gptn.checkpoint import save_checkpoint  # noqa: E402
from gptn.compute import training_flops_per_token  # noqa: E402
from gptn.config import GPTConfig, get_preset  # noqa: E402
from gptn.model import GPT  # noqa: E402
from gptn.optim import make_optimizer  # noqa: E402
from gptn.runtime import GPU_BF16_PEAK, measure_matmul_peak  # noqa: E402

SHAKESPEARE = SHARED / "tinyshakespeare" / "input.txt"
TOLERANCES = {"train_step": {"loss_rel": 0.02, "grad_cosine": 0.99, "update_cosine": 0.98},
              "decode_dtypes": {"teacher_forced_agreement": 0.97, "perplexity_rel": 0.01},
              "serve": {"logprob_abs": 2e-3}}


class Runner:
    """Runs the steps in order within a time budget, recording each one's result or why it was skipped."""

    def __init__(self, minutes: float, smoke: bool, device: torch.device, work: Path):
        self.deadline = time.time() + 60 * minutes
        self.smoke, self.device, self.work = smoke, device, work
        self.results: dict = {}

    def run(self, group: str, name: str, estimate_s: float, fn) -> None:
        left = self.deadline - time.time()
        slot = self.results.setdefault(group, {})
        if left < estimate_s:
            slot[name] = {"skipped": f"{left:.0f} s left, the step needs about {estimate_s:.0f} s"}
        else:
            t0 = time.time()
            try:
                slot[name] = fn(self)
            except Exception as e:  # a failed step is a result; the other steps still run
                slot[name] = {"error": f"{type(e).__name__}: {e}", "passed": False}
            slot[name]["seconds"] = round(time.time() - t0, 1)
        status = ("skipped: " + slot[name]["skipped"] if "skipped" in slot[name] else
                  "error: " + slot[name]["error"] if "error" in slot[name] else
                  {True: "passed", False: "FAILED", None: "done"}[slot[name].get("passed")])
        print(f"[{group}] {name}: {status} ({slot[name].get('seconds', 0):.0f} s)", flush=True)

    @property
    def amp(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


# ----------------------------------------------------------------------------------------------
# 1. correctness


def train_step(r: Runner) -> dict:
    """bf16 autocast on the device against fp32 on the CPU: one step from the same weights and batch."""
    config = GPTConfig(vocab_size=512, n_ctx=64 if r.smoke else 256, n_layer=2 if r.smoke else 4, n_head=4,
                       d_model=64 if r.smoke else 256, dropout=0.0)
    torch.manual_seed(0)
    x = torch.randint(0, config.vocab_size, (4, config.n_ctx))
    y = torch.randint(0, config.vocab_size, (4, config.n_ctx))
    out = {}
    for side, device, amp in (("cpu_fp32", torch.device("cpu"), nullcontext()), ("device_bf16", r.device, r.amp)):
        torch.manual_seed(1)
        model = GPT(config).to(device)
        start = [p.detach().clone().cpu() for p in model.parameters()]
        opt = make_optimizer(model, 1e-3, 0.1, (0.9, 0.95), device.type)
        with amp:
            _, loss = model(x.to(device), y.to(device))
        loss.backward()
        grads = torch.cat([p.grad.detach().float().cpu().flatten() for p in model.parameters()])
        opt.step()
        update = torch.cat([(p.detach().cpu() - s).flatten() for p, s in zip(model.parameters(), start)])
        out[side] = (loss.item(), grads, update)
    (l32, g32, u32), (l16, g16, u16) = out["cpu_fp32"], out["device_bf16"]
    tol = TOLERANCES["train_step"]
    res = {"loss_fp32_cpu": l32, "loss_bf16_device": l16, "loss_rel": abs(l16 - l32) / l32,
           "grad_cosine": _cosine(g16, g32), "update_cosine": _cosine(u16, u32), "tolerance": tol}
    res["passed"] = res["loss_rel"] <= tol["loss_rel"] and res["grad_cosine"] >= tol["grad_cosine"] \
        and res["update_cosine"] >= tol["update_cosine"]
    return res


def finetune_autocast(r: Runner) -> dict:
    """Fine-tuning under bf16 autocast on the device and in fp32: both fit a separable task."""
    from gptn.finetune import FinetuneConfig, finetune
    from gptn.tokenizer import CharTokenizer
    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .,!?'")
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=tok.vocab_size, n_ctx=48, n_layer=2, n_head=2, d_model=64, dropout=0.0))
    save_checkpoint(r.work / "ft-source", gpt.config, gpt.state_dict(), tokenizer=tok)
    words = ["good", "great", "fine", "nice", "bad", "awful", "poor", "sad"]
    rows = ["sentence\tlabel"] + [f"the {w} movie\t{'pos' if i % 8 < 4 else 'neg'}" for i, w in enumerate(words * 5)]
    (r.work / "sep.tsv").write_text("\n".join(rows) + "\n")
    res = {}
    for precision in ("bf16", "fp32"):
        s = finetune(FinetuneConfig(run=str(r.work / "ft-source"), out=str(r.work / f"ft-{precision}"),
                                    train=str(r.work / "sep.tsv"), val=str(r.work / "sep.tsv"), epochs=20, batch_size=8,
                                    lr=3e-3, dropout=0.0, head_dropout=0.0, precision=precision,
                                    device=r.device.type, progress=False))
        res[precision] = {"accuracy": s["best"]["value"], "epoch": s["best"]["epoch"]}
    res["passed"] = res["bf16"]["accuracy"] == 1.0 and res["fp32"]["accuracy"] == 1.0
    return res


def _shakespeare(r: Runner) -> Path:
    """A character-level Tiny Shakespeare model pretrained in the run (the decode and serve checks' model)."""
    from gptn.data import prepare
    from gptn.pretrain import PretrainConfig, pretrain
    run = r.work / "shakespeare"
    if (run / "checkpoint").is_dir():
        return run
    text = SHAKESPEARE.read_text() if SHAKESPEARE.exists() else \
        "".join(f"Line {i}: the quick brown fox jumps over the lazy dog, {i % 7} times.\n" for i in range(3000))
    (r.work / "text.txt").write_text(text[:20_000] if r.smoke else text)
    prepare([str(r.work / "text.txt")], "char", r.work / "chars", val_fraction=0.1, progress=False)
    pretrain(PretrainConfig(corpus=str(r.work / "chars"), out=str(run), preset="tiny" if r.smoke else "mini",
                            overrides={"n_ctx": 64 if r.smoke else 256, "dropout": 0.0}, steps=30 if r.smoke else 600,
                            batch_tokens=64 * 8 if r.smoke else 256 * 32, lr=3e-3 if r.smoke else 1e-3,
                            eval_interval=0, device=r.device.type, progress=False))
    return run


def decode_dtypes(r: Runner) -> dict:
    """bf16 and fp16 decoding on the device against fp32: agreement and perplexity."""
    from gptn.generate import generate, next_token_probs
    from gptn.sampling import SamplingConfig
    from gptn.scoring import score
    from gptn.inference import load_for_inference
    run = _shakespeare(r)
    held_out = (r.work / "text.txt").read_text()[-4000:]
    prompts = [held_out[i:i + 40] for i in range(0, 1600, 100)]
    res, ref = {}, {}
    for dtype in ("fp32", "bf16", "fp16"):
        model, tok = load_for_inference(str(run), r.device.type, dtype)
        ids = torch.tensor([[tok.eot_id] + tok.encode(held_out)[:model.config.n_ctx - 1]], device=r.device)
        with torch.no_grad():
            greedy = model(ids)[0].argmax(-1).cpu()
        s = score(model, tok, held_out)
        free = generate(model, tok, prompts, SamplingConfig(max_new_tokens=32, greedy=True))
        top = next_token_probs(model, tok, "ROMEO:", 1)[0]["token"]
        if dtype == "fp32":
            ref = {"greedy": greedy, "ppl": s.perplexity, "free": free, "top": top}
            res[dtype] = {"perplexity": s.perplexity}
            continue
        res[dtype] = {"perplexity": s.perplexity, "perplexity_rel": abs(s.perplexity / ref["ppl"] - 1),
                      "teacher_forced_agreement": float((greedy == ref["greedy"]).float().mean()),
                      "free_running_agreement": sum(a == b for x, y in zip(free, ref["free"]) for a, b in zip(x, y))
                      / max(1, sum(len(y) for y in ref["free"])),
                      "next_top_token_equal": top == ref["top"]}
    tol = TOLERANCES["decode_dtypes"]
    res["tolerance"] = tol
    res["passed"] = all(res[d]["teacher_forced_agreement"] >= tol["teacher_forced_agreement"] and
                        res[d]["perplexity_rel"] <= tol["perplexity_rel"] for d in ("bf16", "fp16"))
    return res


def serve_echo_logprobs(r: Runner) -> dict:
    """`gptn serve --device D`: echo + logprobs through the openai client equal `gptn score`."""
    import openai

    from gptn.checkpoint import load_model
    from gptn.scoring import score
    run = _shakespeare(r)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "gptn", "serve", str(run), "--port", str(port),
                               "--device", r.device.type], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_healthy(port)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="local")
        text = "ROMEO:\nBut soft, what light through yonder window breaks?"
        model, tok = load_model(run)
        expected = score(model, tok, text).logprobs  # each token read after end-of-text, as the prompt below
        c = client.completions.create(model=run.name, prompt=[tok.eot_id] + tok.encode(text), echo=True, logprobs=1,
                                      max_tokens=0)
        served = c.choices[0].logprobs.token_logprobs[1:]  # the first token has none
        diff = max(abs(a - b) for a, b in zip(served, expected))
        res = {"tokens": len(served), "max_abs_logprob_diff": diff, "tolerance": TOLERANCES["serve"]}
        res["passed"] = len(served) == len(expected) and diff <= TOLERANCES["serve"]["logprob_abs"]
        return res
    finally:
        server.terminate()
        server.wait(timeout=30)


def fsdp_one_gpu(r: Runner) -> dict:
    """A 1-GPU FSDP2 pretraining run through torchrun."""
    _shakespeare(r)
    out = r.work / "fsdp"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                        "-m", "gptn", "pretrain", str(r.work / "chars"), "--out", str(out), "--preset", "tiny",
                        "--set", "n_ctx=64", "--steps", "10" if r.smoke else "40", "--batch-tokens", "512", "--lr", "3e-3",
                        "--strategy", "fsdp", "--eval-interval", "5" if r.smoke else "20", "--eval-batches", "4",
                        "--device", r.device.type, "--no-progress"],
                       capture_output=True, text=True)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] if p.returncode == 0 else []
    losses = [x["val_loss"] for x in records if "val_loss" in x]  # step 0 (the untrained model) first
    res = {"returncode": p.returncode, "first_val_loss": losses[0] if losses else None,
           "last_val_loss": losses[-1] if losses else None, "stderr_tail": p.stderr[-500:] if p.returncode else ""}
    res["passed"] = p.returncode == 0 and len(losses) > 1 and losses[-1] < losses[0]
    return res


# ----------------------------------------------------------------------------------------------
# 2. speed


def _peak(r: Runner) -> float:
    if r.device.type != "cuda":
        return measure_matmul_peak(r.device, torch.bfloat16, n=512, seconds=0.2)
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in GPU_BF16_PEAK.items() if k in name), None) or \
        measure_matmul_peak(r.device, torch.bfloat16, n=8192, seconds=2.0)


def chunked_loss(model: GPT, x: torch.Tensor, y: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Next-token loss with the tied softmax layer applied chunk by chunk, each chunk's logits recomputed
    in backward (never held whole: (B·T, V) is 3.3 GB in fp32 for gpt2 at 16 x 1024)."""
    h = model.hidden_states(x).flatten(0, 1)
    targets = y.flatten()
    w = model.wte.weight

    def part(hc, yc):
        return F.cross_entropy(F.linear(hc, w).float(), yc, ignore_index=-100, reduction="sum")

    total = sum(torch.utils.checkpoint.checkpoint(part, h[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
                for i in range(0, len(h), chunk))
    return total / (targets != -100).sum()


def _time_steps(r: Runner, model, loss_fn, batch: int, seq: int, vocab: int, steps: int, warmup: int) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, fused=r.device.type == "cuda")
    x = torch.randint(0, vocab, (batch, seq), device=r.device)
    y = torch.randint(0, vocab, (batch, seq), device=r.device)
    times = []
    if r.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        r.sync()
        t0 = time.perf_counter()
        with r.amp:
            loss = loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        r.sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step = median(times)
    return {"step_seconds": step, "tokens_per_s": batch * seq / step, "loss": float(loss.detach()),
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if r.device.type == "cuda" else None}


def _speed_setup(r: Runner, preset: str):
    config = get_preset(preset).config.replace(dropout=0.0)
    if r.smoke:
        config = config.replace(n_layer=2, n_head=2, d_model=64, n_ctx=64, vocab_size=1024)
    batch = 2 if r.smoke else (16 if preset == "gpt2" else 8)
    return config, batch, config.n_ctx, (1, 1) if r.smoke else (10, 3)


def _compile(r: Runner, module, mode: str | None = None):
    if r.smoke:  # dynamo's graph capture without inductor's code generation: the path, in seconds
        return torch.compile(module, backend="eager")
    return torch.compile(module, mode=mode)


def model_speed(preset: str):
    def step(r: Runner) -> dict:
        from transformers import GPT2Config, GPT2LMHeadModel
        config, batch, seq, (steps, warmup) = _speed_setup(r, preset)
        peak = _peak(r)
        flops = training_flops_per_token(config, seq)
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = GPT(config).to(r.device)
        fwd = _compile(r, model)
        ours = _time_steps(r, model, lambda x, y: fwd(x, y)[1], batch, seq, config.vocab_size, steps, warmup)
        del model, fwd
        torch._dynamo.reset()
        hf = GPT2LMHeadModel(GPT2Config(vocab_size=config.vocab_size, n_positions=config.n_ctx, n_embd=config.d_model,
                                        n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                        attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
                                        attn_implementation="sdpa")).to(r.device)
        hf_fwd = _compile(r, hf)
        theirs = _time_steps(r, hf, lambda x, y: hf_fwd(input_ids=x, labels=y).loss, batch, seq, config.vocab_size,
                             steps, warmup)
        del hf, hf_fwd
        res = {"batch": batch, "seq": seq, "precision": "bf16 autocast", "compiled": True, "peak_flops": peak,
               "mfu": ours["tokens_per_s"] * flops / peak, "gptn": ours,
               "hf": {**theirs, "mfu": theirs["tokens_per_s"] * flops / peak},
               "speed_ratio_vs_hf_gpu": ours["tokens_per_s"] / theirs["tokens_per_s"]}
        res["passed"] = None  # a measurement; targets are read in the summary
        return res
    return step


def levers(r: Runner) -> dict:
    """On gpt2: one lever at a time against the compiled default."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    config, batch, seq, (steps, warmup) = _speed_setup(r, "gpt2")
    flops, peak = training_flops_per_token(config, seq), _peak(r)
    variants = [("compile default", "default", None, False), ("compile max-autotune-no-cudagraphs",
                                                               "max-autotune-no-cudagraphs", None, False),
                ("CUDA graphs (reduce-overhead)", "reduce-overhead", None, False),
                ("chunked tied-softmax cross-entropy", "default", None, True)]
    variants += [(f"SDPA {b.name.lower()}", "default", b, False) for b in
                 (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH)]
    if r.smoke:  # the CPU has the math and flash kernels only; compile modes are inductor's
        variants = [v for v in variants if v[0] in ("compile default", "chunked tied-softmax cross-entropy",
                                                    "SDPA math", "SDPA flash_attention")]
    res = {}
    for name, mode, backend, chunked in variants:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = GPT(config).to(r.device)
        try:
            with sdpa_kernel([backend]) if backend is not None else nullcontext():
                fwd = _compile(r, chunked_loss if chunked else model, mode)
                loss = (lambda x, y: fwd(model, x, y)) if chunked else (lambda x, y: fwd(x, y)[1])
                t = _time_steps(r, model, loss, batch, seq, config.vocab_size, steps, warmup)
            res[name] = {**t, "mfu": t["tokens_per_s"] * flops / peak}
        except Exception as e:  # a backend this GPU or build lacks is a result too
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        del model
    res["passed"] = None
    return res


# ----------------------------------------------------------------------------------------------
# 3. the transfer benchmark's GPU tier


def transfer_tier(r: Runner) -> dict:
    import transfer as t

    from gptn.data import Corpus, prepare, read_records
    from gptn.pretrain import PretrainConfig, pretrain
    if not (t.IMDB / "unsup.jsonl").exists() or not (t.GLUE / "SST-2" / "train.tsv").exists():
        return {"skipped": f"no IMDB / SST-2 under {SHARED}"}
    reviews = r.work / "reviews.jsonl"
    with open(reviews, "w") as f:
        for name in ("unsup.jsonl", "train.jsonl"):
            for i, line in enumerate(open(t.IMDB / name)):
                if r.smoke and i >= 200:
                    break
                f.write(line)
    corpus = r.work / "imdb"
    prepare([str(reviews)], "bpe:512" if r.smoke else "bpe:8192", corpus, val_fraction=0.01, normalize="sst",
            progress=False)
    steps_norm = Corpus(corpus).tokenizer.normalize
    shape = dict(n_layer=2, n_head=2, d_model=64, n_ctx=64) if r.smoke else dict(n_layer=8, n_head=8, d_model=512,
                                                                                 n_ctx=256)
    seconds = 2 if r.smoke else 240
    run = r.work / "pretrained"
    pretrain(PretrainConfig(corpus=str(corpus), out=str(run), overrides={**shape, "dropout": 0.0, "bias": False},
                            steps=10 ** 6, max_seconds=seconds, batch_tokens=shape["n_ctx"] * (8 if r.smoke else 64),
                            lr=3e-3, min_lr=3e-4, optimizer="muon", muon_lr=0.02, warmup_steps=10 if r.smoke else 100,
                            eval_interval=10 ** 6, checkpoint_interval=10 ** 6, device=r.device.type, progress=False))
    n_labels, n_select = (64, 32) if r.smoke else (t.N_LABELED, t.N_SELECT)
    rows = [{"text": x["sentence"].strip(), "label": x["label"]} for x in t.sst2_sentences()]
    dev = [{"text": x["sentence"].strip(), "label": x["label"]} for x in read_records(t.GLUE / "SST-2" / "dev.tsv")]
    dev = dev[:200] if r.smoke else dev
    pool = [json.loads(line)["text"] for line in open(reviews)]
    seen = t.verbatim_in(pool, [x["text"] for x in dev], steps_norm, whole_texts=False)
    select = t._write_jsonl(r.work / "select.jsonl", rows[:n_select])
    train = t._write_jsonl(r.work / "train.jsonl", rows[n_select:n_select + n_labels])
    report = t._write_jsonl(r.work / "report.jsonl", [x for x, s in zip(dev, seen) if not s])
    seeds = [1] if r.smoke else [1, 2, 3]
    device = {"device": r.device.type}
    cells = {}
    for init in t.ARMS:  # the CPU benchmark's grid without its task-adaptive source (one pretraining here)
        grid = [{k: v for k, v in p.items() if k != "source"} for p in t.SEARCH[("SST-2", init)]
                if p.get("source", "imdb") == "imdb"]
        grid = grid[:1] if r.smoke else grid
        options = lambda point: {**t.FIXED, **t.DEFAULTS, **point, "from_scratch": init == "scratch", **device}  # noqa: E731
        tried = [(t.tune(r.work, run, train, select, None, seed=1, **options(p)), p) for p in grid]
        best, recipe = max(tried, key=lambda x: x[0]["select"])
        cells[init] = {"recipe": recipe, "epochs": best["epoch"],
                       "search": [{"select": s["select"], "epoch": s["epoch"], **p} for s, p in tried],
                       "runs": [t.refit(r.work, run, train, select, report, seed=s,
                                        **{**options(recipe), "epochs": best["epoch"]})
                                for s in seeds]}
    bow = [t.tfidf_baseline([train, select], report, steps_norm)]
    pre_c = [x["correct"] for x in cells["pretrained"]["runs"]]
    vs_bow = t.bootstrap_difference(pre_c, bow)
    vs_scratch = t.bootstrap_difference(pre_c, [x["correct"] for x in cells["scratch"]["runs"]])
    return {"pretrained_minus_bow": vs_bow["points"], "pretrained_minus_bow_ci95": vs_bow["ci95"],
            "pretrained_minus_scratch": vs_scratch["points"], "pretrained_minus_scratch_ci95": vs_scratch["ci95"],
            "model": shape, "pretrain_seconds": seconds, "labels": n_labels, "seeds": len(seeds),
            "report_items": len(report.read_text().splitlines()), "dropped_verbatim": sum(seen),
            "recipes": {k: {**v["recipe"], "epochs": v["epochs"]} for k, v in cells.items()},
            "accuracy": {k: [x["value"] for x in v["runs"]] for k, v in cells.items()},
            "tfidf": sum(bow[0]) / len(bow[0]), "passed": None}


# ----------------------------------------------------------------------------------------------


STEPS = [  # (group, name, estimated seconds on an H100 (smoke: on the CPU), function)
    ("correctness", "train_step", 20, train_step),
    ("correctness", "finetune_autocast", 30, finetune_autocast),
    ("correctness", "decode_dtypes", 60, decode_dtypes),
    ("correctness", "serve", 30, serve_echo_logprobs),
    ("correctness", "fsdp", 40, fsdp_one_gpu),
    ("speed", "gpt2", 90, model_speed("gpt2")),
    ("speed", "gpt2-medium", 90, model_speed("gpt2-medium")),
    ("speed", "levers", 150, levers),
    ("transfer", "sst2", 420, transfer_tier),
]
SMOKE_ESTIMATES = {"transfer": 20}


def summary(results: dict) -> list[tuple]:
    rows = []
    for name, r in results.get("correctness", {}).items():
        rows.append((f"correctness: {name}", "skipped" if "skipped" in r else "passed" if r.get("passed") else "FAILED", ""))
    for name in ("gpt2", "gpt2-medium"):
        r = results.get("speed", {}).get(name, {})
        if "mfu" in r:
            rows.append((f"speed: {name} MFU", f"{r['mfu']:.1%}", ">= 50%" if name == "gpt2" else ""))
            rows.append((f"speed: {name} vs HF (compiled, SDPA)", f"{r['speed_ratio_vs_hf_gpu']:.2f}x",
                         ">= 1.3x" if name == "gpt2" else ""))
    tr = results.get("transfer", {}).get("sst2", {})
    if "pretrained_minus_bow" in tr:
        rows.append(("transfer: SST-2 pretrained - TF-IDF", f"{tr['pretrained_minus_bow']:+.1f} {tr['pretrained_minus_bow_ci95']}",
                     ">= +8"))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, under a minute")
    ap.add_argument("--minutes", type=float, default=10.0, help="the GPU time budget (default 10)")
    ap.add_argument("--out", help="the JSON written (default benchmarks/results/gpu.json; required with --smoke)")
    ap.add_argument("--only", help="comma list of steps to run (e.g. train_step,gpt2)")
    args = ap.parse_args()
    if args.smoke and not args.out:
        ap.error("--smoke writes to --out (the committed results are the GPU's)")
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py: no CUDA GPU here; --smoke runs the same steps on the CPU")
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    only = set(args.only.split(",")) if args.only else None
    with tempfile.TemporaryDirectory(prefix="gptn-gpu-") as tmp:
        r = Runner(args.minutes, args.smoke, device, Path(tmp))
        for group, name, estimate, fn in STEPS:
            if only is None or name in only:
                r.run(group, name, SMOKE_ESTIMATES.get(group, 1) if args.smoke else estimate, fn)
        shutil.rmtree(Path(tmp) / "ft", ignore_errors=True)
    results = {**r.results, "smoke": args.smoke, "minutes": args.minutes, "command": " ".join(["python", *sys.argv]),
               "machine": machine()}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(0)
    out = Path(args.out) if args.out else RESULTS / "gpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    print()
    print(table(summary(results), ("check", "measured", "target")))
    print(f"wrote {out}")
    failed = [f"{g}.{n}" for g in ("correctness",) for n, v in results.get(g, {}).items() if v.get("passed") is False]
    if failed:
        print("FAILED: " + ", ".join(failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
