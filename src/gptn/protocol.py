"""What the server promises its clients, written once: the OpenAI completions API's limits and
defaults as gptn serves them, the connection limits, and `ServeConfig` (the options of `gptn serve`).
No FastAPI here, so the CLI reads the defaults for its help without the `serve` extra."""

from __future__ import annotations

from dataclasses import dataclass

from .config import GptnError, is_number, is_whole
from .engine import MAX_BATCH, MAX_QUEUE, PREFILL_CHUNK
from .inference import DTYPE_HELP
from .options import option

# Per request (OpenAI's own limits where it has one)
MAX_TOKENS = 16  # the completion length when a request gives none (OpenAI's default)
MAX_N = 16  # completions per prompt
MAX_STOP, MAX_STOP_CHARS = 4, 256  # stop strings per request (OpenAI's 4), characters per stop string
MAX_LOGIT_BIAS = 300  # entries of logit_bias
MAX_DETECT_TOKENS = 4096  # tokens /v1/detect scores in one request

# Per connection: uvicorn's settings and the request deadline it lacks (serve.request_deadline_protocol)
REQUEST_SECONDS = 30.0  # to send a whole request, headers and body, from its first byte (or the connection)
KEEP_ALIVE_SECONDS = 5.0  # an idle keep-alive connection is closed after this
MAX_CONNECTIONS = 512  # open connections (and requests in flight) beyond which uvicorn answers 503


@dataclass
class ServeConfig:
    """How `gptn serve` serves a run (its flags, and the keys of its --config file)."""

    run: str = option(help="run directory", cli="positional")
    host: str = option("127.0.0.1", "address to bind (default loopback only)")
    port: int = option(8000, "port to listen on")
    api_key: str | None = option(None, "require `Authorization: Bearer KEY` on every path but /health (the API "
                                       "docs included)")
    model_name: str | None = option(None, "the model id clients ask for (default: the run folder's name)")
    max_batch: int = option(MAX_BATCH, "most rows decoded together, and most completions (prompts x n) in one request")
    max_body: int | None = option(None, "largest request body in bytes, refused with 413 before parsing (default "
                                        "1 KiB per context token, at least 1 MiB)")
    max_queue: int = option(MAX_QUEUE, "most requests waiting to start; more get 429")
    prefill_chunk: int = option(PREFILL_CHUNK, "most prompt tokens prefilled per step, so a long prompt does not "
                                               "stall running streams")
    device: str = option("cpu", "cpu, cuda, cuda:N or auto")
    dtype: str = option("fp32", DTYPE_HELP)
    request_timeout: float = option(REQUEST_SECONDS, "close a connection whose request (headers and body) has not "
                                    "fully arrived this many seconds after it began; idle keep-alive connections "
                                    f"close after {KEEP_ALIVE_SECONDS:g} s", metavar="SECONDS")
    max_connections: int = option(MAX_CONNECTIONS, "open connections beyond which new ones get 503")

    def __post_init__(self):
        check_engine_options(self.max_batch, self.max_queue, self.prefill_chunk)
        check_connection_options(self.request_timeout, self.max_connections)
        if not (is_whole(self.port) and 0 < self.port < 65536):
            raise GptnError(f"--port must be in 1..65535, got {self.port!r}")
        if self.max_body is not None and not (is_whole(self.max_body) and self.max_body >= 1):
            raise GptnError(f"--max-body must be a whole number >= 1, not {self.max_body!r}")


def check_engine_options(max_batch: int, max_queue: int, prefill_chunk: int) -> None:
    """The engine's settings, refused in one line when out of range."""
    for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("prefill_chunk", prefill_chunk)):
        if not is_whole(value) or value < 1:
            raise GptnError(f"--{name.replace('_', '-')} must be a whole number >= 1, not {value!r}")


def check_connection_options(request_seconds: float, max_connections: int) -> None:
    if not (is_number(request_seconds) and request_seconds > 0):
        raise GptnError(f"--request-timeout must be a positive number of seconds, not {request_seconds!r}")
    if not is_whole(max_connections) or max_connections < 1:
        raise GptnError(f"--max-connections must be a whole number >= 1, not {max_connections!r}")
