"""One hostile request against `gptn serve`: a 10 MB and a 100 MB body of token ids, sent with a
Content-Length and streamed in chunks without one, and the largest body the server accepts (just under
its default --max-body, 1 MiB here: parsed, then refused for its length). For each: the time to the 4xx, the server's peak
and retained RSS against idle, /health latency while it lasts, and whether the server still answers
a completion afterwards. Beside it, the same 10 MB body against a plain FastAPI endpoint that parses
its body the usual way (`await request.json()`), the peer a user would otherwise write.
Targets (issue 21): 4xx within 1 s, RSS growth < 100 MB.

Then the hostile requests of issue 36, each while a probe sends 4-token completions back to back: a
huge stop list (100,000 strings) and one of 300,000 integers, 60,000 logit_bias entries, a prompt of
500,000 spaces to a run whose tokenizer normalises (`--normalize sst`), an echo flood (40 concurrent
echo + logprobs requests of 8 full-context prompts), 300 clients sending their body a byte a second,
and 16 non-streaming clients that disconnect while their long completions decode. For each: the
statuses, the probe's p99 latency (target <= 0.5 s), the server's RSS growth (<= 100 MB), and whether it
serves afterwards; the slow clients also against the plain FastAPI peer.

    python benchmarks/abuse.py [--sizes-mb 10,100] [--peer-mb 10] [--skip-hostile]

Both servers run as their own processes (uvicorn, one worker) on loopback; RSS is read from
/proc/PID/status every 2 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import free_port, machine, median, rss_mb, table, wait_healthy, write_results  # noqa: E402
from serve import N_CTX, make_run  # noqa: E402

from gptn.serve import default_max_body  # noqa: E402


# What a FastAPI user writes without thinking about body size: the whole body read and parsed first.
PEER_APP = """
import sys, uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
app = FastAPI()
@app.get("/health")
def health():
    return {"status": "ok"}
@app.post("/v1/completions")
async def completions(request: Request):
    body = await request.json()
    return JSONResponse({"error": {"message": f"the prompt has {len(body.get('prompt', []))} tokens", "type": "invalid_request_error"}}, 413)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def token_body(mb: float) -> bytes:
    head, tail = b'{"model": "bench", "max_tokens": 1, "prompt": [', b"1]}"
    return head + b"1, " * int((mb * 2**20 - len(head) - len(tail)) / 3) + tail


def send(port: int, body: bytes, chunked: bool) -> tuple[float, int]:
    """Send `body` in 1 MB pieces while reading the answer; seconds to the status line, and the status."""
    sock = socket.create_connection(("127.0.0.1", port))
    length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}"
    t0 = time.perf_counter()
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{length}\r\n\r\n".encode())
    answered = {}

    def read():
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        answered["t"] = time.perf_counter() - t0
        answered["status"] = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(0, len(body), 2**20):
            if "t" in answered:
                break  # the server has answered: a real client stops sending too
            piece = body[i:i + 2**20]
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        if chunked and "t" not in answered:
            sock.sendall(b"0\r\n\r\n")
    except OSError:
        pass  # the server closed the connection after answering: expected
    reader.join(timeout=600)
    sock.close()
    return answered.get("t", float("nan")), answered.get("status", 0)


@contextlib.contextmanager
def watching(pid: int, probe):
    """While the block runs: the server's peak RSS (read every 2 ms) and the results of `probe()`
    called back to back."""
    seen, stop = {"idle": rss_mb(pid), "probes": []}, threading.Event()
    seen["peak"] = seen["idle"]

    def sample_rss():
        while not stop.is_set():
            seen["peak"] = max(seen["peak"], rss_mb(pid))
            time.sleep(0.002)

    def probe_loop():
        while not stop.is_set():
            seen["probes"].append(probe())

    threads = [threading.Thread(target=sample_rss), threading.Thread(target=probe_loop)]
    for t in threads:
        t.start()
    try:
        yield seen
    finally:
        stop.set()
        for t in threads:
            t.join()


def health_ms(port: int) -> float:
    """/health's latency in ms (infinite when it fails), then a 20 ms pause."""
    t0 = time.perf_counter()
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=60).read()
        out = 1000 * (time.perf_counter() - t0)
    except OSError:
        out = float("inf")
    time.sleep(0.02)
    return out


def attack(pid: int, port: int, body: bytes, chunked: bool) -> dict:
    """One body while sampling the server's RSS and /health latency."""
    with watching(pid, lambda: health_ms(port)) as seen:
        seconds, status = send(port, body, chunked)
        time.sleep(0.2)  # let /health be asked once more after the answer
    time.sleep(0.5)
    health, idle = seen["probes"], seen["idle"]
    return {"status": status, "time_to_4xx_s": round(seconds, 4), "idle_rss_mb": round(idle, 1),
            "peak_rss_mb": round(seen["peak"], 1), "rss_growth_mb": round(seen["peak"] - idle, 1),
            "retained_rss_mb": round(rss_mb(pid) - idle, 1),
            "health_latency_ms": {"p50": round(median(health), 1) if health else None,
                                  "max": round(max(health), 1) if health else None, "polls": len(health)}}


def still_serving(port: int) -> bool:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions",
                                 data=json.dumps({"model": "bench", "prompt": "the", "max_tokens": 4}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status == 200 and len(json.loads(r.read())["choices"]) == 1
    except OSError:
        return False


def serve(command: list[str], port: int, cases: list[tuple[float, bool]], check_completion: bool) -> dict:
    server = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "2"})
    out = {}
    try:
        wait_healthy(port)
        for mb, chunked in cases:
            key = f"{mb:.3g}mb_{'chunked' if chunked else 'content_length'}"
            out[key] = attack(server.pid, port, token_body(mb), chunked)
            if check_completion:
                out[key]["still_serving"] = still_serving(port)
            print(f"  {key}: {json.dumps(out[key])}", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return out


def post(port: int, body: dict, timeout: float = 120) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def slow_clients(port: int, n: int = 300, seconds: float = 40.0) -> list[int]:
    """n clients that send their headers, then their body a byte a second: how many the server cut off."""
    socks = []
    for _ in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n")
            socks.append(s)
        except OSError:
            pass
    cut = [0] * len(socks)
    t0 = time.time()
    while time.time() - t0 < seconds and not all(cut):
        for i, s in enumerate(socks):
            if not cut[i]:
                try:
                    s.sendall(b" ")
                except OSError:
                    cut[i] = 1
        time.sleep(1.0)
    for s in socks:
        s.close()
    return [len(socks), sum(cut)]


def disconnecting_clients(port: int, n: int = 16) -> list[int]:
    """n non-streaming requests for long completions whose clients hang up after 0.3 s."""
    body = json.dumps({"model": "bench", "prompt": "the", "max_tokens": 120, "temperature": 1.0}).encode()
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        socks.append(s)
    time.sleep(0.3)
    for s in socks:
        s.close()
    time.sleep(3.0)  # the probe measures while the server frees their rows
    return [n]


HOSTILE = {  # name -> the attack, returning the statuses (or counts) it saw
    "stop_100k_strings": lambda port: [post(port, {"model": "bench", "prompt": "the", "max_tokens": 4, "n": 16,
                                                    "stop": [f"s{i}" for i in range(100_000)]})],
    "stop_300k_integers": lambda port: [post(port, {"model": "bench", "prompt": "the", "max_tokens": 4,
                                                     "stop": [1] * 300_000})],
    "logit_bias_60k": lambda port: [post(port, {"model": "bench", "prompt": "the", "max_tokens": 4,
                                                 "logit_bias": {str(i): 1 for i in range(60_000)}})],
    "prompt_500k_spaces": lambda port: [post(port, {"model": "bench", "prompt": " " * 500_000, "max_tokens": 1})],
    "echo_flood_40x8": lambda port: sorted(ThreadPoolExecutor(40).map(
        lambda _: post(port, {"model": "bench", "prompt": ["the cat sat " * 11] * 8, "max_tokens": 0, "echo": True,
                              "logprobs": 2}), range(40))),
    "slow_bodies_300": slow_clients,
    "disconnecting_16": disconnecting_clients,
}


def health_ok(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=60) as r:
            return r.status == 200
    except OSError:
        return False


def hostile(pid: int, port: int, name: str, completions: bool = True) -> dict:
    """One hostile case while a probe sends 4-token completions (or, to a server without a model, asks
    /health) back to back: its statuses, the probe's latencies, the server's RSS growth."""
    def probe():
        t0 = time.perf_counter()
        ok = post(port, {"model": "bench", "prompt": "the", "max_tokens": 4, "temperature": 0}, timeout=60) == 200 \
            if completions else health_ok(port)
        return time.perf_counter() - t0 if ok else float("inf")

    with watching(pid, probe) as seen:
        time.sleep(0.5)
        t0 = time.perf_counter()
        statuses = HOSTILE[name](port)
        seconds = time.perf_counter() - t0
        time.sleep(0.5)
    latency, peak, idle = seen["probes"], seen["peak"], seen["idle"]
    lat = sorted(latency)
    return {"statuses": statuses, "attack_seconds": round(seconds, 2), "probe_requests": len(lat),
            "probe_p50_s": round(lat[len(lat) // 2], 4), "probe_p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 4),
            "probe_max_s": round(lat[-1], 4), "rss_growth_mb": round(peak - idle, 1),
            "still_serving": still_serving(port) if completions else health_ok(port)}


def hostile_run(folder: Path) -> Path:
    """serve.make_run's model, its tokenizer normalising like `--normalize sst` (the whitespace case)."""
    from gptn.checkpoint import load_model, save_checkpoint
    from gptn.normalize import STEPS
    model, tok = load_model(make_run(folder))
    save_checkpoint(folder / "hostile", model.config, model.state_dict(), tokenizer=tok.with_normalization(STEPS))
    return folder / "hostile"


def hostile_cases(command: list[str], port: int, names: list[str], completions: bool = True) -> dict:
    server = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "2"})
    out = {}
    try:
        wait_healthy(port)
        if completions:  # warm-up: a full batch once, so that each case's growth is its own, not the first batch's
            idle = rss_mb(server.pid)
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda _: post(port, {"model": "bench", "prompt": "the", "max_tokens": 16}), range(16)))
            out["warmup_16_rows"] = {"rss_growth_mb": round(rss_mb(server.pid) - idle, 1)}
            print(f"  warm-up, 16 concurrent requests: RSS +{out['warmup_16_rows']['rss_growth_mb']} MB", flush=True)
        for name in names:
            out[name] = hostile(server.pid, port, name, completions)
            print(f"  {name}: {json.dumps(out[name])}", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", default="10,100")
    ap.add_argument("--peer-mb", default="10,100", help="body sizes sent to the plain FastAPI peer (empty: skip)")
    ap.add_argument("--skip-hostile", action="store_true", help="only the large bodies")
    args = ap.parse_args()
    below_cap = (default_max_body(N_CTX) - 1024) / 2**20
    sizes = [below_cap] + [float(x) for x in args.sizes_mb.split(",")]
    peer_sizes = [float(x) for x in args.peer_mb.split(",") if x]
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp))
        port = free_port()
        print("gptn serve:", flush=True)
        gptn = serve([sys.executable, "-m", "gptn", "serve", str(run), "--port", str(port), "--model-name", "bench"],
                     port, [(mb, chunked) for mb in sizes for chunked in (False, True)], check_completion=True)
        hostile_gptn = hostile_peer = {}
        if not args.skip_hostile:
            port = free_port()
            print("gptn serve, hostile requests:", flush=True)
            hostile_gptn = hostile_cases([sys.executable, "-m", "gptn", "serve", str(hostile_run(Path(tmp))), "--port",
                                          str(port), "--model-name", "bench"], port, list(HOSTILE))
    peer = {}
    if peer_sizes:
        port = free_port()
        print("plain FastAPI endpoint (await request.json()):", flush=True)
        peer = serve([sys.executable, "-c", PEER_APP, str(port)], port, [(mb, False) for mb in peer_sizes], check_completion=False)
    if not args.skip_hostile:
        port = free_port()
        print("plain FastAPI endpoint, slow clients:", flush=True)
        hostile_peer = hostile_cases([sys.executable, "-c", PEER_APP, str(port)], port, ["slow_bodies_300"],
                                     completions=False)
    rows = [(f"{who}: {key}", r["status"], f"{r['time_to_4xx_s']:.3f}", r["idle_rss_mb"], r["peak_rss_mb"],
             r["rss_growth_mb"], r["health_latency_ms"]["max"], r.get("still_serving", "-"))
            for who, res in (("gptn", gptn), ("peer", peer)) for key, r in res.items()]
    print(table(rows, ("server: body", "status", "to 4xx s", "idle MB", "peak MB", "growth MB", "health max ms",
                       "serves after")))
    worst = max(gptn.values(), key=lambda r: r["rss_growth_mb"])
    results = {
        "gptn": gptn, "peer_fastapi_request_json": peer,
        "max_time_to_4xx_s": max(r["time_to_4xx_s"] for r in gptn.values()),
        "max_rss_growth_mb": worst["rss_growth_mb"],
        "targets": {"time_to_4xx_s": "< 1", "rss_growth_mb": "< 100"},
        "targets_met": all(r["time_to_4xx_s"] < 1 and r["rss_growth_mb"] < 100 and 400 <= r["status"] < 500
                           and r["still_serving"] for r in gptn.values()),
        "hostile": hostile_gptn, "hostile_peer_fastapi": hostile_peer,
        "hostile_targets": {"probe_p99_s": "<= 0.5", "rss_growth_mb": "<= 100", "statuses": "4xx or 200, never 5xx"},
        "hostile_targets_met": all(r["probe_p99_s"] <= 0.5 and r["rss_growth_mb"] <= 100 and r["still_serving"]
                                   and all(not 500 <= x < 600 for x in r["statuses"])
                                   for name, r in hostile_gptn.items() if name in HOSTILE) if hostile_gptn else None,
        "hostile_setup": "each case after a warm-up batch of 16 concurrent requests (warmup_16_rows: the server's "
                         "first full batch commits its pages once); the probe: 4-token completions back to back",
        "setup": f"gptn serve with its default --max-body (from n_ctx), a 4 x 256 model with context {N_CTX}; bodies of "
                 "token ids `1, 1, ...`; the peer is FastAPI + uvicorn reading the whole body with request.json()",
        "machine": machine()}
    if hostile_gptn:
        print(table([(f"{who}: {name}", " ".join(map(str, r["statuses"][:6])), r["probe_p99_s"], r["probe_max_s"],
                      r["rss_growth_mb"], r["still_serving"])
                     for who, res in (("gptn", hostile_gptn), ("peer", hostile_peer)) for name, r in res.items()
                     if name in HOSTILE],
                    ("server: case", "statuses", "probe p99 s", "probe max s", "RSS growth MB", "serves after")))
    print(f"wrote {write_results('abuse', results)}")


if __name__ == "__main__":
    main()
