"""``csm play``: speak through the speakers while generating; line by line from stdin too."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from .common import GenerationFlags, ModelFlags, QuietOpt, VoiceFlags, command, stderr_is_tty
from .say import read_text

#: Speech runs at roughly this many characters per second (for the playback start estimate).
CHARS_PER_SECOND = 14.0
#: Earlier lines that condition the next one in line-by-line mode.
HISTORY_LINES = 3


@command
def play(
    text: Annotated[str | None, typer.Argument(help="Text to speak; nothing reads stdin line by line.")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Speak the text of this file.")] = None,
    output_device: Annotated[
        str | None, typer.Option("--output-device", "-d", help="Output device index or (part of its) name.")
    ] = None,
    list_devices: Annotated[bool, typer.Option("--list-devices", help="List output devices and exit.")] = False,
    *,
    speech: VoiceFlags,
    generation: GenerationFlags,
    loader: ModelFlags,
    quiet: QuietOpt = False,
) -> None:
    """Speak TEXT through the speakers as it is generated."""
    from .. import playback
    from ..utterance import History

    if list_devices:
        _print_devices(playback.list_devices())
        return
    options = generation.options()
    speaker, voice = speech.speaker, speech.voice
    out = playback.resolve_device(output_device)
    words = read_text(text, file) if text is not None or file is not None else None
    context = speech.explicit_context()
    show = not quiet and stderr_is_tty()
    synth = loader.load(show)
    base = context if context is not None else synth.voice_context(speaker, voice)
    history = History(HISTORY_LINES)

    def speak(line: str) -> None:
        utterance = synth.utterance(
            line, speaker, context=base, history=history.segments, options=options, first_chunk_frames=1, chunk_frames=6
        )
        expected = min(len(line) / CHARS_PER_SECOND, options.max_audio_ms / 1000)
        playback.play_stream(utterance.chunks(), device=out, expected_total_s=expected)
        if utterance.frames:
            history.add(line, speaker, codes=utterance.codes())

    if words is not None:
        speak(words)
        return
    for line in _lines():
        speak(line)


def _lines() -> Iterator[str]:
    """Non-empty stdin lines as they arrive (with a prompt when stdin is a terminal)."""
    interactive = sys.stdin is not None and sys.stdin.isatty()
    if interactive:
        print("Type a line and press Enter to hear it; Ctrl-D to quit.", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline() if sys.stdin is not None else ""
        if not line:
            return
        if line.strip():
            yield line.strip()


def _print_devices(devices: list[dict]) -> None:
    if not devices:
        typer.echo("no audio output devices found", err=True)
        return
    for d in devices:
        mark = "*" if d.get("default") else " "
        typer.echo(f"{mark} {d['index']:3d}  {d['name']}  ({d['max_output_channels']} ch)")


def register(app: typer.Typer) -> None:
    """Add ``play`` to the app."""
    app.command("play")(play)
