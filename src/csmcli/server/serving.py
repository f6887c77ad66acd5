"""Running the server: the listening socket, warm-up, connection limits and timeouts, and shutdown.

aiohttp answers what it rejects before a handler runs (a garbage request line, an oversized header,
``Content-Length`` with ``Transfer-Encoding``) in plain text; :class:`JsonErrorHandler` answers
those in the server's JSON error shape.  Connections beyond ``max_connections`` get 503 and are
closed at once.  SIGTERM or Ctrl-C starts a drain: for up to ``grace_period`` seconds ``/health``
and new work answer 503 while in-flight requests finish; then the rest are cut and the process
exits 0.  A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from ..errors import CsmError
from ..options import FRAME_MS, SPEAKERS, GenerationOptions
from .app import RETRY_AFTER_S, SpeechServer
from .config import ServerConfig
from .requests import SHOWN_CHARS, error_body, error_response

if TYPE_CHECKING:
    from ..synthesizer import Synthesizer

log = logging.getLogger("csmcli.server")

#: Seconds requests still running after the grace period get to notice their cancellation.
CUT_S = 0.5


class JsonErrorHandler(RequestHandler):
    """aiohttp's connection handler, with its own request errors answered as JSON and a refusal
    (503, closed at once) for a connection past its server's limit."""

    limiter: LimitedServer | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Serve the connection, or refuse it when the server already has its most."""
        limiter = self.limiter
        if limiter is not None and len(limiter.connections) >= limiter.max_connections:
            limiter.refused += 1
            body = error_body(503, "too many open connections; retry shortly", "too_many_connections")
            head = (
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: {RETRY_AFTER_S}\r\nConnection: close\r\n\r\n"
            )
            transport.write(head.encode() + body)  # type: ignore[attr-defined]
            transport.close()
            return
        super().connection_made(transport)

    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        """The JSON error for a request aiohttp could not parse or handle (the connection closes after it)."""
        if request.writer.output_size > 0:
            raise ConnectionError("the response has begun: it cannot become an error response")
        phrase = HTTPStatus(status).phrase
        detail = (message or "").strip().splitlines()[0][: 2 * SHOWN_CHARS] if message else ""
        if status >= 500:
            log.error("%s %s: %s", status, phrase, detail or type(exc).__name__, exc_info=exc)
        else:  # one line, no traceback: anyone can send garbage
            log.info("%s from %s: %s", status, request.remote, detail or phrase)
        response = error_response(
            status, f"{phrase}: {detail}" if detail else phrase, phrase.lower().replace(" ", "_").replace("-", "_")
        )
        response.force_close()
        return response


class LimitedServer(web.Server):
    """aiohttp's server (one :class:`JsonErrorHandler` per connection) with a cap on open connections."""

    def __init__(self, *args: Any, max_connections: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_connections = max_connections
        self.refused = 0

    def __call__(self) -> RequestHandler:
        """The handler for a new connection (it checks the limit once the connection is made)."""
        handler = JsonErrorHandler(self, loop=self._loop, **self._kwargs)
        handler.limiter = self
        return handler


class Runner(web.AppRunner):
    """An :class:`~aiohttp.web.AppRunner` whose connections are :class:`LimitedServer`'s."""

    def __init__(self, app: web.Application, max_connections: int, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.max_connections = max_connections

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        return LimitedServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            max_connections=self.max_connections,
            **plain._kwargs,
        )


def warm_up(synth: Synthesizer, defaults: GenerationOptions) -> float:
    """Generate two frames per speaker (encoding the preset voices, caching their prefixes and warming
    the kernels) before the port opens; returns the seconds it took."""
    started = time.perf_counter()
    options = defaults.replace(max_audio_ms=2 * FRAME_MS, seed=0)
    for speaker in SPEAKERS:
        for job in synth.jobs("Warming up.", speaker, options=options):
            for _ in synth.stream_job(job):
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


def make_runner(server: SpeechServer) -> Runner:
    """The runner for ``server``'s app with the config's connection limit and timeouts."""
    config = server.config
    return Runner(
        server.app(),
        max_connections=config.max_connections,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=CUT_S,
        keepalive_timeout=config.keepalive_timeout,
        lingering_time=min(config.read_timeout, 10.0),
    )


def run_server(synth: Synthesizer, config: ServerConfig, sock: socket.socket) -> None:
    """Serve on ``sock`` (see :func:`bind`) until SIGTERM or SIGINT, then drain for up to
    ``config.grace_period`` seconds and return."""
    asyncio.run(_serve(synth, config, sock))


async def _serve(synth: Synthesizer, config: ServerConfig, sock: socket.socket) -> None:
    server = SpeechServer(synth, config)
    server.start()
    runner = make_runner(server)
    try:
        await runner.setup()
        await web.SockSite(runner, sock).start()
        stop = asyncio.Event()
        aloop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            aloop.add_signal_handler(sig, _on_signal, sig, stop)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        log.info(
            "listening on http://%s:%d (batch %d, queue %d, %s)",
            shown,
            port,
            synth.capacity,
            config.max_queue,
            "API key required" if config.api_key else "no API key",
        )
        await stop.wait()
        await drain(server, config.grace_period)
        await runner.cleanup()
    finally:
        server.close()
    log.info("stopped")


async def drain(server: SpeechServer, grace_period: float) -> None:
    """Answer 503 to new work (the listener stays open) until in-flight requests finish or
    ``grace_period`` seconds pass; those still running after it are cut by the runner's cleanup."""
    server.draining = True
    log.info("shutting down: %d request(s) in flight get up to %g s to finish", server.in_flight, grace_period)
    try:
        await asyncio.wait_for(server.idle.wait(), grace_period)
    except asyncio.TimeoutError:
        log.warning("grace period over: cutting %d request(s) still in flight", server.in_flight)


def _on_signal(sig: signal.Signals, stop: asyncio.Event) -> None:
    if not stop.is_set():
        stop.set()
        return
    log.warning("second %s: exiting now", sig.name)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    os._exit(128 + sig)
