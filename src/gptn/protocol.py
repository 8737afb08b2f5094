"""What the server promises its clients, written once: the OpenAI completions API's limits and
defaults as gptn serves them, and the connection limits. No FastAPI here, so the CLI reads the
defaults for its help without the `serve` extra."""

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
