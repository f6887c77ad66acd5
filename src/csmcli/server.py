"""The HTTP server behind ``csm serve``: vox-serve's ``/generate``, OpenAI's ``/v1/audio/speech``, health.

One :class:`~csmcli.engine.EngineLoop` thread runs continuous batching: every request becomes jobs
that join the running batch at a frame boundary, and each job's audio chunks reach the request's
coroutine through an asyncio queue.  A request is validated completely before its first byte is
sent; every error is JSON ``{"error": {"message", "type", "code", "param"}}``.  A client that goes
away cancels its job at the next frame, a full queue answers 503 with ``Retry-After``, every request
has a time limit, and SIGTERM drains in-flight requests before the process exits 0.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import dataclasses
import hmac
import json
import logging
import secrets
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from aiohttp import web

from .audio import encode_audio, to_int16, wav_stream_header
from .engine import AudioChunk, EngineLoop, Job
from .errors import CsmError, OptionsError
from .options import FRAME_MS, OPTION_FIELDS, GenerationOptions
from .voices import DEFAULT_VOICES, NO_VOICE

if TYPE_CHECKING:
    from .synthesizer import Synthesizer

log = logging.getLogger("csmcli.server")

#: Longest text one request may carry (characters).
MAX_TEXT_CHARS = 5000
#: Largest request body (bytes); bigger bodies get 413.
MAX_BODY_BYTES = 256 * 1024
#: Fields ``POST /generate`` takes besides the generation options.
GENERATE_OWN_FIELDS = ("text", "speaker", "streaming", "voice", "format")
GENERATE_FIELDS = (*GENERATE_OWN_FIELDS, *OPTION_FIELDS)
#: Fields ``POST /v1/audio/speech`` takes besides the generation options (``speaker`` is ours).
SPEECH_OWN_FIELDS = ("model", "input", "voice", "instructions", "response_format", "speed", "stream_format", "speaker")
SPEECH_FIELDS = (*SPEECH_OWN_FIELDS, *OPTION_FIELDS)
#: Audio formats both endpoints answer in (pcm = headerless s16le mono).
FORMATS = ("wav", "pcm", "flac")
#: OpenAI voice names and the speaker (with its default preset voice) each one maps to.
OPENAI_VOICES = {
    "alloy": 0,
    "coral": 0,
    "nova": 0,
    "sage": 0,
    "shimmer": 0,
    "marin": 0,
    "ash": 1,
    "ballad": 1,
    "echo": 1,
    "fable": 1,
    "onyx": 1,
    "verse": 1,
    "cedar": 1,
}
#: Frames in the first and in later chunks: small for streams (fast first audio), large otherwise.
STREAM_CHUNKS = (1, 4)
WHOLE_CHUNKS = (8, 32)
#: Seconds a busy client is told to wait before retrying.
RETRY_AFTER_S = 1
#: How often a waiting request checks on its job and its deadline (seconds).
POLL_S = 0.25

_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 503: "service_unavailable", 504: "timeout_error"}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class ApiError(Exception):
    """An error answered as JSON ``{"error": {"message", "type", "code", "param"}}``."""

    def __init__(
        self, status: int, message: str, code: str, param: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        """The JSON response for this error."""
        return error_response(self.status, str(self), self.code, self.param, self.headers)


def error_response(
    status: int, message: str, code: str, param: str | None = None, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A JSON error body with the OpenAI-style ``type`` for ``status``."""
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "code": code, "param": param}}
    return web.json_response(body, status=status, headers=headers)


@dataclass(frozen=True)
class ServerConfig:
    """Server-wide settings; ``defaults`` are the generation options requests start from."""

    defaults: GenerationOptions = GenerationOptions()
    model_id: str = "csm-1b"
    max_queue: int = 32
    api_key: str | None = None
    request_timeout: float = 300.0
    grace_period: float = 10.0
    max_text_chars: int = MAX_TEXT_CHARS
    read_only_voices: bool = False
    max_voices: int = 100

    def __post_init__(self) -> None:
        if self.max_queue < 0:
            raise OptionsError(f"max_queue must be 0 or more, got {self.max_queue}")
        if not self.request_timeout > 0:
            raise OptionsError(f"request_timeout must be more than 0 seconds, got {self.request_timeout}")
        if not self.grace_period >= 0:
            raise OptionsError(f"grace_period must be 0 or more seconds, got {self.grace_period}")
        if self.max_text_chars < 1:
            raise OptionsError(f"max_text_chars must be at least 1, got {self.max_text_chars}")
        if self.max_voices < 0:
            raise OptionsError(f"max_voices must be 0 or more, got {self.max_voices}")


@dataclass(frozen=True)
class SpeechRequest:
    """A validated request: what to say, how, and how to answer (``whole``, ``audio`` stream or ``sse``)."""

    text: str
    speaker: int
    voice: str | None
    options: GenerationOptions
    fmt: str = "wav"
    mode: str = "whole"


@dataclass
class Counters:
    """Request totals since start, for ``GET /v1/stats``."""

    requests: int = 0
    completed: int = 0
    client_errors: int = 0
    busy: int = 0
    cancelled: int = 0
    timed_out: int = 0
    failed: int = 0
    frames: int = 0
    audio_seconds: float = 0.0


# -- request bodies -----------------------------------------------------------------------------


async def read_fields(request: web.Request, limit: int = MAX_BODY_BYTES) -> dict[str, Any]:
    """The request's fields from a JSON object, a urlencoded form or a multipart form."""
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    try:
        if request.content_type == "multipart/form-data":
            return _form_fields(await request.post())
        body = await request.read()
        if request.content_type == "application/x-www-form-urlencoded" and body.lstrip()[:1] != b"{":
            return _form_fields(await request.post())  # JSON sent with curl -d but no -H is parsed below
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(limit) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed form body: {exc}", "invalid_body") from None
    json_type = request.content_type == "application/json" or request.content_type.endswith("+json")
    if not json_type and body.lstrip()[:1] not in (b"{", b"["):
        raise ApiError(
            415,
            f"unsupported Content-Type {request.content_type!r}: send a JSON object (application/json) or form fields",
            "unsupported_media_type",
        )
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"malformed JSON body: {exc}", "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the JSON body must be an object, got {type(data).__name__}", "invalid_json")
    return data


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body is larger than the {limit}-byte limit", "body_too_large")


def _form_fields(form: Mapping[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key in set(form.keys()):
        values = form.getall(key)  # type: ignore[attr-defined]
        if len(values) > 1:
            raise ApiError(400, f"field {key!r} is given {len(values)} times", "duplicate_field", key)
        if not isinstance(values[0], str):
            raise ApiError(400, f"field {key!r} must be a plain value, not a file", "invalid_type", key)
        fields[key] = values[0]
    return fields


def check_fields(fields: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    """400 naming every field not in ``allowed`` (and listing the accepted ones)."""
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        names = ", ".join(unknown)
        raise ApiError(
            400,
            f"unknown field{'s' if len(unknown) > 1 else ''} {names}; accepted fields: {', '.join(allowed)}",
            "unknown_field",
            unknown[0],
        )


def _absent(value: Any) -> bool:
    return value is None or value == ""


def _text(fields: Mapping[str, Any], name: str, limit: int) -> str:
    value = fields.get(name)
    if value is None:
        raise ApiError(400, f"missing required field {name!r}: the text to speak", "missing_field", name)
    if not isinstance(value, str):
        raise ApiError(400, f"{name} must be a string, got {type(value).__name__}", "invalid_type", name)
    if not value.strip():
        raise ApiError(400, f"{name} is empty: give some words to speak", "empty_text", name)
    if len(value) > limit:
        raise ApiError(
            400,
            f"{name} is {len(value)} characters; the limit is {limit}: split it into several requests",
            "text_too_long",
            name,
        )
    return value.strip()


def _string(fields: Mapping[str, Any], name: str) -> str | None:
    value = fields.get(name)
    if _absent(value):
        return None
    if not isinstance(value, str):
        raise ApiError(400, f"{name} must be a string, got {type(value).__name__}", "invalid_type", name)
    return value.strip()


def _speaker(fields: Mapping[str, Any], default: int = 0) -> int:
    value = fields.get("speaker")
    if _absent(value):
        return default
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value not in (0, 1):
        raise ApiError(400, f"speaker must be 0 or 1, got {value!r}", "invalid_speaker", "speaker")
    return value


def _flag(fields: Mapping[str, Any], name: str, default: bool) -> bool:
    value = fields.get(name)
    if _absent(value):
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, (str, int)) else None
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ApiError(400, f"{name} must be true or false, got {value!r}", "invalid_type", name)


def _choice(fields: Mapping[str, Any], name: str, choices: tuple[str, ...], default: str) -> str:
    value = _string(fields, name)
    if value is None:
        return default
    if value.lower() not in choices:
        raise ApiError(
            400, f"{name} {value!r} is not supported: use one of {', '.join(choices)}", f"unsupported_{name}", name
        )
    return value.lower()


def _options(fields: Mapping[str, Any], base: GenerationOptions) -> GenerationOptions:
    given = {k: fields[k] for k in OPTION_FIELDS if not _absent(fields.get(k))}
    try:
        options = GenerationOptions.from_mapping(given, base=base)
    except OptionsError as exc:
        raise ApiError(400, str(exc), exc.code, str(exc).split()[0]) from None
    return options if options.seed is not None else options.replace(seed=secrets.randbits(32))


def parse_generate(fields: Mapping[str, Any], config: ServerConfig) -> SpeechRequest:
    """Validate a ``POST /generate`` body (vox-serve's fields plus ours)."""
    check_fields(fields, GENERATE_FIELDS)
    text = _text(fields, "text", config.max_text_chars)
    speaker = _speaker(fields)
    streaming = _flag(fields, "streaming", False)
    fmt = _choice(fields, "format", FORMATS, "wav")
    if streaming and fmt == "flac":
        raise ApiError(
            400, "flac cannot be streamed: use format wav or pcm, or streaming false", "unsupported_format", "format"
        )
    return SpeechRequest(
        text,
        speaker,
        _string(fields, "voice"),
        _options(fields, config.defaults),
        fmt,
        "audio" if streaming else "whole",
    )


def parse_speech(fields: Mapping[str, Any], config: ServerConfig) -> SpeechRequest:
    """Validate an OpenAI ``POST /v1/audio/speech`` body."""
    check_fields(fields, SPEECH_FIELDS)
    _string(fields, "model")
    _string(fields, "instructions")
    text = _text(fields, "input", config.max_text_chars)
    fmt = _choice(fields, "response_format", FORMATS, "wav")
    speed = fields.get("speed")
    if not _absent(speed):
        try:
            ok = not isinstance(speed, bool) and float(speed) == 1.0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ApiError(
                400,
                f"speed must be 1.0, got {speed!r}: CSM-1B cannot change its speaking rate",
                "unsupported_speed",
                "speed",
            )
    sse = _choice(fields, "stream_format", ("audio", "sse"), "audio") == "sse"
    if sse and fmt == "flac":
        raise ApiError(
            400,
            "stream_format sse sends wav or pcm audio: use response_format wav or pcm",
            "unsupported_response_format",
            "response_format",
        )
    voice = _string(fields, "voice")
    speaker = 0
    if voice is not None and voice.lower() in OPENAI_VOICES:
        speaker, voice = OPENAI_VOICES[voice.lower()], None
    elif voice is not None:
        speaker = next((s for s, name in DEFAULT_VOICES.items() if name == voice), 0)
    mode = "sse" if sse else "whole" if fmt == "flac" else "audio"
    return SpeechRequest(text, _speaker(fields, speaker), voice, _options(fields, config.defaults), fmt, mode)


# -- generation ---------------------------------------------------------------------------------


class Run:
    """One request's generation: its jobs in order on the engine loop, chunks through an asyncio queue."""

    def __init__(self, server: SpeechServer, req: SpeechRequest) -> None:
        self.server = server
        self.req = req
        self.jobs: list[Job] = []
        self.started = time.perf_counter()
        self.deadline = self.started + server.config.request_timeout
        self.first_audio_at: float | None = None
        self.finished_at: float | None = None
        self.frames = 0
        self.samples = 0
        self.outcome = "running"

    @property
    def audio_seconds(self) -> float:
        """Seconds of audio produced so far."""
        return self.samples / self.server.sample_rate

    @property
    def stop_reason(self) -> str:
        """Why the last job stopped (eos, budget, cancelled, error) or the request's outcome."""
        last = self.jobs[-1].stats.stop_reason if self.jobs else ""
        return last or self.outcome

    def summary(self) -> str:
        """frames, audio length, time to first audio and real-time factor, for the log line."""
        end = self.finished_at or time.perf_counter()
        ttfa = f"{self.first_audio_at - self.started:.3f}s" if self.first_audio_at else "-"
        rtf = f"{(end - self.started) / self.audio_seconds:.2f}" if self.samples else "-"
        return (
            f"speaker={self.req.speaker} frames={self.frames} audio={self.audio_seconds:.2f}s "
            f"ttfa={ttfa} rtf={rtf} stop={self.stop_reason} seed={self.req.options.seed}"
        )

    def _remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def _timeout(self) -> ApiError:
        self.outcome = "timeout"
        limit = self.server.config.request_timeout
        return ApiError(504, f"the request took longer than the server's {limit:g} s limit", "timeout")

    async def chunks(self) -> AsyncIterator[np.ndarray]:
        """Float32 audio as it is generated; closing the iterator early cancels the generation."""
        aloop = asyncio.get_running_loop()
        queue: asyncio.Queue[AudioChunk] = asyncio.Queue()
        first, later = WHOLE_CHUNKS if self.req.mode == "whole" else STREAM_CHUNKS
        jobs = self.server.synth.jobs(
            self.req.text,
            self.req.speaker,
            voice=self.req.voice,
            options=self.req.options,
            first_chunk_frames=first,
            chunk_frames=later,
            sink=lambda chunk: aloop.call_soon_threadsafe(queue.put_nowait, chunk),
        )
        job = None
        try:
            while (job := await self._next_job(jobs)) is not None:
                self.jobs.append(job)
                self.server.submit(job)
                async for samples in self._drain(job, queue):
                    yield samples
            self.outcome = "done"
        finally:
            self.finished_at = time.perf_counter()
            if job is not None and not job.stats.stop_reason:
                job.cancel()
                if self.outcome == "running":
                    self.outcome = "cancelled"

    async def _next_job(self, jobs: Iterator[Job]) -> Job | None:
        """The next piece's job, built in a worker thread (a new voice is encoded by the codec, so the
        engine is held meanwhile)."""

        def advance() -> Job | None:
            with self.server.synth.engine.lock:
                return next(jobs, None)

        try:
            return await asyncio.wait_for(asyncio.to_thread(advance), max(self._remaining(), 0.001))
        except asyncio.TimeoutError:
            raise self._timeout() from None

    async def _drain(self, job: Job, queue: asyncio.Queue[AudioChunk]) -> AsyncIterator[np.ndarray]:
        while True:
            remaining = self._remaining()
            if remaining <= 0:
                raise self._timeout()
            try:
                chunk = await asyncio.wait_for(queue.get(), min(POLL_S, remaining))
            except asyncio.TimeoutError:
                if job.done.is_set() and queue.empty():
                    break
                continue
            if self.first_audio_at is None and chunk.frames:
                self.first_audio_at = time.perf_counter()
            self.frames += chunk.frames
            self.samples += len(chunk.samples)
            yield chunk.samples
            if chunk.final:
                break
        if job.error is not None:
            self.outcome = "error"
            raise self.server.job_failure(job.error)


@dataclass
class _Note:
    """What the middleware learns about the request being handled (id, its generation, error code)."""

    rid: str
    run: Run | None = None
    error: str | None = None


_NOTE: contextvars.ContextVar[_Note] = contextvars.ContextVar("csm_request")


class SpeechServer:
    """The aiohttp application around one synthesizer and its engine loop."""

    def __init__(self, synth: Synthesizer, config: ServerConfig) -> None:
        self.synth = synth
        self.config = config
        self.sample_rate = synth.sample_rate
        self.loop = EngineLoop(synth.engine)
        self.counters = Counters()
        self.in_flight = 0
        self.draining = False
        self.created = int(time.time())

    def start(self) -> None:
        """Start the engine loop thread."""
        self.loop.start()

    def close(self) -> None:
        """Stop the engine loop thread."""
        self.loop.stop(timeout=10)

    def app(self) -> web.Application:
        """The routes, with the error, auth and logging middleware."""
        from . import voices_http

        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._middleware])
        app.router.add_get("/health", self.health)
        app.router.add_post("/generate", self.generate)
        app.router.add_post("/v1/audio/speech", self.speech)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/audio/models", self.audio_models)
        app.router.add_get("/v1/stats", self.stats)
        voices_http.add_routes(app, self)  # the voices API and the playground page
        return app

    # -- middleware -----------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        note = _Note(secrets.token_hex(6))
        _NOTE.set(note)
        rid = note.rid
        started = time.perf_counter()
        try:
            self._authorize(request)
            response = await handler(request)
        except ApiError as exc:
            response = exc.response()
            note.error = exc.code
        except CsmError as exc:
            response = error_response(exc.http_status, str(exc), exc.code)
            note.error = exc.code
        except web.HTTPException as exc:
            response = _http_error(exc)
        except asyncio.CancelledError:
            self._record(request, note, None, started)
            raise
        except Exception:
            log.exception("%s %s %s: internal error", rid, request.method, request.path)
            response = error_response(
                500, f"internal server error (request {rid}); see the server log", "internal_error"
            )
        if not response.prepared:
            response.headers["X-Request-Id"] = rid
        self._record(request, note, response, started)
        return response

    def _authorize(self, request: web.Request) -> None:
        from .voices_http import is_public  # the playground page asks for the key itself

        key = self.config.api_key
        if not key or request.path == "/health" or is_public(request.path):
            return
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                401,
                "missing API key: send 'Authorization: Bearer <key>'",
                "missing_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "invalid API key", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def _record(self, request: web.Request, note: _Note, response: web.StreamResponse | None, started: float) -> None:
        """Count the request and log one line about it (health checks only at debug level)."""
        run = note.run
        status = response.status if response is not None else 0
        c = self.counters
        c.requests += 1
        if status == 503 and "Retry-After" in response.headers:
            c.busy += 1
        elif status >= 500 and status != 504:  # timeouts are counted by the run
            c.failed += 1
        elif status >= 400:
            c.client_errors += 1
        if run is not None:
            c.frames += run.frames
            c.audio_seconds += run.audio_seconds
            c.cancelled += run.outcome == "cancelled"
            c.timed_out += run.outcome == "timeout"
            c.completed += run.outcome == "done"
        what = str(status) if response is not None else "cut off at shutdown" if self.draining else ("client went away")
        detail = f" {run.summary()}" if run is not None else ""
        if note.error:
            detail += f" error={note.error}"
        level = logging.DEBUG if request.path == "/health" and status == 200 else logging.INFO
        log.log(
            level,
            "%s %s %s %s in %.2fs%s",
            note.rid,
            request.method,
            request.path,
            what,
            time.perf_counter() - started,
            detail,
        )

    # -- routes ---------------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        """200 only while the model is loaded, the engine loop runs and the server is not draining."""
        problem = self.problem()
        if problem is not None:
            return web.json_response(
                {
                    "status": "unavailable",
                    "error": {"message": problem.args[0], "type": "service_unavailable", "code": problem.code},
                },
                status=503,
            )
        engine = self.synth.engine
        return web.json_response(
            {
                "status": "ok",
                "model": self.config.model_id,
                "sample_rate": self.sample_rate,
                "in_flight": self.in_flight,
                "max_batch_size": engine.max_batch,
                "max_queue": self.config.max_queue,
            }
        )

    async def stats(self, request: web.Request) -> web.Response:
        """Request counters and what the engine is doing now."""
        engine = self.synth.engine
        return web.json_response(
            {
                "requests": dataclasses.asdict(self.counters),
                "in_flight": self.in_flight,
                "engine": {
                    "alive": self.loop.alive,
                    "active": engine.active_count,
                    "waiting": len(engine.waiting),
                    "max_batch_size": engine.max_batch,
                },
            }
        )

    async def models(self, request: web.Request) -> web.Response:
        """OpenAI's model list (every ``model`` value is served by this one model)."""
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"id": self.config.model_id, "object": "model", "created": self.created, "owned_by": "sesame"}
                ],
            }
        )

    async def audio_models(self, request: web.Request) -> web.Response:
        """The TTS model list in the shape Open WebUI asks for."""
        return web.json_response({"models": [{"id": self.config.model_id}]})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        """vox-serve's ``POST /generate``."""
        return await self.respond(request, parse_generate(await read_fields(request), self.config))

    async def speech(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's ``POST /v1/audio/speech``."""
        return await self.respond(request, parse_speech(await read_fields(request), self.config))

    # -- answering ------------------------------------------------------------------------------

    def problem(self) -> ApiError | None:
        """Why no new request can be served right now, if anything."""
        if self.draining:
            return ApiError(503, "the server is shutting down", "shutting_down")
        if not self.loop.alive:
            reason = f": {type(self.loop.error).__name__}: {self.loop.error}" if self.loop.error else ""
            return ApiError(503, f"the generation loop has stopped{reason}; restart the server", "engine_stopped")
        return None

    def submit(self, job: Job) -> None:
        """Hand ``job`` to the engine loop (503 if the loop has died meanwhile)."""
        try:
            self.loop.submit(job)
        except RuntimeError:
            stopped = ApiError(503, "the generation loop is not running", "engine_stopped")
            raise self.problem() or stopped from None

    def job_failure(self, error: BaseException) -> ApiError:
        """The HTTP error for a job that failed inside the engine."""
        if isinstance(error, CsmError):
            return ApiError(error.http_status, str(error), error.code)
        problem = self.problem()
        if problem is not None:
            return problem
        return ApiError(500, f"generation failed: {type(error).__name__}: {error}", "generation_failed")

    def _admit(self, req: SpeechRequest) -> None:
        problem = self.problem()
        if problem is not None:
            raise problem
        if req.voice not in (None, NO_VOICE) and req.voice not in {v.name for v in self.synth.voices.list()}:
            raise ApiError(
                400, f"unknown voice {req.voice!r}: GET /v1/audio/voices lists the voices", "unknown_voice", "voice"
            )
        capacity = self.synth.engine.max_batch + self.config.max_queue
        if self.in_flight >= capacity:
            raise ApiError(
                503,
                f"server busy: {self.in_flight} requests in progress (the limit is {capacity}); retry shortly",
                "server_busy",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )

    async def respond(self, request: web.Request, req: SpeechRequest) -> web.StreamResponse:
        """Generate ``req`` and answer with a whole file, an audio stream or server-sent events."""
        self._admit(req)
        run = Run(self, req)
        _NOTE.get().run = run
        self.in_flight += 1
        try:
            async with contextlib.aclosing(run.chunks()) as chunks:
                if req.mode == "whole":
                    return await self._whole(run, chunks)
                return await self._stream(request, run, chunks)
        finally:
            self.in_flight -= 1

    def _headers(self, run: Run, whole: bool) -> dict[str, str]:
        fmt = run.req.fmt
        kind = {"wav": "audio/wav", "flac": "audio/flac", "pcm": f"audio/L16;rate={self.sample_rate};channels=1"}[fmt]
        headers = {
            "Content-Type": "text/event-stream" if run.req.mode == "sse" else kind,
            "X-Seed": str(run.req.options.seed),
            "X-Sample-Rate": str(self.sample_rate),
            "Cache-Control": "no-store",
        }
        if whole:
            headers.update(
                {
                    "X-Frames": str(run.frames),
                    "X-Stop-Reason": run.stop_reason,
                    "X-Audio-Seconds": f"{run.audio_seconds:.3f}",
                }
            )
        return headers

    async def _whole(self, run: Run, chunks: AsyncIterator[np.ndarray]) -> web.Response:
        pieces = [samples async for samples in chunks]
        samples = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
        if run.req.fmt == "pcm":
            body = _pcm(samples)
        else:
            body = await asyncio.to_thread(encode_audio, samples, run.req.fmt, self.sample_rate)
        return web.Response(body=body, headers=self._headers(run, whole=True))

    async def _stream(self, request: web.Request, run: Run, chunks: AsyncIterator[np.ndarray]) -> web.StreamResponse:
        sse = run.req.mode == "sse"

        def frame(data: bytes) -> bytes:
            return _sse({"type": "speech.audio.delta", "audio": _b64(data)}) if sse else data

        header = wav_stream_header(self.sample_rate) if run.req.fmt == "wav" else b""
        response: web.StreamResponse | None = None
        try:
            async for samples in chunks:
                if response is None:
                    response = await self._open(request, run)
                data, header = header + _pcm(samples), b""
                await response.write(frame(data))
            if response is None:
                response = await self._open(request, run)
            if header:
                await response.write(frame(header))
            if sse:
                await response.write(_sse({"type": "speech.audio.done"}))
        except ConnectionError:
            run.outcome = "cancelled"
            return response if response is not None else web.Response(status=499)
        except Exception as exc:  # after the headers went out, the stream can only end early
            if response is None:
                raise
            log.warning(
                "%s: stream ended early: %s: %s",
                _NOTE.get().rid,
                type(exc).__name__,
                exc,
                exc_info=not isinstance(exc, (ApiError, CsmError)),
            )
            if sse:
                code = getattr(exc, "code", "generation_failed")
                await response.write(_sse({"type": "error", "error": {"message": str(exc), "code": code}}))
        await response.write_eof()
        return response

    async def _open(self, request: web.Request, run: Run) -> web.StreamResponse:
        headers = {**self._headers(run, whole=False), "X-Request-Id": _NOTE.get().rid}
        response = web.StreamResponse(headers=headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        return response


def _pcm(samples: np.ndarray) -> bytes:
    return to_int16(samples).astype("<i2", copy=False).tobytes()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _sse(event: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def _http_error(exc: web.HTTPException) -> web.Response:
    """aiohttp's own errors (404, 405, 413, ...) as JSON."""
    headers = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
    message = exc.reason
    if isinstance(exc, web.HTTPMethodNotAllowed):
        message = f"method {exc.method} is not allowed here; use {', '.join(sorted(exc.allowed_methods))}"
    elif isinstance(exc, web.HTTPNotFound):
        message = "no such endpoint: see /health, /generate, /v1/audio/speech, /v1/models, /v1/audio/voices"
    code = exc.reason.lower().replace(" ", "_")
    return error_response(exc.status, message, code, headers=headers)


# -- running ------------------------------------------------------------------------------------


def warm_up(synth: Synthesizer, defaults: GenerationOptions) -> float:
    """Generate two frames per speaker (encoding the preset voices, caching their prefixes and warming
    the kernels) before the port opens; returns the seconds it took."""
    started = time.perf_counter()
    options = defaults.replace(max_audio_ms=2 * FRAME_MS, seed=0)
    for speaker in (0, 1):
        for job in synth.jobs("Warming up.", speaker, options=options):
            for _ in synth.run(job):
                pass
    return time.perf_counter() - started


def bind(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A socket bound to ``host:port`` but not listening yet: call it before loading the model so a
    port in use fails at once, while connections are refused until the server is warm."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise CsmError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def run_server(synth: Synthesizer, config: ServerConfig, sock: socket.socket) -> None:
    """Serve on ``sock`` (see :func:`bind`) until SIGTERM or SIGINT, then drain for up to
    ``config.grace_period`` seconds and return."""
    asyncio.run(_serve(synth, config, sock))


async def _serve(synth: Synthesizer, config: ServerConfig, sock: socket.socket) -> None:
    server = SpeechServer(synth, config)
    server.start()
    runner = web.AppRunner(
        server.app(), handler_cancellation=True, access_log=None, shutdown_timeout=config.grace_period
    )
    try:
        await runner.setup()
        await web.SockSite(runner, sock).start()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        log.info(
            "listening on http://%s:%d (batch %d, queue %d, %s)",
            shown,
            port,
            synth.engine.max_batch,
            config.max_queue,
            "API key required" if config.api_key else "no API key",
        )
        await stop.wait()
        server.draining = True
        log.info(
            "shutting down: %d request(s) in flight get up to %g s to finish", server.in_flight, config.grace_period
        )
        await runner.cleanup()
    finally:
        server.close()
    log.info("stopped")
