"""The continuous-batching engine behind `gptn serve`, driven directly (no HTTP): per-row sampling
settings, seeds, rows joining mid-batch, chunked prefill, cancellation and the full context."""

import threading
import time

import pytest
import torch

from gptn.config import GPTConfig
from gptn.engine import ContinuousEngine, Job
from gptn.slots import SlotCache
from gptn.generate import generate_ids
from gptn.sampling import SamplingConfig, StopWatcher
from gptn.model import GPT
from conftest import hold


class Collector:
    """A job's emitted tokens per row, and when it ended."""

    def __init__(self, rows: int, log: list | None = None, name: str = ""):
        self.tokens = [[] for _ in range(rows)]
        self.done = threading.Event()
        self.error = None
        self.log, self.name = log, name

    def __call__(self, ev):
        if "error" in ev:
            self.error = ev["error"]
            self.done.set()
        elif ev.get("done"):
            self.done.set()
        else:
            self.tokens[ev["row"]].append(ev["token"])
            if self.log is not None:
                self.log.append(self.name)


def submit(engine, tok, prompts, sampling, max_tokens, logprobs=None, log=None, name=""):
    out = Collector(len(prompts), log, name)
    job = Job([tok.encode(p) if isinstance(p, str) else p for p in prompts], sampling, max_tokens, logprobs, out,
              StopWatcher(tok, len(prompts), [], None))
    engine.submit(job)
    return job, out


def wait(*collectors, timeout=60):
    for c in collectors:
        assert c.done.wait(timeout), "the engine did not finish the job"
        assert c.error is None, c.error
    return [c.tokens for c in collectors]


@pytest.fixture(scope="module")
def engine(model, tok):
    return ContinuousEngine(model, tok, max_batch=16, prefill_chunk=256)


def alone(model, tok, prompt, sampling, max_tokens):
    """What gptn generate gives for this prompt by itself, cut after end-of-text (where a server row stops)."""
    ids = tok.encode(prompt) if isinstance(prompt, str) else prompt
    cfg = SamplingConfig(**{**sampling.__dict__, "max_new_tokens": max_tokens})
    out = generate_ids(model, [ids], cfg, pad_id=tok.eot_id)[0]
    return out[:out.index(tok.eot_id) + 1] if tok.eot_id in out else out


def no_eot(tok, **kw):
    """Greedy settings that never pick end-of-text, so a stream runs its whole length."""
    return SamplingConfig(greedy=True, logit_bias={tok.eot_id: -100}, **kw)


def test_a_seeded_request_is_the_same_alone_and_in_a_busy_mixed_batch(engine, model, tok):
    seeded = SamplingConfig(temperature=0.9, top_p=0.95, seed=1234)
    (_, a), = [submit(engine, tok, ["the cat"], seeded, 30)]
    by_itself = wait(a)[0][0]
    assert by_itself == alone(model, tok, "the cat", seeded, 30)  # gptn generate --seed agrees

    release = hold(engine)
    others = [submit(engine, tok, [p], s, n)[1] for p, s, n in [
        ("a dog", SamplingConfig(greedy=True), 12),
        ("once upon a time there was", SamplingConfig(temperature=1.3), 40),
        ("zz", SamplingConfig(temperature=0.5, top_k=3), 5),
        ("hello", SamplingConfig(temperature=0.9, top_p=0.95, seed=99), 25),
        ("the end", SamplingConfig(temperature=0.7, presence_penalty=1.0, frequency_penalty=0.5), 20),
        ("x y", SamplingConfig(temperature=1.0, repetition_penalty=1.3), 18),
    ]]
    _, b = submit(engine, tok, ["the cat"], seeded, 30)
    later = []
    release.set()
    time.sleep(0.01)
    later.append(submit(engine, tok, ["the cat"], seeded, 30)[1])  # joins while the others decode
    assert wait(b)[0][0] == by_itself
    assert wait(later[0])[0][0] == by_itself
    wait(*others)
    assert engine.largest_batch >= 4  # they did share steps


def crafted_model(tok, logits):
    """A GPT whose next-token logits are `logits` whatever the input: every weight zero but the final
    LayerNorm's bias (a unit vector) and one column of W_e (the logits, through the tied softmax)."""
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_ctx=32, n_layer=1, n_head=1, d_model=8, dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.ln_f.bias[0] = 1.0
        model.wte.weight[:, 0] = torch.tensor(logits)
    return model.eval()


def test_rows_with_different_settings_in_one_batch_each_follow_their_own(tok):
    z = [-30.0] * tok.vocab_size
    z[:4] = [2.0, 1.5, 1.0, 0.0]  # tokens 0..3; everything else (end-of-text too) out of reach
    model = crafted_model(tok, z)
    eng = ContinuousEngine(model, tok, max_batch=8)
    n = 300  # past the context of 32: the rows slide and go on
    release = hold(eng)
    settings = {"greedy": SamplingConfig(greedy=True), "top_k=2": SamplingConfig(temperature=1.0, top_k=2),
                "T=2": SamplingConfig(temperature=2.0), "T=0.25": SamplingConfig(temperature=0.25),
                "top_p=0.5": SamplingConfig(temperature=1.0, top_p=0.5)}
    runs = {name: submit(eng, tok, ["ab"], s, n)[1] for name, s in settings.items()}
    torch.manual_seed(0)  # the unseeded rows draw from torch's global generator
    release.set()
    got = {name: wait(c)[0][0] for name, c in runs.items()}
    assert eng.largest_batch == len(settings)

    def share(name, token):
        return got[name].count(token) / n

    def expected(T):
        return torch.softmax(torch.tensor(z[:4]) / T, 0).tolist()

    assert all(len(t) == n for t in got.values())
    assert set(got["greedy"]) == {0}
    assert set(got["top_k=2"]) == {0, 1}
    assert share("top_k=2", 0) == pytest.approx(torch.softmax(torch.tensor(z[:2]), 0)[0].item(), abs=0.1)
    assert set(got["top_p=0.5"]) == {0, 1}  # P(0) = 0.47 < 0.5: the nucleus is {0, 1}
    assert share("top_p=0.5", 0) == pytest.approx(0.622, abs=0.1)
    for name, T in (("T=2", 2.0), ("T=0.25", 0.25)):
        for t, p in enumerate(expected(T)):
            assert share(name, t) == pytest.approx(p, abs=4 * (p * (1 - p) / n) ** 0.5 + 0.01), (name, t)


def test_a_request_joining_mid_batch_gets_its_greedy_tokens_alone(engine, model, tok):
    greedy = no_eot(tok)
    log = []
    _, long_run = submit(engine, tok, ["a long running stream"], greedy, 40, log=log, name="long")
    while len(log) < 8:
        time.sleep(0.001)
    _, joiner = submit(engine, tok, ["the joining one"], greedy, 20, log=log, name="join")
    (long_tokens,), (join_tokens,) = wait(long_run, joiner)
    assert join_tokens == alone(model, tok, "the joining one", greedy, 20)
    assert long_tokens == alone(model, tok, "a long running stream", greedy, 40)
    first_join = log.index("join")
    assert "long" in log[first_join:]  # it joined while the long one was still decoding


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(model, tok):
    eng = ContinuousEngine(model, tok, max_batch=8, prefill_chunk=8)
    greedy = no_eot(tok)
    log = []
    _, running = submit(eng, tok, ["go on"], greedy, 40, log=log, name="run")
    while len(log) < 3:
        time.sleep(0.001)
    prompt = "a prompt of many characters, five chunks"  # 40 tokens: 5 chunks of 8
    seen = len(log)
    _, long_prompt = submit(eng, tok, [prompt], greedy, 5, log=log, name="long")
    (_,), (tokens,) = wait(running, long_prompt)
    assert tokens == alone(model, tok, prompt, greedy, 5)
    between = log[seen:log.index("long")]
    assert between.count("run") >= 4  # the running stream kept getting tokens during the prefill


@pytest.mark.parametrize("attention", ["dense", "sparse"])
def test_greedy_rows_past_the_context_equal_gptn_generate(tok, attention):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_ctx=24, n_layer=2, n_head=2, d_model=32, dropout=0.0,
                          attention=attention, sparse_band=4)).eval()
    with torch.no_grad():
        model.wte.weight.mul_(3)
    eng = ContinuousEngine(model, tok, max_batch=4)
    greedy = no_eot(tok)
    prompts = ["abc", "the quick brown fox", "z"]
    jobs = [submit(eng, tok, [p], greedy, 50)[1] for p in prompts]
    for p, c in zip(prompts, jobs):
        assert wait(c)[0][0] == alone(model, tok, p, greedy, 50)


def test_a_cancelled_request_frees_its_slot_at_the_next_step(model, tok):
    eng = ContinuousEngine(model, tok, max_batch=4)
    out = Collector(1)
    job = Job([tok.encode("cancel me")], SamplingConfig(greedy=True), 40, None, None,
              StopWatcher(tok, 1, [], None))

    def emit(ev):
        out(ev)
        if len(out.tokens[0]) == 3:
            job.cancelled = True  # as the server does when the client goes away

    job.emit = emit
    eng.submit(job)
    assert out.done.wait(30)
    assert len(out.tokens[0]) == 3
    assert not eng.running and eng.filling is None


def test_logprobs_per_row_are_the_models(engine, model, tok):
    events, done = [], threading.Event()
    job = Job([tok.encode("the")], SamplingConfig(greedy=True), 1, 2,
              lambda ev: done.set() if ev.get("done") else events.append(ev), StopWatcher(tok, 1, [], None))
    engine.submit(job)
    assert done.wait(30)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([tok.encode("the")]))[0, -1], -1)
    (ev,) = events
    assert ev["token"] == int(lp.argmax()) and ev["length"]
    assert ev["info"][0] == pytest.approx(lp.max().item(), abs=1e-4)
    assert [i for i, _ in ev["info"][1]] == lp.topk(2).indices.tolist()


def test_the_static_engine_kept_for_comparison_serves_seeded_and_greedy_requests(model, tok):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from static_engine import StaticEngine  # benchmarks/serve.py's baseline
    eng = StaticEngine(model, tok, max_batch=8)
    seeded = SamplingConfig(temperature=0.9, seed=7)
    release = hold(eng)
    runs = [submit(eng, tok, [p], s, 12)[1] for p, s in
            [("the cat", seeded), ("a dog", no_eot(tok)), ("zz", no_eot(tok)), ("the cat", seeded)]]
    release.set()
    (a,), (b,), (c,), (d,) = wait(*runs)
    assert a == d == alone(model, tok, "the cat", seeded, 12)  # a seeded request runs alone, reproducibly
    assert b == alone(model, tok, "a dog", no_eot(tok), 12) and c == alone(model, tok, "zz", no_eot(tok), 12)
    assert eng.largest_batch == 2  # the two greedy requests shared a batch


def test_a_half_precision_model_serves(tok):
    # gptn serve --dtype bf16 on CUDA (or a CPU without fbgemm) hands the engine a bf16 model: its slot
    # cache takes the model's dtype, and a greedy row gets what gptn generate gives the same model.
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_ctx=32, n_layer=2, n_head=2, d_model=32, dropout=0.0)).eval()
    model.to(torch.bfloat16)
    eng = ContinuousEngine(model, tok, max_batch=4)
    assert eng.cache.dtype == torch.bfloat16
    greedy = no_eot(tok)
    _, out = submit(eng, tok, ["the cat"], greedy, 20)
    assert wait(out)[0][0] == alone(model, tok, "the cat", greedy, 20)


def test_the_batching_key_is_derived_from_the_sampling_fields():
    """A new sampling option needs no edit of the engine's batching: rows that differ in any field but
    the per-row ones (length, stop strings, seed) never share a key — shown with a field the engine
    has never heard of."""
    import dataclasses

    @dataclasses.dataclass
    class WithNewOption(SamplingConfig):
        min_p: float = 0.0  # an option added later

    base = WithNewOption(temperature=0.7)
    assert base.batch_key() != WithNewOption(temperature=0.7, min_p=0.1).batch_key()
    for name, value in (("temperature", 0.8), ("top_k", 5), ("top_p", 0.9), ("repetition_penalty", 1.2),
                        ("presence_penalty", 0.5), ("frequency_penalty", 0.5), ("logit_bias", {3: 1.0})):
        assert dataclasses.replace(base, **{name: value}).batch_key() != base.batch_key(), name
    for name, value in (("max_new_tokens", 9), ("stop", ["x"]), ("seed", 3)):
        assert dataclasses.replace(base, **{name: value}).batch_key() == base.batch_key(), name
    assert {f.name for f in dataclasses.fields(SamplingConfig)} >= set(SamplingConfig.PER_ROW)


def test_a_flood_of_calls_is_spread_between_decode_steps(model, tok):
    """Work run on the engine thread between steps (echo's prompt scoring, /v1/detect) goes one call
    per decode step while rows decode: 40 calls of 20 ms delay a stream's next token by about one call,
    not by all of them."""
    eng = ContinuousEngine(model, tok, max_batch=4)
    times = []
    job, out = submit(eng, tok, ["ab"], SamplingConfig(greedy=True), 400)
    original = out.__call__
    out_call = lambda ev: (times.append(time.perf_counter()) if "row" in ev else None, original(ev))  # noqa: E731
    job.emit = out_call
    while len(times) < 5:
        time.sleep(0.005)
    threads = [threading.Thread(target=eng.call, args=(lambda: time.sleep(0.02),)) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    wait(out)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(times) == 400 and max(gaps) < 0.4, max(gaps)  # all 40 at once: 0.8 s or more


def test_a_request_behind_a_flood_of_calls_starts_after_one_call(model, tok):
    """With nothing decoding, a request that arrives behind 40 queued calls of 20 ms is admitted after
    one of them (its first token in well under the 0.8 s all of them take)."""
    eng = ContinuousEngine(model, tok, max_batch=4)
    release = hold(eng)
    threads = [threading.Thread(target=eng.call, args=(lambda: time.sleep(0.02),)) for _ in range(40)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while eng.inbox.qsize() < 40:
        assert time.monotonic() < deadline, f"{eng.inbox.qsize()} of 40 calls queued"
        time.sleep(0.005)
    first = []
    job, out = submit(eng, tok, ["ab"], SamplingConfig(greedy=True), 2)
    original = job.emit
    job.emit = lambda ev: (first.append(time.perf_counter()) if "row" in ev and not first else None, original(ev))
    t0 = time.perf_counter()
    release.set()
    wait(out)
    for t in threads:
        t.join(30)
    assert first and first[0] - t0 < 0.4, first[0] - t0


def _rss_mb() -> float:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) / 1024


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_slot_cache_holds_ram_only_for_what_rows_write(dtype):
    # The cache is allocated at its full size once (no growth, no copy while serving); 32 rows of 1,024
    # positions would be 256 MB in fp32, but only the pages rows write are committed.
    config = GPTConfig(vocab_size=32, n_ctx=1024, n_layer=4, n_head=4, d_model=256)
    before = _rss_mb()
    cache = SlotCache(config, 32, "cpu", dtype)
    assert cache.k.shape == (4, 32, 4, 1024, 64) and cache.k.dtype == dtype
    cache.k[:, 0, :, :10] = 1.0
    cache.v[:, 3, :, :10] = 2.0
    cache.move(3, 5, 10)
    assert _rss_mb() - before < 8
    assert cache.k.double().sum() == 4 * 4 * 10 * 64 and cache.v.double().sum() == 2 * 2 * 4 * 4 * 10 * 64
    assert not cache.k[:, 1:].any() and not cache.v[:, 6:].any()  # zeros where nothing was written
