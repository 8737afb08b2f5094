"""Load test of `gptn serve`: 32 concurrent clients for 60 s against a small model on loopback,
then the same requests one at a time; requests/s, p50/p99 latency and errors of each.

    python benchmarks/serve.py [--clients 32] [--seconds 60]

The server runs as its own process (`gptn serve`), as a user would start it. The model is a small
GPT-2-style network (4 layers, d_model 256, context 128) with random weights and a character
tokenizer: throughput does not depend on what the weights have learned.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
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
from common import machine, median, table, write_results  # noqa: E402

from gptn.checkpoint import save_checkpoint  # noqa: E402
from gptn.config import GPTConfig  # noqa: E402
from gptn.model import GPT  # noqa: E402
from gptn.tokenizer import CharTokenizer  # noqa: E402

WORDS = "the a of to and in that it was he for on are as with his they at be this from".split()
MAX_TOKENS = 32


def make_run(folder: Path) -> Path:
    tok = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ,.\n")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_ctx=128, n_layer=4, n_head=4, d_model=256, dropout=0.0))
    save_checkpoint(folder / "run", model.config, model.state_dict(), tokenizer=tok)
    return folder / "run"


def prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))


def request(port: int, text: str) -> float:
    body = json.dumps({"model": "bench", "prompt": text, "max_tokens": MAX_TOKENS, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as r:
        out = json.loads(r.read())
    if r.status != 200 or len(out["choices"]) != 1:
        raise RuntimeError(f"bad response {r.status}")
    return time.perf_counter() - t0


def load(port: int, clients: int, seconds: float) -> dict:
    latencies, errors, lock = [], [], threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(i):
        rng = random.Random(i)
        while time.perf_counter() < deadline:
            try:
                dt = request(port, prompt(rng))
                with lock:
                    latencies.append(dt)
            except (urllib.error.URLError, RuntimeError, OSError) as e:
                with lock:
                    errors.append(repr(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"clients": clients, "seconds": round(wall, 1), "requests": len(lat), "errors": len(errors),
            "requests_per_s": len(lat) / wall, "tokens_per_s": len(lat) * MAX_TOKENS / wall,
            "p50_latency_s": median(lat) if lat else None,
            "p99_latency_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
            "first_errors": errors[:3]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "gptn", "serve", str(run), "--port", str(port),
                                   "--model-name", "bench"], env={**os.environ, "OMP_NUM_THREADS": "2"})
        try:
            for _ in range(600):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                    break
                except OSError:
                    time.sleep(0.1)
            request(port, "warm up")
            concurrent = load(port, args.clients, args.seconds)
            sequential = load(port, 1, args.seconds)
        finally:
            server.terminate()
            server.wait(timeout=30)
    ratio = concurrent["requests_per_s"] / sequential["requests_per_s"]
    rows = [(name, r["clients"], r["requests"], r["errors"], f"{r['requests_per_s']:.2f}", f"{r['tokens_per_s']:.0f}",
             f"{r['p50_latency_s']:.3f}", f"{r['p99_latency_s']:.3f}")
            for name, r in (("concurrent", concurrent), ("one at a time", sequential))]
    print(table(rows, ("mode", "clients", "requests", "errors", "req/s", "tokens/s", "p50 s", "p99 s")))
    print(f"batching speed-up: {ratio:.2f}x requests/s")
    results = {"concurrent": concurrent, "sequential": sequential, "batching_speedup": ratio,
               "errors": concurrent["errors"] + sequential["errors"],
               "setup": {"model": "4 layers, d_model 256, 4 heads, context 128, random weights, character tokenizer",
                         "request": f"prompt of 3-10 words, max_tokens {MAX_TOKENS}, temperature 0"},
               "machine": machine()}
    print(f"wrote {write_results('serve', results)}")


if __name__ == "__main__":
    main()
