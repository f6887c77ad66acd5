"""The HTTP server behind ``csm serve``: vox-serve's ``/generate``, OpenAI's ``/v1/audio/speech``, health.

One :class:`~csmcli.engine.EngineLoop` thread runs continuous batching: every request becomes jobs
that join the running batch at a frame boundary, and each job's audio chunks reach the request's
coroutine through an asyncio queue.  A request is validated completely before its first byte is
sent; every error is JSON ``{"error": {"message", "type", "code", "param"}}``.

Modules: :mod:`.requests` (reading and validating bodies), :mod:`.config` (settings),
:mod:`.streaming` (a request's generation and its answer), :mod:`.app` (routes, middleware,
admission, counters), :mod:`.serving` (socket, connection limits, timeouts, shutdown).
"""

from .app import Counters, SpeechServer
from .config import ServerConfig
from .requests import (
    GENERATE_FIELDS,
    GENERATE_OWN_FIELDS,
    MAX_BODY_BYTES,
    MAX_TEXT_CHARS,
    OPENAI_VOICES,
    SPEECH_FIELDS,
    SPEECH_OWN_FIELDS,
    ApiError,
    SpeechRequest,
    error_response,
    parse_generate,
    parse_speech,
    read_fields,
)
from .serving import bind, drain, make_runner, run_server, warm_up

__all__ = [
    "GENERATE_FIELDS",
    "GENERATE_OWN_FIELDS",
    "MAX_BODY_BYTES",
    "MAX_TEXT_CHARS",
    "OPENAI_VOICES",
    "SPEECH_FIELDS",
    "SPEECH_OWN_FIELDS",
    "ApiError",
    "Counters",
    "ServerConfig",
    "SpeechRequest",
    "SpeechServer",
    "bind",
    "drain",
    "error_response",
    "make_runner",
    "parse_generate",
    "parse_speech",
    "read_fields",
    "run_server",
    "warm_up",
]
