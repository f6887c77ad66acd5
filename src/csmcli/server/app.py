"""The aiohttp application: routes, the error/auth/logging middleware, admission and request counters.

Every error is JSON ``{"error": {"message", "type", "code", "param"}}``.  A client that goes away
cancels its job at the next frame, a full server answers 503 with ``Retry-After``, and while the
server drains (after SIGTERM) ``/health`` and new work answer 503 while in-flight work finishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..engine import Job
from ..errors import CsmError
from ..voices import NO_VOICE
from . import voices_api
from .config import ServerConfig
from .context import read_body, with_context
from .requests import (
    GENERATE_FIELDS,
    MAX_BODY_BYTES,
    SPEECH_FIELDS,
    ApiError,
    SpeechRequest,
    error_response,
    parse_generate,
    parse_speech,
    shown,
)
from .streaming import CURRENT, Note, Run, answer_stream, answer_whole

if TYPE_CHECKING:
    from ..synthesizer import Synthesizer

log = logging.getLogger("csmcli.server")

#: Seconds a busy client is told to wait before retrying.
RETRY_AFTER_S = 1


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


class SpeechServer:
    """The aiohttp application around one synthesizer and its engine loop."""

    def __init__(self, synth: Synthesizer, config: ServerConfig) -> None:
        self.synth = synth
        self.config = config
        self.sample_rate = synth.sample_rate
        self.loop = synth.background_loop()
        self.counters = Counters()
        self.in_flight = 0
        self.draining = False
        self.idle = asyncio.Event()  # set while no request is generating
        self.idle.set()
        self.created = int(time.time())

    def start(self) -> None:
        """Start the engine loop thread."""
        self.loop.start()

    def close(self) -> None:
        """Stop the engine loop thread."""
        self.loop.stop(timeout=10)

    def app(self) -> web.Application:
        """The routes, with the error, auth and logging middleware."""
        limit = max(MAX_BODY_BYTES, self.config.max_context_bytes)  # read_body keeps bodies without context smaller
        app = web.Application(client_max_size=limit, middlewares=[self._middleware])
        app.router.add_get("/health", self.health)
        app.router.add_post("/generate", self.generate)
        app.router.add_post("/v1/audio/speech", self.speech)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/audio/models", self.audio_models)
        app.router.add_get("/v1/stats", self.stats)
        voices_api.add_routes(app, self)  # the voices API and the playground page
        return app

    # -- middleware -----------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        note = Note(secrets.token_hex(6))
        CURRENT.set(note)
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
            if self.draining:
                response.force_close()  # keep-alive clients reconnect to a server that is up
        self._record(request, note, response, started)
        return response

    def _authorize(self, request: web.Request) -> None:
        key = self.config.api_key
        if not key or request.path == "/health" or voices_api.is_public(request.path):
            return
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                401,
                "missing API key: send 'Authorization: Bearer <key>'",
                "missing_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        try:  # aiohttp decodes header bytes as UTF-8 with surrogateescape; compare the bytes
            given = token.strip().encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            given = b""
        if not hmac.compare_digest(given, key.encode()):
            raise ApiError(401, "invalid API key", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def _record(self, request: web.Request, note: Note, response: web.StreamResponse | None, started: float) -> None:
        """Count the request and log one line about it (health checks only at debug level)."""
        run = note.run
        status = response.status if response is not None else 0
        c = self.counters
        c.requests += 1
        if status == 503 and "Retry-After" in response.headers:
            c.busy += 1
        elif status == 504:
            c.timed_out += run is None or run.outcome != "timeout"  # a run's timeout is counted below
        elif status >= 500:
            c.failed += 1
        elif status >= 400:
            c.client_errors += 1
        if run is not None:
            c.frames += run.frames
            c.audio_seconds += run.audio_seconds
            c.cancelled += run.outcome in ("cancelled", "slow_client")
            c.timed_out += run.outcome == "timeout"
            c.completed += run.outcome == "done"
        cut = status == 200 and run is not None and run.outcome in ("timeout", "slow_client", "error")
        if response is None:
            what = "cut off at shutdown" if self.draining else "client went away"
        else:
            what = f"200 cut ({run.outcome})" if cut else str(status)
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
        return web.json_response(
            {
                "status": "ok",
                "model": self.config.model_id,
                "sample_rate": self.sample_rate,
                "in_flight": self.in_flight,
                "max_batch_size": self.synth.capacity,
                "max_queue": self.config.max_queue,
            }
        )

    async def stats(self, request: web.Request) -> web.Response:
        """Request counters (audio seconds rounded to the millisecond) and what the engine is doing now."""
        counts = dataclasses.asdict(self.counters)
        return web.json_response(
            {
                "requests": {**counts, "audio_seconds": round(counts["audio_seconds"], 3)},
                "in_flight": self.in_flight,
                "engine": {"alive": self.loop.alive, **self.synth.stats()},
                "context": {"encodes": self.synth.context_encodes, "cache_hits": self.synth.context_hits},
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
        fields = await read_body(request, self.config, GENERATE_FIELDS)
        req = parse_generate(fields, self.config.defaults, self.config.max_text_chars)
        return await self.respond(request, with_context(req, fields, self.config))

    async def speech(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's ``POST /v1/audio/speech``."""
        fields = await read_body(request, self.config, SPEECH_FIELDS)
        req = parse_speech(fields, self.config.defaults, self.config.max_text_chars)
        return await self.respond(request, with_context(req, fields, self.config))

    # -- answering ------------------------------------------------------------------------------

    def problem(self) -> ApiError | None:
        """Why no new request can be served right now, if anything."""
        if self.draining:
            return ApiError(
                503, "the server is shutting down", "shutting_down", headers={"Retry-After": str(RETRY_AFTER_S)}
            )
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
        if (
            req.context is None
            and req.voice not in (None, NO_VOICE)
            and req.voice not in {v.name for v in self.synth.voices.list()}
        ):
            message = f"unknown voice {shown(req.voice)}: GET /v1/audio/voices lists the voices"
            raise ApiError(400, message, "unknown_voice", "voice")
        capacity = self.synth.capacity + self.config.max_queue
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
        CURRENT.get().run = run
        self.in_flight += 1
        self.idle.clear()
        try:
            async with contextlib.aclosing(run.chunks()) as chunks:
                if req.mode == "whole":
                    return await answer_whole(run, chunks, self.sample_rate)
                return await answer_stream(request, run, chunks, self.sample_rate)
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self.idle.set()


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
