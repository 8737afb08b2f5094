"""The engine behind `gptn serve`: one thread owns the model and runs the requests' rows through it.

ContinuousEngine schedules every step, as vLLM does (iteration-level scheduling, Orca,
OSDI'22): finished rows leave and waiting rows join at each decode step, and every row samples with
its own settings (a seeded row with its own generator, so its output does not depend on what else
runs). A joining prompt is prefilled in chunks, at most `prefill_chunk` prompt tokens per step, so a
long prompt delays the running streams by one chunk per step rather than by its whole prefill.
Keys and values live in preallocated slots (slots.SlotCache): the decoding rows hold the first slots, so a
step reads a view of the cache, and a row that leaves is replaced by one row copy (the last one).
_Engine is what an engine shares (the queue, the model thread, calls between steps, metrics); the
static engine it replaced lives in benchmarks/static_engine.py, for comparison.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .inference import decode_step
from .metrics import Histogram, prometheus_text
from .model import prompt_limit, slide_keep
from .sampling import SamplingConfig, StopWatcher, choose_tokens, logit_bias_tensor
from .scoring import score_continuations
from .slots import DecodeView, PrefillView, SlotCache

MAX_BATCH, MAX_QUEUE, PREFILL_CHUNK = 32, 128, 256  # rows decoded together, requests waiting, prompt tokens per step


class QueueFull(Exception):
    """More requests are waiting than the engine's max_queue."""


@dataclass
class Job:
    """One request's rows (prompts x n) and where their tokens go: emit(event) is called on the engine
    thread with {"row", "token", "info", "stopped", "length"} per token, {"done": True} at the end,
    or {"error": message}."""

    rows: list[list[int]]
    sampling: SamplingConfig
    max_tokens: int
    logprobs: int | None
    emit: callable
    watcher: StopWatcher = None
    cancelled: bool = False
    batch_key: tuple = ()  # the benchmark's static engine: jobs with equal keys share a batch
    submitted: float = 0.0
    first_token: float | None = None
    remaining: int = 0  # rows not finished yet


@dataclass
class _Call:
    """A plain function run on the engine thread (which owns the model)."""

    fn: callable
    done: threading.Event
    error: Exception | None = None


class _Engine:
    """What an engine has whatever its scheduling: the submission queue with its bound, prompt log-probabilities,
    per-token bookkeeping (stop strings, max_tokens, metrics) and the /metrics text."""

    def __init__(self, model, tokenizer, max_batch: int = MAX_BATCH, max_queue: int = MAX_QUEUE):
        self.model, self.tokenizer, self.max_batch, self.max_queue = model, tokenizer, max_batch, max_queue
        self.device = model.wte.weight.device
        self.inbox: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.waiting = 0  # requests submitted and not started
        self._running_rows = 0
        self.batches = 0  # passes through the model (steps), for tests and stats
        self.largest_batch = 0  # most rows in one decode step so far
        self.counters = {"requests": 0, "requests_rejected": 0, "prompt_tokens": 0, "generation_tokens": 0}
        self.ttft = Histogram((0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.token_latency = Histogram((0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.batch_size = Histogram((1, 2, 4, 8, 16, 32, 64, 128))
        self.thread = threading.Thread(target=self._loop, name="gptn-engine", daemon=True)
        self.thread.start()

    @property
    def running_rows(self) -> int:
        """Rows (completions) being decoded now."""
        return self._running_rows

    def reserve(self) -> None:
        """Hold a place in the queue (QueueFull when max_queue requests are already waiting) for a
        request that has work to do before it is submitted: a full queue refuses it before that work."""
        with self.lock:
            if self.waiting >= self.max_queue:
                self.counters["requests_rejected"] += 1
                raise QueueFull(f"{self.waiting} requests are waiting (--max-queue {self.max_queue})")
            self.waiting += 1

    def release(self) -> None:
        """Give back a place reserve() held, for a request that will not be submitted."""
        with self.lock:
            self.waiting -= 1

    def submit(self, job: Job, reserved: bool = False) -> None:
        """Queue a request (in the place reserve() held for it, if `reserved`); QueueFull when max_queue
        requests are already waiting."""
        if not reserved:
            self.reserve()
        with self.lock:
            self.counters["requests"] += 1
            self.counters["prompt_tokens"] += sum(len(r) for r in job.rows)
        job.submitted = time.perf_counter()
        job.remaining = len(job.rows)
        self.inbox.put(job)

    def _started(self, job: Job) -> None:
        with self.lock:
            self.waiting -= 1

    def _token(self, job: Job, r: int, token: int, info, produced: int, last_time: list) -> bool:
        """Book a row's new token and send it; True when the row is finished."""
        now = time.perf_counter()
        if job.first_token is None:
            job.first_token = now
            self.ttft.observe(now - job.submitted)
        elif last_time[0] is not None:
            self.token_latency.observe(now - last_time[0])
        last_time[0] = now
        self.counters["generation_tokens"] += 1
        stopped = job.watcher(r, token)
        length = not stopped and produced >= job.max_tokens
        job.emit({"row": r, "token": token, "info": info, "stopped": stopped, "length": length})
        return stopped or length

    def _stepped(self, rows: int) -> None:
        self.batches += 1
        self.batch_size.observe(rows)
        self.largest_batch = max(self.largest_batch, rows)

    def _row_done(self, job: Job) -> None:
        job.remaining -= 1
        if job.remaining == 0:
            job.emit({"done": True})

    def _prompt_logprobs(self, ids: list[int], top: int | None):
        lost = max(0, len(ids) - self.model.config.n_ctx)  # tokens before the window: no log-prob
        window = ids[lost:]
        if len(window) < 2:
            return [None] * len(ids), [None] * len(ids)
        (scored,) = score_continuations(self.model, [(window[:1], window[1:])], top=top or 0)
        return [None] * (1 + lost) + scored.logprobs, [None] * (1 + lost) + (scored.top or [None] * len(scored.logprobs))

    def prompt_logprobs(self, ids: list[int], top: int | None):
        """For echo: each prompt token's log-probability (None for the first) and its top alternatives."""
        return self.call(lambda: self._prompt_logprobs(ids, top))

    def call(self, fn):
        """fn() on the engine thread, between two steps (the model is never run by two threads at once);
        blocks the calling thread until it is done, and returns its value or raises its error."""
        out = {}
        call = _Call(lambda: out.update(value=fn()), threading.Event())
        self.inbox.put(call)
        call.done.wait()
        if call.error is not None:
            raise call.error
        return out["value"]

    def _call(self, call: _Call) -> None:
        try:
            call.fn()
        except Exception as e:  # handed to the caller; the engine goes on
            call.error = e
        finally:
            call.done.set()

    def metrics(self) -> str:
        """The engine's counters, gauges and histograms in Prometheus' text format."""
        with self.lock:
            counters, waiting = dict(self.counters), self.waiting
        return prometheus_text("gptn", [
            ("requests_total", "counter", "completion requests accepted", counters["requests"]),
            ("requests_rejected_total", "counter", "requests refused with 429 (queue full)", counters["requests_rejected"]),
            ("prompt_tokens_total", "counter", "prompt tokens of accepted requests", counters["prompt_tokens"]),
            ("generation_tokens_total", "counter", "tokens generated", counters["generation_tokens"]),
            ("steps_total", "counter", "passes through the model", self.batches),
            ("requests_waiting", "gauge", "requests queued and not started", waiting),
            ("rows_running", "gauge", "rows (completions) being decoded", self.running_rows),
            ("time_to_first_token_seconds", "histogram", "submission to first token, per request", self.ttft),
            ("time_per_output_token_seconds", "histogram", "time between a row's successive tokens", self.token_latency),
            ("batch_size", "histogram", "rows per decode step", self.batch_size),
        ])


@dataclass
class _Row:
    """One completion being served: its sequence so far and its own sampling state."""

    job: Job
    r: int  # index among the job's rows
    tokens: list[int]  # the sequence so far; the cache holds tokens[:length]
    length: int = 0
    produced: int = 0
    generator: torch.Generator | None = None
    counts: torch.Tensor | None = None  # OpenAI penalties: how often each token was generated
    bias: torch.Tensor | None = None
    last: list = field(default_factory=lambda: [None])  # time of the row's last token

    def group(self) -> tuple:
        """Rows with equal groups sample as one batch: same settings, no state of their own."""
        s = self.job.sampling
        alone = self.generator is not None or s.repetition_penalty != 1.0 or self.bias is not None
        return (s.batch_key(), self.job.logprobs, id(self) if alone else None)


class ContinuousEngine(_Engine):
    """Iteration-level scheduling over a slot cache (see the module docstring)."""

    def __init__(self, model, tokenizer, max_batch: int = MAX_BATCH, max_queue: int = MAX_QUEUE,
                 prefill_chunk: int = PREFILL_CHUNK):
        self.prefill_chunk = prefill_chunk
        self.config = model.config
        self.cache = SlotCache(model.config, max_batch, model.wte.weight.device, model.wte.weight.dtype)
        self.running: list[_Row] = []  # decoding; row i holds slot i
        self.filling: _Row | None = None  # the row being prefilled, in slot len(running)
        self.queued: deque[_Row] = deque()  # admitted rows waiting for a slot
        self.jobs: deque[Job] = deque()  # requests not started
        self.calls: deque[_Call] = deque()  # functions to run on this thread between steps (Engine.call)
        self.steps: dict[int, Callable | None] = {}  # rows -> inference.decode_step for that many
        super().__init__(model, tokenizer, max_batch, max_queue)

    @property
    def running_rows(self) -> int:
        return len(self.running)

    # -- the loop

    def _loop(self) -> None:
        while True:
            busy = self.running or self.filling or self.queued or self.jobs or self.calls
            self._take(block=not busy)
            try:
                self._drop_cancelled()
                self._admit()
                self._prefill()
                if self.running:
                    self._decode()
            except Exception as e:  # a failure must reach the waiting requests, not kill the engine
                self._fail_all(f"{type(e).__name__}: {e}")

    def _take(self, block: bool) -> None:
        while True:
            try:
                item = self.inbox.get(block=block)
            except queue.Empty:
                break
            block = False
            (self.calls if isinstance(item, _Call) else self.jobs).append(item)
        # Calls (echo's prompt scoring, /v1/detect) run one per turn of the loop, that is one per decode
        # step while rows decode and one before each admission, so that a flood of them is spread between
        # the steps, and a request arriving behind it starts after one call, not after all of them.
        if self.calls:
            self._call(self.calls.popleft())

    def _admit(self) -> None:
        """Start waiting requests while their rows fit beside the running ones (max_batch)."""
        while self.jobs:
            job = self.jobs[0]
            in_flight = len(self.running) + (self.filling is not None) + len(self.queued)
            if in_flight and in_flight + len(job.rows) > self.max_batch:
                return
            self.jobs.popleft()
            self._started(job)
            if job.cancelled:
                job.emit({"done": True})
                continue
            if job.max_tokens == 0:
                job.emit({"done": True})
                continue
            try:
                self.queued.extend(self._rows_of(job))
            except Exception as e:  # e.g. a logit bias outside the vocabulary: this request fails, not the engine
                job.emit({"error": f"{type(e).__name__}: {e}"})

    def _rows_of(self, job: Job) -> list[_Row]:
        rows, s, n_ctx = [], job.sampling, self.config.n_ctx
        for r, prompt in enumerate(job.rows):
            row = _Row(job, r, list(prompt[-prompt_limit(n_ctx, True):]))  # the server refuses longer ones
            if s.seed is not None and not s.greedy:  # the request's rows (n > 1) differ, each reproducibly
                row.generator = torch.Generator(device=self.device).manual_seed((s.seed + r) % 2**63)
            if s.presence_penalty or s.frequency_penalty:
                row.counts = torch.zeros(self.config.vocab_size, device=self.device)
            row.bias = logit_bias_tensor(s, self.config.vocab_size, self.device)
            rows.append(row)
        return rows

    def _drop_cancelled(self) -> None:
        for i in reversed(range(len(self.running))):
            if self.running[i].job.cancelled:
                self._release(i)
        if self.filling is not None and self.filling.job.cancelled:
            self._row_done(self.filling.job)
            self.filling = None
        for row in [row for row in self.queued if row.job.cancelled]:
            self.queued.remove(row)
            self._row_done(row.job)
        for job in [job for job in self.jobs if job.cancelled]:
            self.jobs.remove(job)
            self._started(job)
            job.emit({"done": True})

    def _release(self, i: int, finished: bool = True) -> None:
        """Row i leaves its slot: the last running row moves into it, the row being prefilled after it."""
        row = self.running[i]
        last = len(self.running) - 1
        if i != last:
            moved = self.running[last]
            self.cache.move(last, i, moved.length)
            self.running[i] = moved
        self.running.pop()
        if self.filling is not None and self.filling.length:
            self.cache.move(last + 1, last, self.filling.length)
        if finished:
            self._row_done(row.job)

    def _fail_all(self, message: str) -> None:
        jobs = {id(r.job): r.job for r in [*self.running, *self.queued, *([self.filling] if self.filling else [])]}
        self.running, self.filling = [], None
        self.queued.clear()
        for job in jobs.values():
            job.emit({"error": message})

    # -- model passes

    def _mask(self, q_pos: torch.Tensor, span: int):
        """Per-row causal mask (B, 1, T, span) for queries at positions q_pos (B, T); slot index = position."""
        k_pos = torch.arange(span, device=self.device)
        dense = (k_pos[None, None, :] <= q_pos[:, :, None])[:, None]
        if self.config.attention == "dense":
            return dense
        band = (q_pos[:, :, None] - k_pos[None, None, :] < self.config.sparse_band)[:, None]
        return {"dense": dense, "banded": dense & band}

    def _prefill(self) -> None:
        """Feed up to prefill_chunk prompt tokens of joining rows; a row whose prompt is in gets its first token."""
        budget = self.prefill_chunk
        while budget > 0:
            if self.filling is None:
                if not self.queued:
                    return
                self.filling = self.queued.popleft()
            row, slot = self.filling, len(self.running)
            chunk = row.tokens[row.length:row.length + budget]
            start = row.length
            x = torch.tensor([chunk], device=self.device)
            pos = torch.arange(start, start + len(chunk), device=self.device)[None]
            with torch.no_grad():
                logits = self.model(x, position_ids=pos, attention_mask=self._mask(pos, start + len(chunk)),
                                    cache=PrefillView(self.cache, slot, start), last_only=True)[:, -1]
            self.batches += 1
            row.length += len(chunk)
            budget -= len(chunk)
            if row.length < len(row.tokens):
                return  # the rest of this prompt in the next steps
            self.filling = None
            self.running.append(row)
            self._sample([row], logits)

    @torch.no_grad()
    def _decode(self) -> None:
        rows = self.running
        x = torch.tensor([[row.tokens[row.length]] for row in rows], device=self.device)
        pos = torch.tensor([row.length for row in rows], device=self.device)
        span = int(pos.max()) + 1
        mask, view = self._mask(pos[:, None], span), DecodeView(self.cache, pos, span)
        if len(rows) not in self.steps:
            self.steps[len(rows)] = decode_step(self.model, len(rows))
        if (step := self.steps[len(rows)]) is not None:
            logits = step(x[:, 0], view, pos, mask)
        else:
            logits = self.model(x, position_ids=pos[:, None], attention_mask=mask, cache=view)[:, -1]
        self._stepped(len(rows))
        for row in rows:
            row.length += 1
        self._sample(list(rows), logits)

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Each row's next token under its own settings; rows with the same settings and no state of
        their own in one call. Then stop / length / a full context are handled."""
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(row.group(), []).append(i)
        chosen: dict[int, tuple] = {}
        for members in groups.values():
            first = rows[members[0]]
            seen = None
            if first.job.sampling.repetition_penalty != 1.0:  # such rows sample alone (see _Row.group)
                seen = torch.tensor([first.tokens], device=self.device)
            counts = None
            if first.counts is not None:
                counts = torch.stack([rows[i].counts for i in members])
            nxt, (model_lp, top_lp, top_id) = choose_tokens(
                logits[members], first.job.sampling, seen, counts, first.bias, first.generator, first.job.logprobs)
            for j, (i, t) in enumerate(zip(members, nxt.tolist())):
                info = None
                if model_lp is not None:
                    n = first.job.logprobs
                    info = (model_lp[j, t].item(), list(zip(top_id[j].tolist(), top_lp[j].tolist()))[:n])
                chosen[i] = (t, info)
        finished = []
        for i, row in enumerate(rows):
            t, info = chosen[i]
            row.tokens.append(t)
            row.produced += 1
            if row.counts is not None:
                row.counts[t] += 1
            if row.job.cancelled or self._token(row.job, row.r, t, info, row.produced, row.last):
                finished.append(row)
        for row in finished:
            self._release(self.running.index(row))
        n_ctx = self.config.n_ctx
        keep = slide_keep(n_ctx)
        for row in [row for row in self.running if row.length >= n_ctx]:
            # The context is full: as gptn generate does, the row goes on from its last 3/4, re-prefilled.
            self._release(self.running.index(row), finished=False)
            row.tokens, row.length = row.tokens[-keep:], 0
            self.queued.appendleft(row)
