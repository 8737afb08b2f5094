"""Load test of `gptn serve`: the continuous-batching engine against the static one it replaced
(benchmarks/static_engine.py), in one run, with the same mixed traffic.

    python benchmarks/serve.py [--clients 32] [--seconds 60]

Each of `--clients` clients streams one completion after another for `--seconds`: max_tokens drawn
from 8..256, half greedy and half sampled (temperature 0.7 / 1.0 / 1.3, top_p 0.9), and one request in
16 with a long prompt (300-400 tokens). Reported per scheduler: requests/s, output tokens/s, p50/p99
time to first token (TTFT, request sent -> first streamed text) and time per output token (TPOT,
(last - first) / (tokens - 1), as vLLM's benchmark defines it), errors, and the server's RSS after
warm-up and after the run.

The server runs as its own process (`gptn serve`), as a user would start it. The model is a small
GPT-2-style network (4 layers, d_model 256, context 512) with random weights and a character
tokenizer: throughput does not depend on what the weights have learned.

Targets (issue 20): continuous output tokens/s >= 2x static; p99 TTFT <= 1/3 of static's; 0 errors;
RSS after the run within 10% of RSS after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import free_port, machine, median, rss_mb, table, wait_healthy, write_results  # noqa: E402

from gptn.checkpoint import save_checkpoint  # noqa: E402
from gptn.config import GPTConfig  # noqa: E402
from gptn.model import GPT  # noqa: E402
from gptn.tokenizer import CharTokenizer  # noqa: E402

WORDS = "the a of to and in that it was he for on are as with his they at be this from".split()
N_CTX = 512


def make_run(folder: Path) -> Path:
    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ,.\n")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_ctx=N_CTX, n_layer=4, n_head=4, d_model=256, dropout=0.0))
    save_checkpoint(folder / "run", model.config, model.state_dict(), tokenizer=tok)
    return folder / "run"


def text(rng: random.Random, chars: int) -> str:
    words = []
    while sum(len(w) + 1 for w in words) < chars:
        words.append(rng.choice(WORDS))
    return " ".join(words)[:chars]


def body(rng: random.Random) -> dict:
    """One request of the mix."""
    long_prompt = rng.random() < 1 / 16
    b = {"model": "bench", "prompt": text(rng, rng.randint(300, 400) if long_prompt else rng.randint(10, 60)),
         "max_tokens": rng.choice([8, 16, 32, 64, 128, 256]), "stream": True,
         "stream_options": {"include_usage": True}}
    if rng.random() < 0.5:
        b["temperature"] = 0
    else:
        b.update(temperature=rng.choice([0.7, 1.0, 1.3]), top_p=0.9)
    return b


def request(port: int, b: dict) -> dict:
    """Stream one completion: TTFT, TPOT and the output tokens (from the usage chunk)."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(b).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"]:  # text, or only a finish_reason when the first token ends the text
                last = time.perf_counter()
                first = first or last
    if first is None or tokens < 1:
        raise RuntimeError("a stream without choices or usage")
    return {"ttft": first - t0, "tpot": (last - first) / (tokens - 1) if tokens > 1 else None, "tokens": tokens}


def percentile(xs: list[float], q: float) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def load(port: int, clients: int, seconds: float) -> dict:
    results, errors, lock = [], [], threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(i):
        rng = random.Random(i)
        while time.perf_counter() < deadline:
            try:
                out = request(port, body(rng))
                with lock:
                    results.append(out)
            except (urllib.error.URLError, RuntimeError, OSError, ValueError) as e:
                with lock:
                    errors.append(repr(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft, tpot = [r["ttft"] for r in results], [r["tpot"] for r in results]
    return {"clients": clients, "seconds": round(wall, 1), "requests": len(results), "errors": len(errors),
            "requests_per_s": len(results) / wall, "output_tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50_s": median(ttft) if ttft else None, "ttft_p99_s": percentile(ttft, 0.99),
            "tpot_p50_s": percentile(tpot, 0.5), "tpot_p99_s": percentile(tpot, 0.99), "first_errors": errors[:3]}


def run_scheduler(run: Path, scheduler: str, clients: int, seconds: float) -> dict:
    port = free_port()
    # the continuous engine is `gptn serve` itself; the static one it replaced serves through the same app
    command = [sys.executable, "-m", "gptn", "serve"] if scheduler == "continuous" else \
        [sys.executable, str(Path(__file__).parent / "static_engine.py")]
    server = subprocess.Popen([*command, str(run), "--port", str(port), "--model-name", "bench", "--max-batch", "32"],
                              env={**os.environ, "OMP_NUM_THREADS": "2"})
    try:
        wait_healthy(port)
        load(port, clients, 5)  # warm-up: every code path, the cache grown to its working size
        rss_warm = rss_mb(server.pid)
        result = load(port, clients, seconds)
        result.update(rss_after_warmup_mb=rss_warm, rss_after_run_mb=rss_mb(server.pid))
        result["rss_growth"] = result["rss_after_run_mb"] / rss_warm - 1
        return result
    finally:
        server.terminate()
        server.wait(timeout=30)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp))
        res = {name: run_scheduler(run, name, args.clients, args.seconds) for name in ("static", "continuous")}
    static, cont = res["static"], res["continuous"]
    ratio = cont["output_tokens_per_s"] / static["output_tokens_per_s"]
    ttft_ratio = cont["ttft_p99_s"] / static["ttft_p99_s"]
    rows = [(name, r["requests"], r["errors"], f"{r['requests_per_s']:.2f}", f"{r['output_tokens_per_s']:.0f}",
             f"{r['ttft_p50_s']:.3f}", f"{r['ttft_p99_s']:.3f}", f"{r['tpot_p50_s'] * 1e3:.1f}",
             f"{r['tpot_p99_s'] * 1e3:.1f}", f"{r['rss_after_warmup_mb']:.0f} -> {r['rss_after_run_mb']:.0f}")
            for name, r in res.items()]
    print(table(rows, ("scheduler", "requests", "errors", "req/s", "out tok/s", "TTFT p50 s", "TTFT p99 s",
                       "TPOT p50 ms", "TPOT p99 ms", "RSS MB")))
    print(f"continuous vs static: {ratio:.2f}x output tokens/s, p99 TTFT ratio {ttft_ratio:.2f}")
    results = {**res, "continuous_vs_static_tokens_per_s": ratio, "ttft_p99_ratio": ttft_ratio,
               "errors": static["errors"] + cont["errors"],
               "targets": {"continuous_vs_static_tokens_per_s": 2.0, "ttft_p99_ratio": 1 / 3, "errors": 0,
                           "rss_growth": 0.10},
               "targets_met": ratio >= 2 and ttft_ratio <= 1 / 3 and static["errors"] + cont["errors"] == 0
               and abs(cont["rss_growth"]) <= 0.10,
               "setup": {"model": f"4 layers, d_model 256, 4 heads, context {N_CTX}, random weights, character tokenizer",
                         "clients": args.clients, "seconds": args.seconds,
                         "requests": "streamed; max_tokens 8-256; half greedy, half temperature 0.7/1.0/1.3 with "
                                     "top_p 0.9; 1 in 16 with a 300-400 token prompt, the rest 10-60"},
               "machine": machine()}
    print(f"wrote {write_results('serve', results)}")


if __name__ == "__main__":
    main()
