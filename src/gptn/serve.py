"""An OpenAI-compatible completions server (`gptn serve`, the `serve` extra: FastAPI + uvicorn).

    POST /v1/completions   prompt (text, texts, token ids), max_tokens, temperature, top_p, n, stop, seed,
                           stream (server-sent events ending in `data: [DONE]`), logprobs, echo; usage
    GET  /v1/models        the one model served
    GET  /health           liveness
    /tokenize, /detokenize, /tokenizer_info   vLLM-style, for lm-evaluation-harness's local-completions
    POST /v1/detect        gptn's own: GLTR's per-token ranks and P(machine-generated) of a text

    GET  /metrics          Prometheus text: requests, tokens, queue, batch size, latency histograms
    GET  /                 the playground: next-token probabilities as bars, streamed continuations

Requests are scheduled by gptn.engine (continuous batching: rows join and leave the batch at every
step, each with its own sampling settings). Errors are OpenAI-style objects: 400 bad values, 401
missing/wrong key, 404 unknown model or path, 413 a body over --max-body, 429 queue full (--max-queue);
a prompt longer than the context is 400 with code `context_length_exceeded` (as OpenAI and vLLM answer),
and so is a value of the wrong type.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from importlib import resources
from typing import Annotated, Any

from .config import GptnError
from .engine import MAX_BATCH, MAX_QUEUE, PREFILL_CHUNK, ContinuousEngine, Job, QueueFull
from .generate import encode_prompt
from .sampling import SamplingConfig, StopWatcher
from .model import prompt_limit, require_decoder
from .protocol import (KEEP_ALIVE_SECONDS, MAX_CONNECTIONS, MAX_DETECT_TOKENS, MAX_LOGIT_BIAS, MAX_N, MAX_STOP,
                       MAX_STOP_CHARS, MAX_TOKENS, REQUEST_SECONDS, ServeConfig, check_connection_options,
                       check_engine_options)

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, WithJsonSchema
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise GptnError("the server needs the `serve` extra: pip install 'gptn[serve]'") from e



def _prompt_shape(value):
    """A string, a list of strings, a list of token ids or a list of token-id lists, checked in one pass:
    pydantic's union of the four list types would validate a long list against each branch and keep an
    error per element (85 MB and 0.1 s for the 350k ids that fit in a 1 MiB body)."""
    if isinstance(value, str) or type(value) is list and (
            all(type(x) is str for x in value) or all(type(x) is int for x in value)
            or all(type(x) is list and all(type(t) is int for t in x) for x in value)):
        return value
    raise ValueError("the prompt must be a string, a list of strings, a list of token ids or a list of token-id lists")


def _at_most(n: int):
    """A check on a list's or object's size before its items are validated: pydantic validates every
    item of a dict first (60k bad logit_bias entries: +57 MB of errors before the size is looked at)."""
    def check(value):
        if isinstance(value, (list, dict)) and len(value) > n:
            raise ValueError(f"at most {n} entries, got {len(value)}")
        return value
    return BeforeValidator(check)


PROMPT_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}},
                           {"type": "array", "items": {"type": "integer"}},
                           {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}}]}


class CompletionRequest(BaseModel):
    # A parameter this server does not know is a 400 naming it, never silently dropped.
    model_config = ConfigDict(extra="forbid", strict=True)  # strict: `max_tokens: true` is not 1

    model: str | None = None
    prompt: Annotated[Any, AfterValidator(_prompt_shape), WithJsonSchema(PROMPT_SCHEMA)] = ""
    max_tokens: int | None = MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # vLLM's extension: -1 (or 0) for the whole vocabulary
    repetition_penalty: float = 1.0  # vLLM's extension (CTRL's penalty)
    logit_bias: Annotated[dict[str, float] | None, _at_most(MAX_LOGIT_BIAS)] = None  # token id (a JSON key) -> bias
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None  # {"include_usage": true}: a last chunk with usage and no choices
    stop: Annotated[str | list[str] | None, _at_most(MAX_STOP)] = None
    seed: int | None = None
    logprobs: int | None = None
    echo: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    best_of: int | None = None
    user: str | None = None


class TokenizeRequest(BaseModel):
    prompt: str
    add_special_tokens: bool = False


class DetectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    text: str


class DetokenizeRequest(BaseModel):
    tokens: list[int]


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ----------------------------------------------------------------------------------------------
# The HTTP application


def default_max_body(n_ctx: int) -> int:
    """Bytes a request body may have: 1 KiB per context token, at least 1 MiB — room for a batch of
    prompts as text or token ids, not for a body that would take the server's memory to parse."""
    return max(2**20, 1024 * n_ctx)


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes is answered 413 before it is parsed, whether the
    client declared its length (Content-Length) or streams it in chunks."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._refuse(send)
        seen, refused = 0, False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge
            return message

        async def guarded_send(message):
            # The app may answer a body cut short in its own way (FastAPI: 400); the answer is 413.
            nonlocal refused
            if seen > self.limit:
                if not refused:
                    refused = True
                    await self._refuse(send)
                return
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            if not refused:
                await self._refuse(send)

    async def _refuse(self, send):
        body = json.dumps(error_body(f"the request body is larger than this server's limit of {self.limit:,} "
                                     "bytes (--max-body)", code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class ApiKey:
    """ASGI middleware: every path but /health (a liveness probe) and the playground's page needs
    `Authorization: Bearer KEY`, the API docs included; the page asks for the key and sends it itself.
    (A plain ASGI middleware, not Starlette's BaseHTTPMiddleware, so that requests still see their
    client disconnect.)"""

    OPEN = ("/health", "/")

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self.OPEN:
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                body = json.dumps(error_body("missing or wrong API key (Authorization: Bearer KEY)",
                                             "authentication_error", code="invalid_api_key")).encode()
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class _ClientGone(Exception):
    """The client of a request disconnected before its answer was complete."""


class _BodyTooLarge(Exception):
    pass


class Completions:
    """What /v1/completions does, apart from HTTP: checks a request against this server's limits,
    turns its prompts into token ids, runs it on the engine and builds OpenAI's response objects."""

    def __init__(self, engine, tokenizer, model_name: str, n_ctx: int, vocab_size: int, max_batch: int,
                 max_tokens_limit: int):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.n_ctx, self.vocab_size, self.max_batch, self.max_tokens_limit = n_ctx, vocab_size, max_batch, max_tokens_limit

    def prompts(self, req: CompletionRequest) -> list[list[int]]:
        """The token ids of each prompt of `req`; an ApiError for ids outside the vocabulary or a
        prompt longer than the context."""
        p = req.prompt
        if isinstance(p, str):
            texts = [p]
        elif p and isinstance(p[0], int):
            texts = [p]
        else:
            texts = list(p) or [""]
        out = []
        generating = (MAX_TOKENS if req.max_tokens is None else req.max_tokens) > 0
        limit = prompt_limit(self.n_ctx, generating)
        for t in texts:
            try:
                ids = encode_prompt(self.tokenizer, t)  # refuses token ids outside the vocabulary
            except GptnError as e:
                raise ApiError(400, str(e), "prompt") from None
            if len(ids) > limit:  # OpenAI's and vLLM's answer: 400 with this code
                raise ApiError(400, f"the prompt has {len(ids)} tokens; this model's context window is {self.n_ctx}"
                               + (", and a completion needs one position after the prompt" if generating else ""),
                               "prompt", code="context_length_exceeded")
            out.append(ids)
        return out

    def validate(self, req: CompletionRequest) -> None:
        """An ApiError naming the first parameter outside what this server accepts."""
        if req.model not in (None, self.model_name):
            raise ApiError(404, f"the model {req.model!r} does not exist; this server has {self.model_name!r}", "model",
                           "not_found_error", "model_not_found")
        max_tokens = MAX_TOKENS if req.max_tokens is None else req.max_tokens
        if not 0 <= max_tokens <= self.max_tokens_limit:
            raise ApiError(400, f"max_tokens must be in 0..{self.max_tokens_limit}, got {max_tokens}", "max_tokens")
        if not 1 <= req.n <= MAX_N:
            raise ApiError(400, f"n must be in 1..{MAX_N}, got {req.n}", "n")
        n_prompts = len(req.prompt) if isinstance(req.prompt, list) and req.prompt and \
            not isinstance(req.prompt[0], int) else 1
        if n_prompts * req.n > self.max_batch:  # one request must not hold the engine for everyone else
            raise ApiError(400, f"{n_prompts} prompts x n={req.n} = {n_prompts * req.n} completions; this server "
                           f"runs at most {self.max_batch} in one request (--max-batch)", "prompt")
        if req.temperature < 0 or req.temperature > 2:
            raise ApiError(400, f"temperature must be in [0, 2], got {req.temperature}", "temperature")
        if not 0 < req.top_p <= 1:
            raise ApiError(400, f"top_p must be in (0, 1], got {req.top_p}", "top_p")
        if req.logprobs is not None and not 0 <= req.logprobs <= 20:
            raise ApiError(400, f"logprobs must be in 0..20, got {req.logprobs}", "logprobs")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(req, name) <= 2:
                raise ApiError(400, f"{name} must be in [-2, 2], got {getattr(req, name)}", name)
        if req.top_k < -1:
            raise ApiError(400, f"top_k must be -1 (off) or a whole number >= 1, got {req.top_k}", "top_k")
        if not req.repetition_penalty > 0:
            raise ApiError(400, f"repetition_penalty must be > 0, got {req.repetition_penalty}", "repetition_penalty")
        for token, bias in (req.logit_bias or {}).items():
            # isdigit() alone lets "²" through (int() then fails) and 4,300+ digits (int() refuses them)
            if not (token.isascii() and token.isdigit() and len(token) <= 10) or int(token) >= self.vocab_size:
                raise ApiError(400, f"logit_bias: {token!r} is not a token id of this model "
                               f"(0..{self.vocab_size - 1})", "logit_bias")
            if not -100 <= bias <= 100:
                raise ApiError(400, f"logit_bias: the bias of token {token} must be in [-100, 100], got {bias}",
                               "logit_bias")
        for s in [req.stop] if isinstance(req.stop, str) else req.stop or []:  # matched at every new token
            if not 0 < len(s) <= MAX_STOP_CHARS:
                raise ApiError(400, f"stop: each stop string must have 1..{MAX_STOP_CHARS} characters, "
                               f"got {len(s)}", "stop")
        if req.best_of not in (None, 1, req.n):
            raise ApiError(400, "best_of is not supported by this server", "best_of")
        if req.stream and req.echo and req.logprobs is not None:
            raise ApiError(400, "echo with logprobs is not supported when streaming", "echo")

    async def start(self, req: CompletionRequest, is_disconnected=None) -> "Completion":
        """Validate `req` and put it on the engine; the returned Completion yields its results.
        `is_disconnected` (an async callable) tells whether the client went away."""
        self.validate(req)
        completion = Completion(self, req, await asyncio.to_thread(self.prompts, req), is_disconnected)
        await completion.submit()
        return completion

    def logprobs_block(self, tokens, token_lp, tops, offset0: int = 0) -> dict:
        """OpenAI's completions `logprobs` object for `tokens`."""
        text_offset, pos = [], offset0
        texts = [self.tokenizer.decode([t]) for t in tokens]
        for t in texts:
            text_offset.append(pos)
            pos += len(t)
        return {"tokens": texts, "token_logprobs": token_lp,
                "top_logprobs": [None if top is None else {self.tokenizer.decode([i]): v for i, v in top} for top in tops],
                "text_offset": text_offset}


class Completion:
    """One completions request on the engine: its rows' tokens as they come, and OpenAI's response
    (`result`) or its server-sent events (`sse`)."""

    def __init__(self, service: Completions, req: CompletionRequest, prompts: list[list[int]], is_disconnected=None):
        self.service, self.req, self.prompts, self.is_disconnected = service, req, prompts, is_disconnected
        self._checked = time.monotonic()
        self.max_tokens = MAX_TOKENS if req.max_tokens is None else req.max_tokens
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        sampling = SamplingConfig(max_new_tokens=self.max_tokens, temperature=req.temperature,
                                  top_p=req.top_p if req.top_p < 1 else None, top_k=req.top_k if req.top_k > 0 else None,
                                  repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
                                  frequency_penalty=req.frequency_penalty,
                                  logit_bias={int(t): b for t, b in (req.logit_bias or {}).items()}, seed=req.seed)
        self.rows = [ids for ids in prompts for _ in range(req.n)]
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.created, self.id = int(time.time()), f"cmpl-{uuid.uuid4().hex[:24]}"
        # Text the stop watcher releases, per row. The engine thread writes it and moves it into the
        # token's event (emit runs there too), so the event loop never reads a list being written.
        self.deltas: list[list[str]] = [[] for _ in self.rows]
        self.job = Job(self.rows, sampling, self.max_tokens, req.logprobs, emit=self._emit,
                       watcher=StopWatcher(service.tokenizer, len(self.rows), stop, self._stream_text))
        self.tokens: list[list[int]] = [[] for _ in self.rows]
        self.token_info: list[list] = [[] for _ in self.rows]
        self.finish: list[str | None] = [None] * len(self.rows)
        self.echo_lp: dict = {}

    def _stream_text(self, r: int, text: str) -> None:
        self.deltas[r].append(text)

    def _emit(self, ev: dict) -> None:
        if "row" in ev:
            ev["text"] = "".join(self.deltas[ev["row"]])
            self.deltas[ev["row"]].clear()
        self.loop.call_soon_threadsafe(self.events.put_nowait, ev)

    async def submit(self) -> None:
        """Queue the request: its place first (a full queue answers 429 before any work), then echo's
        prompt scoring, one prompt per engine step, then its rows."""
        req, engine = self.req, self.service.engine
        try:
            engine.reserve()
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry later", kind="rate_limit_error",
                           code="queue_full") from None
        try:
            if req.echo and req.logprobs is not None:
                for i, ids in enumerate(self.prompts):
                    self.echo_lp[i] = await asyncio.to_thread(engine.prompt_logprobs, ids, req.logprobs)
        except BaseException:  # a failure, or the client gone (cancelled): its place is given back
            engine.release()
            raise
        engine.submit(self.job, reserved=True)

    def _prompt_text(self, r: int) -> str:
        return self.service.tokenizer.decode(self.rows[r]) if self.req.echo else ""

    def _choice_logprobs(self, r: int):
        if self.req.logprobs is None:
            return None
        gen_lp = [info[0] for info in self.token_info[r]]
        gen_top = [info[1] for info in self.token_info[r]]
        if self.req.echo:
            p_lp, p_top = self.echo_lp[r // self.req.n]
            return self.service.logprobs_block(self.rows[r] + self.tokens[r], p_lp + gen_lp, p_top + gen_top)
        return self.service.logprobs_block(self.tokens[r], gen_lp, gen_top)

    def _chunk(self, r: int, text: str, finish_reason=None, logprobs=None) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.service.model_name,
                "choices": [{"text": text, "index": r, "logprobs": logprobs, "finish_reason": finish_reason}]}

    def _apply(self, ev: dict) -> int:
        if "error" in ev:
            raise ApiError(500, ev["error"], kind="server_error")
        r = ev["row"]
        self.tokens[r].append(ev["token"])
        if ev["info"] is not None:
            self.token_info[r].append(ev["info"])
        if ev["stopped"]:
            self.finish[r] = "stop"
        elif ev["length"]:
            self.finish[r] = "length"
        return r

    def _usage(self) -> dict:
        completion = sum(len(t) for t in self.tokens)
        prompt = sum(len(p) for p in self.prompts)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def _next_event(self) -> dict:
        """The engine's next event. A client that went away (seen between events, or when a write
        fails) cancels the job: the engine drops its rows at the next step."""
        while True:
            # Checked every 0.25 s whether or not events keep coming: a row decoding faster than that
            # would otherwise never give the check a turn, and run to max_tokens for nobody.
            now = time.monotonic()
            if now - self._checked >= 0.25 and self.is_disconnected is not None:
                self._checked = now
                if await self.is_disconnected():
                    self.job.cancelled = True
                    raise _ClientGone
            try:
                return await asyncio.wait_for(self.events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                continue

    async def result(self) -> dict:
        """OpenAI's text_completion object, once every row has finished."""
        try:
            while not (ev := await self._next_event()).get("done"):
                self._apply(ev)
        except asyncio.CancelledError:
            self.job.cancelled = True
            raise
        texts = self.job.watcher.finish()
        choices = [{"text": self._prompt_text(r) + texts[r], "index": r, "logprobs": self._choice_logprobs(r),
                    "finish_reason": self.finish[r] or ("length" if self.max_tokens == 0 else "stop")}
                   for r in range(len(self.rows))]
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.service.model_name,
                "choices": choices, "usage": self._usage()}

    async def sse(self):
        """The response as server-sent events: a chunk per piece of text, then [DONE]."""
        req = self.req
        try:
            if req.echo:
                for r in range(len(self.rows)):
                    yield f"data: {json.dumps(self._chunk(r, self._prompt_text(r)))}\n\n"
            while not (ev := await self._next_event()).get("done"):
                r = self._apply(ev)
                text, lp = ev["text"], None
                if req.logprobs is not None and self.token_info[r]:
                    info = self.token_info[r][-1]
                    lp = self.service.logprobs_block([self.tokens[r][-1]], [info[0]], [info[1]])
                if text or lp or self.finish[r]:
                    yield f"data: {json.dumps(self._chunk(r, text, self.finish[r], lp))}\n\n"
            self.job.watcher.finish()
            for r in range(len(self.rows)):
                rest = "".join(self.deltas[r])
                if rest or self.finish[r] is None:
                    yield f"data: {json.dumps(self._chunk(r, rest, self.finish[r] or 'stop'))}\n\n"
            if (req.stream_options or {}).get("include_usage"):  # as OpenAI: only when asked for
                final = {"id": self.id, "object": "text_completion", "created": self.created,
                         "model": self.service.model_name, "choices": [], "usage": self._usage()}
                yield f"data: {json.dumps(final)}\n\n"
            yield "data: [DONE]\n\n"
        except _ClientGone:
            return
        finally:
            self.job.cancelled = True  # a client that went away stops its rows at the next token


def create_app(model, tokenizer, model_name: str = "gptn", api_key: str | None = None, max_batch: int = MAX_BATCH,
               max_tokens_limit: int | None = None, max_body: int | None = None, max_queue: int = MAX_QUEUE,
               prefill_chunk: int = PREFILL_CHUNK, detector=None, engine=None) -> FastAPI:
    """The FastAPI application serving `model`; run it with uvicorn (as `gptn serve` does). `detector`
    (gptn.detect.Detector, default DEFAULT_DETECTOR) answers /v1/detect; `engine` replaces the continuous
    engine (benchmarks/static_engine.py's baseline)."""
    require_decoder(model, "serve completions")
    check_engine_options(max_batch, max_queue, prefill_chunk)
    n_ctx = model.config.n_ctx
    engine = engine or ContinuousEngine(model, tokenizer, max_batch, max_queue, prefill_chunk)
    service = Completions(engine, tokenizer, model_name, n_ctx, model.config.vocab_size, max_batch,
                          max_tokens_limit or n_ctx)
    app = FastAPI(title="gptn", description="OpenAI-compatible completions for a gptn model")
    app.add_middleware(BodyLimit, limit=max_body or default_max_body(n_ctx))
    if api_key:
        app.add_middleware(ApiKey, key=api_key)
    app.state.engine, app.state.completions = engine, service

    @app.exception_handler(ApiError)
    async def api_error(_request, e: ApiError):
        return JSONResponse(error_body(e.message, e.kind, e.param, e.code), status_code=e.status)

    @app.exception_handler(GptnError)
    async def user_error(_request, e: GptnError):  # e.g. a character outside a character tokenizer's alphabet
        return JSONResponse(error_body(str(e)), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, e: RequestValidationError):
        errors = e.errors()
        if any(err.get("type") in ("json_invalid", "json_type") for err in errors):
            return JSONResponse(error_body("the request body is not valid JSON"), status_code=400)
        unknown = [str(err["loc"][-1]) for err in errors if err.get("type") == "extra_forbidden"]
        if unknown:
            return JSONResponse(error_body(f"unknown parameter {unknown[0]!r}: this server does not support it",
                                           param=unknown[0]), status_code=400)
        first = errors[0] if errors else {}
        param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        message = first.get("msg", "invalid request").removeprefix("Value error, ")
        return JSONResponse(error_body(f"invalid value for {param}: {message}",  # OpenAI: 400, not FastAPI's 422
                                       param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "batches": engine.batches}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def playground():
        return HTMLResponse(PLAYGROUND)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "gptn"}]}

    # vLLM's tokenizer endpoints: lm-evaluation-harness's `local-completions` tokenizes through them
    # (tokenizer_backend=remote), so the harness needs no copy of the tokenizer.
    @app.get("/tokenizer_info")
    async def tokenizer_info():
        eot = tokenizer.decode([tokenizer.eot_id])
        return {"eos_token": eot, "bos_token": eot, "pad_token": eot, "model_max_length": n_ctx}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):  # off the event loop: a long text must not stall /health
        ids = await asyncio.to_thread(tokenizer.encode, req.prompt, allow_special=True)
        return {"tokens": ids, "count": len(ids), "max_model_len": n_ctx}

    @app.post("/v1/detect")
    async def detect(req: DetectRequest):
        """gptn's own: GLTR's per-token ranks and P(machine-generated) (`gptn detect`), for the playground."""
        from .detect import DEFAULT_DETECTOR, token_stats
        ids = await asyncio.to_thread(tokenizer.encode, req.text)
        if not ids or len(ids) > MAX_DETECT_TOKENS:
            raise ApiError(400, f"the text must have 1..{MAX_DETECT_TOKENS} tokens, got {len(ids)}", "text")
        stats = await asyncio.to_thread(engine.call, lambda: token_stats(model, tokenizer, req.text))
        features = stats.features()
        return {"machine_probability": (detector or DEFAULT_DETECTOR).probability(features), "features": features,
                "tokens": [{"text": tokenizer.decode([t]), "rank": r, "logprob": lp}
                           for t, r, lp in zip(stats.tokens, stats.ranks, stats.logprobs)]}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        if any(not 0 <= i < model.config.vocab_size for i in req.tokens):
            raise ApiError(400, "a token id is outside the vocabulary", "tokens")
        return {"prompt": tokenizer.decode(req.tokens)}

    @app.post("/v1/chat/completions")
    async def chat_completions():
        raise ApiError(400, f"{model_name} is a base language model with no chat template: send a prompt to "
                       "/v1/completions (client.completions.create) instead of messages", "messages")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        completion = await service.start(req, request.is_disconnected)
        if req.stream:
            return StreamingResponse(completion.sse(), media_type="text/event-stream")
        try:
            return await completion.result()
        except _ClientGone:
            return JSONResponse(error_body("the client went away", "server_error"), 499)

    return app


def request_deadline_protocol(seconds: float):
    """uvicorn's h11 protocol with a deadline on receiving each request: uvicorn times out only idle
    keep-alive connections, so a client that sends its request a byte at a time would hold its socket
    (and a file descriptor) for ever (uvicorn#157). The deadline covers the request's receipt only —
    a long streamed response is never cut — and an expired connection is closed."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class RequestDeadline(H11Protocol):
        _deadline = None

        def _arm(self):
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._expire)

        def _disarm(self):
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self):
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def data_received(self, data):
            if self._deadline is None and self.conn.their_state is h11.IDLE:
                self._arm()  # the next request on a kept-alive connection starts its own clock
            super().data_received(data)
            if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
                self._disarm()  # received whole (or the connection is done): the answer may take its time

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

    return RequestDeadline


def uvicorn_config(app, host: str = "127.0.0.1", port: int = 8000, request_seconds: float = REQUEST_SECONDS,
                   max_connections: int = MAX_CONNECTIONS, log_level: str = "warning"):
    """How `gptn serve` runs `app` in uvicorn: a deadline on receiving each request, idle keep-alive
    connections closed, and a cap on open connections (503 beyond it)."""
    import uvicorn

    check_connection_options(request_seconds, max_connections)
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=request_deadline_protocol(request_seconds),
                          timeout_keep_alive=KEEP_ALIVE_SECONDS, limit_concurrency=max_connections)


def serve(cfg: ServeConfig) -> None:
    """Load a run and serve it until interrupted; `cfg.dtype` as in gptn.inference.prepare_for_inference."""
    import sys
    from pathlib import Path

    import uvicorn

    from .detect import detector_for
    from .inference import load_for_inference
    model, tokenizer = load_for_inference(cfg.run, cfg.device, cfg.dtype, say=lambda m: print(m, file=sys.stderr))
    name = cfg.model_name or Path(cfg.run).resolve().name
    app = create_app(model, tokenizer, name, cfg.api_key, cfg.max_batch, max_body=cfg.max_body, max_queue=cfg.max_queue,
                     prefill_chunk=cfg.prefill_chunk, detector=detector_for(cfg.run))
    print(f"gptn serve: {name} on http://{cfg.host}:{cfg.port}/v1 (OpenAI completions; "
          f"{'API key required' if cfg.api_key else 'no API key'})", flush=True)
    uvicorn.Server(uvicorn_config(app, cfg.host, cfg.port, cfg.request_timeout, cfg.max_connections)).run()


PLAYGROUND = resources.files("gptn").joinpath("playground.html").read_text(encoding="utf-8")

__all__ = ["create_app", "serve", "CompletionRequest", "Completions", "Completion"]
