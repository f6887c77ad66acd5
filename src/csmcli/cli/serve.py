"""``csm serve``: an HTTP server (vox-serve's ``/generate`` plus OpenAI's ``/v1/audio/speech``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from ..errors import OptionsError
from .common import GenerationFlags, ModelFlags, QuietOpt, command, stderr_is_tty

log = logging.getLogger("csmcli.server")


@command
def serve(
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (0.0.0.0 for every interface).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", help="Port to listen on (0 picks a free one).")] = 8000,
    max_batch_size: Annotated[
        int,
        typer.Option(
            "--max-batch-size",
            "--max_batch_size",
            help="Requests generated together (engine slots).",
        ),
    ] = 8,
    max_queue: Annotated[
        int,
        typer.Option(
            "--max-queue",
            "--max_queue",
            help="Requests that may wait for a slot; beyond that: 503 with Retry-After.",
        ),
    ] = 32,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            "--api_key",
            envvar="CSM_API_KEY",
            show_default=False,
            help="Require 'Authorization: Bearer KEY' on everything but /health.",
        ),
    ] = None,
    request_timeout: Annotated[
        float,
        typer.Option(
            "--request-timeout",
            "--request_timeout",
            help="Seconds a request may take, queueing included.",
        ),
    ] = 300.0,
    grace_period: Annotated[
        float,
        typer.Option(
            "--grace-period",
            "--grace_period",
            help="Seconds in-flight requests get to finish after SIGTERM (a second signal exits at once).",
        ),
    ] = 10.0,
    max_text_chars: Annotated[
        int,
        typer.Option("--max-text-chars", "--max_text_chars", help="Longest text a request may carry."),
    ] = 5000,
    keepalive_timeout: Annotated[
        float,
        typer.Option(
            "--keepalive-timeout",
            "--keepalive_timeout",
            help="Seconds an idle connection (or one still sending its first headers) is kept open.",
        ),
    ] = 15.0,
    read_timeout: Annotated[
        float,
        typer.Option(
            "--read-timeout",
            "--read_timeout",
            help="Seconds a request body may take to arrive (slower: 408).",
        ),
    ] = 30.0,
    max_connections: Annotated[
        int,
        typer.Option(
            "--max-connections",
            "--max_connections",
            help="Open connections allowed; more get 503 and are closed.",
        ),
    ] = 256,
    read_only_voices: Annotated[
        bool,
        typer.Option(
            "--read-only-voices",
            "--read_only_voices",
            help="Refuse voice uploads and deletions over HTTP (POST/DELETE /v1/audio/voices).",
        ),
    ] = False,
    *,
    generation: GenerationFlags,
    loader: ModelFlags,
    quiet: QuietOpt = False,
) -> None:
    """Serve speech over HTTP until SIGTERM or Ctrl-C (generation flags set the request defaults)."""
    from ..server import ServerConfig, bind, run_server, warm_up

    if not 0 <= port <= 65535:
        raise OptionsError(f"port must be between 0 and 65535, got {port}")
    defaults = generation.options()
    config = ServerConfig(
        defaults=defaults,
        model_id=_model_id(loader.model),
        max_queue=max_queue,
        api_key=api_key or None,
        request_timeout=request_timeout,
        grace_period=grace_period,
        max_text_chars=max_text_chars,
        keepalive_timeout=keepalive_timeout,
        read_timeout=read_timeout,
        max_connections=max_connections,
        read_only_voices=read_only_voices,
    )
    sock = bind(host, port)
    synth = loader.load(not quiet and stderr_is_tty(), max_batch_size)
    log.info("loaded %s on %s (%s); warming up", loader.model, synth.device, str(synth.dtype).removeprefix("torch."))
    log.info("warm-up took %.1f s", warm_up(synth, defaults))
    run_server(synth, config, sock)


def _model_id(model: str) -> str:
    """The id ``/v1/models`` reports: the hub id, or a local checkpoint's folder name."""
    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else model


def register(app: typer.Typer) -> None:
    """Add ``serve`` to the app."""
    app.command("serve")(serve)
