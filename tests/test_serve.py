import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("fastapi", reason="the server is the `serve` extra (in dev)")
openai = pytest.importorskip("openai", reason="the openai client is in the dev extra")
import uvicorn  # noqa: E402

from gptn.generate import generate  # noqa: E402
from gptn.sampling import SamplingConfig  # noqa: E402
from gptn.serve import create_app, uvicorn_config  # noqa: E402
from conftest import hold  # noqa: E402

KEY = "sk-test"


def _start(app, **limits):
    """Serve `app` on a free port in a thread, configured as `gptn serve` configures uvicorn."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port, log_level="error", **limits))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            return server, port
        time.sleep(0.05)
    raise RuntimeError("server did not start")


@pytest.fixture(scope="module")
def server(model, tok):
    app = create_app(model, tok, model_name="tiny", api_key=KEY)
    srv, port = _start(app)
    yield app, port
    srv.should_exit = True


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server[1]}/v1", api_key=KEY, max_retries=0)


def raw(port, body, key=KEY, path="/v1/completions"):
    """(status, parsed JSON body) of a raw POST."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_greedy_completion_equals_gptn_generate(client, model, tok):
    r = client.completions.create(model="tiny", prompt="the cat", max_tokens=12, temperature=0)
    want = generate(model, tok, ["the cat"], SamplingConfig(max_new_tokens=12, greedy=True))[0][0]
    assert r.choices[0].text == want
    assert r.usage.prompt_tokens == 7 and r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_streamed_completion_equals_the_plain_one_and_ends_with_done(client, server):
    plain = client.completions.create(model="tiny", prompt="a b", max_tokens=15, temperature=0).choices[0].text
    chunks = list(client.completions.create(model="tiny", prompt="a b", max_tokens=15, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain
    req = urllib.request.Request(f"http://127.0.0.1:{server[1]}/v1/completions",
                                 data=json.dumps({"prompt": "a", "max_tokens": 3, "stream": True}).encode(),
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        events = [ln for ln in r.read().decode().split("\n") if ln.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


def test_n_seed_and_several_prompts(client):
    r = client.completions.create(model="tiny", prompt=["ab", "a longer prompt"], max_tokens=8, n=3, seed=5,
                                  temperature=1.0)
    assert [c.index for c in r.choices] == list(range(6))
    again = client.completions.create(model="tiny", prompt=["ab", "a longer prompt"], max_tokens=8, n=3, seed=5,
                                      temperature=1.0)
    assert [c.text for c in r.choices] == [c.text for c in again.choices]  # a seed reproduces
    assert len({c.text for c in r.choices[:3]}) > 1  # and the n samples of a prompt still differ


def test_stop_strings_are_cut_and_reported(client, model, tok):
    full = generate(model, tok, ["the "], SamplingConfig(max_new_tokens=20, greedy=True))[0][0]
    stop = full[3:5]
    r = client.completions.create(model="tiny", prompt="the ", max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_logprobs_and_echo_match_the_model(client, model, tok):
    r = client.completions.create(model="tiny", prompt="the cat", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    ids = tok.encode("the cat")
    with torch.no_grad():
        first = F.log_softmax(model(torch.tensor([ids]))[0, -1], -1)
    assert lp.tokens[0] == tok.decode([int(first.argmax())])
    assert lp.token_logprobs[0] == pytest.approx(first.max().item(), abs=1e-4)
    assert len(lp.top_logprobs[0]) == 2 and len(lp.token_logprobs) == 4
    # echo + logprobs, no new tokens: what lm-evaluation-harness's local-completions asks for
    e = client.completions.create(model="tiny", prompt="the cat", max_tokens=0, echo=True, logprobs=1)
    got = e.choices[0].logprobs.token_logprobs
    with torch.no_grad():
        lps = F.log_softmax(model(torch.tensor([ids]))[0], -1)
    want = [lps[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    assert e.choices[0].text == "the cat" and got[0] is None and got[1:] == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    ({"prompt": "a", "max_tokens": "many"}, 400, "max_tokens"),  # a wrong type: 400, as OpenAI answers
    ({"prompt": "a", "max_tokens": 10_000}, 400, "max_tokens"),
    ({"prompt": "a", "max_tokens": True}, 400, "max_tokens"),  # not 1
    ({"prompt": "a", "stream": "yes"}, 400, "stream"),
    ({"prompt": "a" * 60}, 400, "prompt"),  # longer than the context: code context_length_exceeded
    ({"prompt": "a", "logit_bias": {"\u00b2": 1}}, 400, "logit_bias"),  # "²".isdigit(), but not an int
    ({"prompt": "a", "logit_bias": {"9" * 4300: 1}}, 400, "logit_bias"),  # too many digits for int()
    ({"prompt": "a", "logit_bias": {str(i): "x" for i in range(60_000)}}, 400, "logit_bias"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),  # OpenAI allows 4
    ({"prompt": "a", "stop": [1] * 300_000}, 400, "stop"),
    ({"prompt": "a", "stop": ""}, 400, "stop"),  # would end every completion at once
    ({"prompt": "a", "stop": "x" * 257}, 400, "stop"),
    ({"prompt": "a", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "a", "temperature": -1}, 400, "temperature"),
    ({"prompt": [99999]}, 400, "prompt"),
    ({"prompt": "caf\u00e9 \U0001f600 \u0000"}, 400, "prompt"),  # outside the character tokenizer's alphabet
    (b'{"prompt": "a", "temperature": NaN}', 400, None),
    ({"prompt": "a", "seed": 2**70}, 400, None),
    ({"prompt": ["a"] * 1000, "n": 16}, 400, "prompt"),  # 16,000 completions in one request
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, body, status, param):
    t0 = time.perf_counter()
    code, err = raw(server[1], body)
    assert time.perf_counter() - t0 < 1.0  # bounded before it is materialised
    assert code == status and set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["param"] == param and err["error"]["message"]
    assert raw(server[1], {"prompt": "ok", "max_tokens": 2})[0] == 200


def test_a_stream_ends_with_usage_only_when_asked_for(client):
    texts = [c.choices[0].text for c in client.completions.create(model="tiny", prompt="a b", max_tokens=6,
                                                                   temperature=0, stream=True)]
    assert len("".join(texts)) > 0  # the loop clients write: every chunk has a choice
    chunks = list(client.completions.create(model="tiny", prompt="a b", max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert "".join(c.choices[0].text for c in chunks[:-1]) == "".join(texts)


def test_sampling_parameters_clients_send_are_honoured(client, model, tok):
    def text(**kw):
        return client.completions.create(model="tiny", prompt="the cat", max_tokens=12, **kw).choices[0].text

    # logit_bias +100 on one token makes it the only one greedy decoding can pick (the openai client
    # sends it as JSON, keys as strings).
    z = tok.encode("z")[0]
    assert text(temperature=0, logit_bias={str(z): 100}) == "z" * 12
    # frequency_penalty 2: each use of a token costs it 2 logits, so greedy output stops repeating
    # what it repeats without the penalty (the plain greedy answer repeats a character).
    plain, penalised = text(temperature=0), text(temperature=0, frequency_penalty=2.0)
    assert max(map(plain.count, set(plain))) > max(map(penalised.count, set(penalised)))
    want = generate(model, tok, ["the cat"], SamplingConfig(max_new_tokens=12, greedy=True, presence_penalty=1.5))[0][0]
    assert text(temperature=0, presence_penalty=1.5) == want
    # top_k=1 sampling (vLLM's extra field) is greedy whatever the temperature and seed.
    assert text(temperature=1.5, seed=3, extra_body={"top_k": 1}) == plain


@pytest.mark.parametrize("body, param", [
    ({"prompt": "a", "max_tokens": 2, "top_n": 3}, "top_n"),  # a parameter the server does not know
    ({"prompt": "a", "suffix": "b"}, "suffix"),
    ({"prompt": "a", "logit_bias": {"99999": 5}}, "logit_bias"),
    ({"prompt": "a", "logit_bias": {"3": 500}}, "logit_bias"),
    ({"prompt": "a", "frequency_penalty": 3}, "frequency_penalty"),
    ({"prompt": "a", "top_k": -5}, "top_k"),
])
def test_a_parameter_the_server_cannot_honour_is_a_400_naming_it(server, body, param):
    code, err = raw(server[1], body)
    assert code == 400 and err["error"]["param"] == param and param in err["error"]["message"]


def test_chat_and_unknown_routes_get_openai_errors(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert "/v1/completions" in e.value.body["message"]
    code, err = raw(server[1], {"prompt": "a"}, path="/v1/embeddings")
    assert code == 404 and err["error"]["type"] == "not_found_error"
    assert raw(server[1], {"prompt": "ok", "max_tokens": 2})[0] == 200


def test_a_huge_body_is_refused_before_it_is_parsed(model, tok):
    import resource
    app = create_app(model, tok, model_name="tiny", max_body=100_000)
    srv, port = _start(app)
    try:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        body = json.dumps({"prompt": [1] * 5_000_000}).encode()  # 15 MB of token ids
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as s:  # a declared length: refused before the body
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:65536])
            answer = b""
            while b"--max-body" not in answer and (part := s.recv(4096)):
                answer += part
            answer = answer.decode()
        assert answer.startswith("HTTP/1.1 413") and "--max-body" in answer and time.perf_counter() - t0 < 2
        # the same without a declared length (chunked transfer)
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n")
            try:
                for i in range(0, len(body), 65536):
                    piece = body[i:i + 65536]
                    s.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered and closed before the whole body was sent
            assert b"413" in s.recv(64)
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: < 100 MB
        assert raw(port, {"prompt": "ok", "max_tokens": 2}, key=None)[0] == 200
    finally:
        srv.should_exit = True


def test_the_largest_body_allowed_is_validated_in_one_pass():
    # 1 MiB (the default --max-body at n_ctx 128) holds 350k token ids; validating them against a union of
    # four list types kept an error per element per branch: 85 MB for one request. A fresh process, so
    # its peak RSS is this validation's.
    code = """
import json, sys
from gptn.serve import CompletionRequest
from pydantic import ValidationError
hwm = lambda: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
ids, mixed = json.loads("[" + "1, " * 349_000 + "1]"), json.loads("[" + "1, " * 349_000 + '"a"]')
before = hwm()
assert len(CompletionRequest.model_validate({"prompt": ids}).prompt) == 349_001
try:
    CompletionRequest.model_validate({"prompt": mixed})
    sys.exit("a list of ids and strings was accepted")
except ValidationError as e:
    assert len(e.errors()) == 1 and e.errors()[0]["loc"] == ("prompt",), e.errors()[:3]
print(hwm() - before)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) < 20_000  # KiB


def test_api_key_is_required(server):
    code, err = raw(server[1], {"prompt": "a"}, key=None)
    assert code == 401 and err["error"]["type"] == "authentication_error"
    assert raw(server[1], {"prompt": "a"}, key="wrong")[0] == 401
    with urllib.request.urlopen(f"http://127.0.0.1:{server[1]}/health", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"  # health needs no key
    for path in ("/docs", "/redoc", "/openapi.json"):  # the API description is behind the key too
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{server[1]}{path}", timeout=10)
        assert e.value.code == 401


def test_client_disconnecting_mid_stream_does_not_hurt_the_server(server):
    body = json.dumps({"prompt": "a", "max_tokens": 40, "stream": True, "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", server[1])) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode() +
                  b"\r\n\r\n" + body)
        assert b"200" in s.recv(64)
    code, r = raw(server[1], {"prompt": "still here", "max_tokens": 3})
    assert code == 200 and len(r["choices"]) == 1


def test_concurrent_requests_are_batched_and_equal_single_requests(model, tok):
    app = create_app(model, tok, model_name="tiny")
    srv, port = _start(app)
    try:
        prompts = [f"prompt {'x' * i}" for i in range(8)]
        single = [generate(model, tok, [p], SamplingConfig(max_new_tokens=16, greedy=True))[0][0] for p in prompts]
        with ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(lambda p: raw(port, {"prompt": p, "max_tokens": 16, "temperature": 0}, key=None),
                                 prompts))
        assert [o[1]["choices"][0]["text"] for o in outs] == single
        assert app.state.engine.largest_batch > 1  # several requests shared a step
    finally:
        srv.should_exit = True


def test_lm_eval_local_completions_equals_the_in_process_model(tmp_path, model, tok):
    """lm-evaluation-harness's `local-completions` (echo + logprobs over HTTP, remote tokenizer)
    scores a local task exactly as the in-process GptnLM does."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is in the dev extra")
    from lm_eval.tasks import TaskManager

    from gptn.integrations.lm_eval import GptnLM
    rows = [{"q": f"the {w} is", "choices": [" cat", " dog", " sun"], "label": i % 3}
            for i, w in enumerate(["cat", "dog", "sun", "moon", "tree", "fish"])]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "t.yaml").write_text(f"""task: gptn_http_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'test.jsonl'}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    srv, port = _start(create_app(model, tok, model_name="tiny"))  # the harness's local model sends no key
    try:
        http = lm_eval.simple_evaluate(
            model="local-completions", tasks=["gptn_http_mc"], task_manager=manager, bootstrap_iters=0,
            model_args={"base_url": f"http://127.0.0.1:{port}/v1/completions", "model": "tiny",
                        "tokenizer_backend": "remote", "num_concurrent": 1, "max_retries": 1})
    finally:
        srv.should_exit = True
    local = lm_eval.simple_evaluate(model=GptnLM(model=model, tokenizer=tok), tasks=["gptn_http_mc"],
                                    task_manager=manager, bootstrap_iters=0)
    assert http["results"]["gptn_http_mc"]["acc,none"] == local["results"]["gptn_http_mc"]["acc,none"]
    # and the log-likelihoods themselves agree
    h = sorted(http["samples"]["gptn_http_mc"], key=lambda s: s["doc_id"])
    g = sorted(local["samples"]["gptn_http_mc"], key=lambda s: s["doc_id"])
    for a, b in zip(h, g):
        assert [x[0] for x in a["filtered_resps"]] == pytest.approx([x[0] for x in b["filtered_resps"]], abs=1e-3)


def _metric(port, name, key=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                 headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        text = r.read().decode()
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_a_full_queue_answers_429_and_the_server_keeps_serving(model, tok):
    app = create_app(model, tok, model_name="tiny", max_queue=2)
    srv, port = _start(app)
    engine = app.state.engine
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    try:
        release = hold(engine)
        with ThreadPoolExecutor(2) as pool:
            queued = [pool.submit(raw, port, {"prompt": p, "max_tokens": 4}, None) for p in ("a", "b")]
            while engine.waiting < 2:
                time.sleep(0.01)
            code, body = raw(port, {"prompt": "c", "max_tokens": 4}, key=None)
            assert code == 429 and body["error"]["type"] == "rate_limit_error" and "--max-queue 2" in body["error"]["message"]
            with pytest.raises(openai.RateLimitError):
                client.completions.create(model="tiny", prompt="d", max_tokens=2)
            # echo's prompt scoring waits for the queue check: the held engine could not have scored it
            code, body = raw(port, {"prompt": "c" * 40, "max_tokens": 0, "echo": True, "logprobs": 2}, key=None)
            assert code == 429 and body["error"]["code"] == "queue_full"
            release.set()
            assert [f.result()[0] for f in queued] == [200, 200]
        assert client.completions.create(model="tiny", prompt="e", max_tokens=2).choices[0].text is not None
        assert _metric(port, "gptn_requests_rejected_total") == 3
        assert _metric(port, "gptn_requests_waiting") == 0
    finally:
        srv.should_exit = True


def test_clients_that_go_away_free_their_slots(model, tok):
    """A stream closed mid-way and a plain request whose client hung up while queued are cancelled:
    the engine generates nothing more for them."""
    app = create_app(model, tok, model_name="tiny")
    srv, port = _start(app)
    engine = app.state.engine
    try:
        release = hold(engine)
        for stream in (True, False):
            body = json.dumps({"prompt": "a", "max_tokens": 48, "stream": stream}).encode()
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                time.sleep(0.2)
        time.sleep(1.0)  # the server notices within 0.5 s
        before = engine.counters["generation_tokens"]
        release.set()
        code, r = raw(port, {"prompt": "still here", "max_tokens": 3}, key=None)
        assert code == 200 and len(r["choices"]) == 1
        assert engine.counters["generation_tokens"] - before <= 3  # only the last request's tokens
        assert engine.running_rows == 0 and not engine.jobs
    finally:
        srv.should_exit = True


def test_metrics_are_prometheus_text_behind_the_key(server, client):
    app, port = server
    client.completions.create(model="tiny", prompt="count me", max_tokens=5, temperature=0)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert e.value.code == 401
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.headers["content-type"].startswith("text/plain")
        text = r.read().decode()
    assert "# TYPE gptn_time_to_first_token_seconds histogram" in text
    assert _metric(port, "gptn_requests_total", KEY) >= 1
    assert _metric(port, "gptn_generation_tokens_total", KEY) >= 5
    buckets = [line for line in text.splitlines() if line.startswith("gptn_time_to_first_token_seconds_bucket")]
    counts = [float(line.split()[-1]) for line in buckets]
    assert counts == sorted(counts) and buckets[-1].startswith('gptn_time_to_first_token_seconds_bucket{le="+Inf"}')
    assert counts[-1] == _metric(port, "gptn_time_to_first_token_seconds_count", KEY) >= 1


def test_a_completion_is_built_without_http(server, model, tok):
    """The route is a thin shell: Completions validates, runs and builds the response objects itself."""
    import asyncio

    from gptn.serve import ApiError, CompletionRequest
    service = server[0].state.completions

    async def run(**body):
        completion = await service.start(CompletionRequest(model="tiny", **body))
        if body.get("stream"):
            return [chunk async for chunk in completion.sse()]
        return await completion.result()

    out = asyncio.run(run(prompt="ab", max_tokens=6, temperature=0, logprobs=1, echo=True))
    (want,) = generate(model, tok, ["ab"], SamplingConfig(max_new_tokens=6, greedy=True))
    assert out["choices"][0]["text"] == "ab" + want[0]
    lp = out["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and len(lp["tokens"]) == len(tok.encode("ab" + want[0]))
    assert out["usage"]["completion_tokens"] == 6
    events = asyncio.run(run(prompt="ab", max_tokens=6, temperature=0, stream=True))
    assert events[-1] == "data: [DONE]\n\n"
    assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]) == want[0]
    with pytest.raises(ApiError) as bad:
        asyncio.run(run(prompt="ab", top_p=0))
    assert bad.value.param == "top_p" and bad.value.status == 400


def test_a_prompt_of_exactly_n_ctx_tokens(server, client, model, tok):
    """The one context-length rule: n_ctx tokens can be scored whole (echo), not continued; the server,
    the engine and `generate` agree, and no token is silently dropped."""
    n_ctx = model.config.n_ctx
    ids = [tok.encode("a")[0]] * (n_ctx - 1) + [tok.encode("b")[0]]
    code, err = raw(server[1], {"prompt": ids, "max_tokens": 1})
    assert code == 400 and err["error"]["code"] == "context_length_exceeded" and err["error"]["param"] == "prompt"
    e = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert len(e.choices[0].logprobs.token_logprobs) == n_ctx  # every token, the first one included
    c = client.completions.create(model="tiny", prompt=ids[1:], max_tokens=1, temperature=0)
    expected = generate(model, tok, [tok.decode(ids[1:])], SamplingConfig(max_new_tokens=1, greedy=True))[0][0]
    assert c.choices[0].text == expected
    with pytest.raises(openai.BadRequestError) as info:  # what the client raises: not a bare APIStatusError
        client.completions.create(model="tiny", prompt=ids, max_tokens=1)
    assert info.value.code == "context_length_exceeded"


def test_detect_endpoint_gives_gltr_ranks_off_the_event_loop(server, model, tok):
    from gptn.detect import token_stats
    code, body = raw(server[1], {"text": "the cat sat"}, path="/v1/detect")
    stats = token_stats(model, tok, "the cat sat")
    assert code == 200 and [t["rank"] for t in body["tokens"]] == stats.ranks
    assert 0 <= body["machine_probability"] <= 1 and set(body["features"]) >= {"top10", "rest"}
    assert raw(server[1], {"text": ""}, path="/v1/detect")[0] == 400
    assert raw(server[1], {"text": 5}, path="/v1/detect")[0] == 400


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes) -> float | None:
    """Send `trickle` a byte at a time (0.2 s apart) until the server closes the socket: the seconds that
    took, or None if it was still open after `seconds`."""
    t0 = time.time()
    sock.settimeout(0.2)
    for i in range(10 ** 6):
        if time.time() - t0 > seconds:
            return None
        try:
            sock.sendall(trickle[i % len(trickle):i % len(trickle) + 1])
            if sock.recv(1024) == b"":
                return time.time() - t0
        except socket.timeout:
            continue
        except OSError:  # reset or broken pipe: closed
            return time.time() - t0


def test_slow_clients_are_cut_off_and_the_server_keeps_serving(model, tok):
    """A client sending its headers, or its body, a byte at a time is disconnected once the request
    deadline passes (uvicorn alone would hold it for ever); meanwhile and afterwards others are served,
    a keep-alive connection may take longer than the deadline between requests, and beyond
    --max-connections new connections get 503."""
    app = create_app(model, tok, model_name="tiny")
    srv, port = _start(app, request_seconds=1.0, max_connections=8)
    try:
        headers = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        with socket.create_connection(("127.0.0.1", port)) as slow_headers:
            took = _closed_within(slow_headers, 6, headers)
        assert took is not None and 0.8 < took < 4, took
        with socket.create_connection(("127.0.0.1", port)) as slow_body:
            slow_body.sendall(headers + b"Content-Length: 500\r\n\r\n")
            took = _closed_within(slow_body, 6, b'{"prompt": "' + b"a" * 480)
        assert took is not None and 0.8 < took < 4, took
        status, body = raw(port, {"model": "tiny", "prompt": "ab", "max_tokens": 2}, key=None)
        assert status == 200 and len(body["choices"]) == 1
        # a kept-alive connection idle longer than the request deadline serves its next request
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for _ in range(2):
            conn.request("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "ab", "max_tokens": 2}),
                         {"Content-Type": "application/json"})
            answer = conn.getresponse()
            assert answer.status == 200 and json.loads(answer.read())["choices"]
            time.sleep(1.5)
        conn.close()
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
        try:
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10)
            assert refused.value.code == 503
        finally:
            for c in idle:
                c.close()
        time.sleep(1.5)  # the idle ones were cut off at the deadline anyway
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            assert r.status == 200
    finally:
        srv.should_exit = True
