"""``csm serve``: an HTTP server (vox-serve's ``/generate`` plus OpenAI's ``/v1/audio/speech``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from ..errors import OptionsError
from .common import (
    CompileOpt,
    DeviceOpt,
    DtypeOpt,
    MaxAudioMsOpt,
    ModelOpt,
    QuantizeOpt,
    QuietOpt,
    RepetitionPenaltyOpt,
    SeedOpt,
    TemperatureOpt,
    TopKOpt,
    TopPOpt,
    generation_options,
    stderr_is_tty,
)
from .loading import load_synthesizer

_SERVER = "Server"
log = logging.getLogger("csmcli.server")


def serve(
    model: ModelOpt = "sesame/csm-1b",
    host: Annotated[
        str, typer.Option("--host", rich_help_panel=_SERVER, help="Address to listen on (0.0.0.0 for every interface).")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", "-p", rich_help_panel=_SERVER, help="Port to listen on (0 picks a free one).")
    ] = 8000,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    repetition_penalty: RepetitionPenaltyOpt = None,
    max_audio_ms: MaxAudioMsOpt = None,
    seed: SeedOpt = None,
    max_batch_size: Annotated[
        int,
        typer.Option(
            "--max-batch-size",
            "--max_batch_size",
            rich_help_panel=_SERVER,
            help="Requests generated together (engine slots).",
        ),
    ] = 8,
    max_queue: Annotated[
        int,
        typer.Option(
            "--max-queue",
            "--max_queue",
            rich_help_panel=_SERVER,
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
            rich_help_panel=_SERVER,
            help="Require 'Authorization: Bearer KEY' on everything but /health.",
        ),
    ] = None,
    request_timeout: Annotated[
        float,
        typer.Option(
            "--request-timeout",
            "--request_timeout",
            rich_help_panel=_SERVER,
            help="Seconds a request may take, queueing included.",
        ),
    ] = 300.0,
    grace_period: Annotated[
        float,
        typer.Option(
            "--grace-period",
            "--grace_period",
            rich_help_panel=_SERVER,
            help="Seconds in-flight requests get to finish after SIGTERM.",
        ),
    ] = 10.0,
    max_text_chars: Annotated[
        int,
        typer.Option(
            "--max-text-chars", "--max_text_chars", rich_help_panel=_SERVER, help="Longest text a request may carry."
        ),
    ] = 5000,
    read_only_voices: Annotated[
        bool,
        typer.Option(
            "--read-only-voices",
            "--read_only_voices",
            rich_help_panel=_SERVER,
            help="Refuse voice uploads and deletions over HTTP (POST/DELETE /v1/audio/voices).",
        ),
    ] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "none",
    compile_: CompileOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Serve speech over HTTP until SIGTERM or Ctrl-C (generation flags set the request defaults)."""
    from ..server import ServerConfig, bind, run_server, warm_up

    if not 0 <= port <= 65535:
        raise OptionsError(f"port must be between 0 and 65535, got {port}")
    defaults = generation_options(temperature, top_k, top_p, repetition_penalty, max_audio_ms, seed)
    config = ServerConfig(
        defaults=defaults,
        model_id=_model_id(model),
        max_queue=max_queue,
        api_key=api_key or None,
        request_timeout=request_timeout,
        grace_period=grace_period,
        max_text_chars=max_text_chars,
        read_only_voices=read_only_voices,
    )
    sock = bind(host, port)
    synth = load_synthesizer(model, device, dtype, not quiet and stderr_is_tty(), max_batch_size, quantize, compile_)
    log.info("loaded %s on %s (%s); warming up", model, synth.device, str(synth.dtype).removeprefix("torch."))
    log.info("warm-up took %.1f s", warm_up(synth, defaults))
    run_server(synth, config, sock)


def _model_id(model: str) -> str:
    """The id ``/v1/models`` reports: the hub id, or a local checkpoint's folder name."""
    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else model


def register(app: typer.Typer) -> None:
    """Add ``serve`` to the app."""
    app.command("serve")(serve)
