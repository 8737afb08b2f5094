"""One hostile request against `gptn serve`: a 10 MB and a 100 MB body of token ids, sent with a
Content-Length and streamed in chunks without one, and the largest body the server accepts (just under
its default --max-body, 1 MiB here: parsed, then refused for its length). For each: the time to the 4xx, the server's peak
and retained RSS against idle, /health latency while it lasts, and whether the server still answers
a completion afterwards. Beside it, the same 10 MB body against a plain FastAPI endpoint that parses
its body the usual way (`await request.json()`), the peer a user would otherwise write.
Targets (issue 21): 4xx within 1 s, RSS growth < 100 MB.

    python benchmarks/abuse.py [--sizes-mb 10,100] [--peer-mb 10]

Both servers run as their own processes (uvicorn, one worker) on loopback; RSS is read from
/proc/PID/status every 2 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, rss_mb, table, wait_healthy, write_results  # noqa: E402
from serve import make_run  # noqa: E402

from gptn.serve import default_max_body  # noqa: E402

MODEL_CTX = 128  # serve.make_run's model

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def attack(pid: int, port: int, body: bytes, chunked: bool) -> dict:
    """One body while sampling the server's RSS and /health latency."""
    idle = rss_mb(pid)
    peak, health, stop = [idle], [], threading.Event()

    def sample_rss():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb(pid))
            time.sleep(0.002)

    def poll_health():
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=60).read()
                health.append(1000 * (time.perf_counter() - t0))
            except OSError:
                health.append(float("inf"))
            time.sleep(0.02)

    threads = [threading.Thread(target=sample_rss), threading.Thread(target=poll_health)]
    for t in threads:
        t.start()
    seconds, status = send(port, body, chunked)
    time.sleep(0.2)  # let /health be asked once more after the answer
    stop.set()
    for t in threads:
        t.join()
    time.sleep(0.5)
    return {"status": status, "time_to_4xx_s": round(seconds, 4), "idle_rss_mb": round(idle, 1),
            "peak_rss_mb": round(peak[0], 1), "rss_growth_mb": round(peak[0] - idle, 1),
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", default="10,100")
    ap.add_argument("--peer-mb", default="10,100", help="body sizes sent to the plain FastAPI peer (empty: skip)")
    args = ap.parse_args()
    below_cap = (default_max_body(MODEL_CTX) - 1024) / 2**20
    sizes = [below_cap] + [float(x) for x in args.sizes_mb.split(",")]
    peer_sizes = [float(x) for x in args.peer_mb.split(",") if x]
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp))
        port = free_port()
        print("gptn serve:", flush=True)
        gptn = serve([sys.executable, "-m", "gptn", "serve", str(run), "--port", str(port), "--model-name", "bench"],
                     port, [(mb, chunked) for mb in sizes for chunked in (False, True)], check_completion=True)
    peer = {}
    if peer_sizes:
        port = free_port()
        print("plain FastAPI endpoint (await request.json()):", flush=True)
        peer = serve([sys.executable, "-c", PEER_APP, str(port)], port, [(mb, False) for mb in peer_sizes], check_completion=False)
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
        "setup": "gptn serve with its default --max-body (from n_ctx), a 4 x 256 model with context 128; bodies of "
                 "token ids `1, 1, ...`; the peer is FastAPI + uvicorn reading the whole body with request.json()",
        "machine": machine()}
    print(f"wrote {write_results('abuse', results)}")


if __name__ == "__main__":
    main()
