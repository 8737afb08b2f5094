"""Fuzzing the two boundaries users type into: the command line's numeric flags and /v1/completions
bodies. Whatever comes in, the answer is exit 0 or 2 with one stderr line (CLI), or a 2xx / an OpenAI
error object with a live server afterwards (HTTP) — never a traceback or a 500."""

import json
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gptn.cli import main
from test_cli_input import corpus, run  # noqa: F401  # the same small corpus and run

NUMBERS = st.one_of(
    st.integers(min_value=-2**70, max_value=2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "0x10", "", " ", "1,5", "true", "½", "--", "1_000"]),
    st.text(max_size=6))


def _arg(value) -> str:
    return value if isinstance(value, str) else repr(value) if isinstance(value, float) else str(value)


def _exit_0_or_one_line(code, capsys):
    err = capsys.readouterr().err.strip()
    assert code in (0, 2), err
    if code == 2:
        assert err.count("\n") == 0 and "Traceback" not in err and "error" in err, err


PRETRAIN_FLAGS = ["--lr", "--min-lr", "--steps", "--batch-tokens", "--micro-batch", "--warmup-steps", "--grad-clip",
                  "--max-seconds", "--eval-interval", "--eval-batches", "--checkpoint-interval", "--seed",
                  "--weight-decay", "--muon-lr"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flag=st.sampled_from(PRETRAIN_FLAGS), value=NUMBERS)
def test_pretrain_numeric_flags(corpus, tmp_path_factory, capsys, flag, value):
    # Valid but large amounts of work (a billion-token batch, a million evaluation batches) are not mistakes.
    big = {"--batch-tokens": 2**14, "--micro-batch": 64, "--eval-batches": 8, "--steps": 4}
    assume(not (flag in big and isinstance(value, int) and value > big[flag]))
    out = tmp_path_factory.mktemp("r") / "run"
    # --steps 1 unless the flag under test is --steps; --max-seconds 3 keeps a huge --steps ("1_000" is an int) short.
    fixed = [] if flag == "--steps" else ["--steps", "1"]
    argv = ["pretrain", str(corpus), "--out", str(out), "--preset", "tiny", "--no-progress", "--eval-batches", "1",
            *fixed, flag, _arg(value)]
    if flag != "--max-seconds":
        argv += ["--max-seconds", "3"]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: a value that is not a number at all (one usage line + one error line)
        code = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err[-1].startswith("gptn pretrain: error:"), err
        return
    _exit_0_or_one_line(code, capsys)


GENERATE_FLAGS = ["--temperature", "--top-k", "--top-p", "--repetition-penalty", "--max-new-tokens", "--seed",
                  "--num-samples"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flag=st.sampled_from(GENERATE_FLAGS), value=NUMBERS)
def test_generate_numeric_flags(run, capsys, flag, value):
    # A valid but huge count of tokens or samples is a request for that much work, not a mistake.
    assume(not (flag in ("--max-new-tokens", "--num-samples") and isinstance(value, int) and value > 64))
    argv = ["generate", str(run), "--prompt", "the ", flag, _arg(value)]
    if flag != "--max-new-tokens":
        argv += ["--max-new-tokens", "4"]
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err[-1].startswith("gptn generate: error:"), err
        return
    _exit_0_or_one_line(code, capsys)


# --- HTTP ---------------------------------------------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
                    | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)
FIELDS = ["prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stop", "seed", "logprobs", "echo",
          "presence_penalty", "frequency_penalty", "logit_bias", "repetition_penalty", "best_of", "model",
          "stream_options", "user", "suffix", "nonsense"]
VALUES = st.one_of(JSON, st.sampled_from([0, 1, 2, 16, 47, 48, 100, -1, 2**63, 1e308, "a b", ["a", "b"], [1, 2, 3],
                                          [[1], [2]], {"1": 5}, {"include_usage": True}]))


@pytest.fixture(scope="module")
def server(model, tok):
    pytest.importorskip("fastapi", reason="the server is the `serve` extra (in dev)")
    from test_serve import _start

    from gptn.serve import create_app
    srv, port = _start(create_app(model, tok, model_name="tiny", max_batch=8))
    yield port
    srv.should_exit = True


def _post(port, body: bytes, path="/v1/completions"):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=6))
def test_completions_bodies(server, body):
    raw = json.dumps(body).encode()
    status, payload = _post(server, raw)
    assert status < 500, (body, payload[:300])
    if status >= 400:
        err = json.loads(payload)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    elif not body.get("stream"):
        reply = json.loads(payload)
        assert reply["object"] == "text_completion" and reply["choices"]
    else:
        assert payload.rstrip().endswith(b"data: [DONE]")
    with urllib.request.urlopen(f"http://127.0.0.1:{server}/health", timeout=10) as r:
        assert r.status == 200


def test_non_finite_numbers_in_a_body_are_a_400(server):
    for text in ('{"prompt": "a", "temperature": Infinity}', '{"prompt": "a", "top_p": -Infinity}',
                 '{"prompt": "a", "frequency_penalty": NaN}', '{"prompt": "a", "logit_bias": {"1": NaN}}'):
        status, payload = _post(server, text.encode())
        assert status == 400 and json.loads(payload)["error"]["message"], (text, payload)
    assert _post(server, b'{"prompt": "a", "max_tokens": 1}')[0] == 200
