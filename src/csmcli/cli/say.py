"""``csm say``: one utterance to a file or to stdout."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, BinaryIO

import typer

from .. import formats
from ..audio import atomic_file
from ..errors import AudioError, InputError
from ..options import FRAME_MS, check_text
from .common import BitrateOpt, GenerationFlags, ModelFlags, QuietOpt, VoiceFlags, command, stderr_is_tty
from .progress import GenerationProgress

if TYPE_CHECKING:
    from collections.abc import Iterator

    from ..synthesizer import Job, Synthesizer


@command
def say(
    text: Annotated[str | None, typer.Argument(help="Text to speak; '-' or nothing reads stdin.")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Read the text from this file.")] = None,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Output file, or '-' for stdout [default: stdout when piped].")
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option("--format", help=f"{formats.choices_help()} [default: from the extension, else wav]."),
    ] = None,
    bitrate: BitrateOpt = None,
    *,
    speech: VoiceFlags,
    generation: GenerationFlags,
    loader: ModelFlags,
    quiet: QuietOpt = False,
) -> None:
    """Speak TEXT into an audio file (or stdout)."""
    options = generation.options()
    words = read_text(text, file)
    if output is None:
        if sys.stdout.isatty():
            raise InputError("no output given: pass -o FILE (or -o - for stdout), or use `csm play`")
        output = "-"
    kind = formats.for_path(None if output == "-" else output, fmt)
    formats.check_bitrate(kind, bitrate)
    if output != "-":
        check_writable(Path(output))
    show = not quiet and stderr_is_tty()
    context = speech.explicit_context()
    synth = loader.load(show)
    jobs = synth.jobs(
        words,
        speech.speaker,
        voice=speech.voice,
        context=context,
        options=options,
        first_chunk_frames=2,
        chunk_frames=8,
    )
    if output == "-":
        if kind == "raw":
            print(f"csm: writing raw PCM: signed 16-bit little-endian, mono, {synth.sample_rate} Hz", file=sys.stderr)
        encode_to(sys.stdout.buffer, formats.Encoder(kind, synth.sample_rate, bitrate), synth, jobs, show)
    else:
        with atomic_file(output) as f:
            encode_to(f, formats.Encoder(kind, synth.sample_rate, bitrate, out=f), synth, jobs, show)


def encode_to(out: BinaryIO, encoder: formats.Encoder, synth: Synthesizer, jobs: Iterator[Job], show: bool) -> None:
    """Run ``jobs`` and encode each decoded chunk as it comes; what the encoder hands back goes to ``out`` at once."""
    with GenerationProgress(show) as progress:
        frames = 0
        for job in jobs:
            for chunk in synth.stream_job(job):
                out.write(encoder.feed(chunk.samples))
                out.flush()
                frames += chunk.frames
                progress.update(frames, frames * FRAME_MS / 1000)
    out.write(encoder.finish())
    out.flush()


def read_text(text: str | None, file: Path | None) -> str:
    """The text to speak from the argument, ``-f FILE`` or stdin, checked to be non-empty."""
    if file is not None and text not in (None, "-"):
        raise InputError("give the text either as an argument or with -f FILE, not both")
    if file is not None:
        try:
            words = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read {file}: {getattr(exc, 'strerror', None) or exc}") from None
    elif text is None or text == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise InputError("no text: pass TEXT, -f FILE, or pipe text on stdin")
        words = sys.stdin.read()
    else:
        words = text
    check_text(words)
    return words.strip()


def check_writable(path: Path) -> None:
    """Fail before generating if ``path`` cannot be written."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise AudioError(f"cannot write {path}: it is a directory")
    if parent.exists() and not parent.is_dir():
        raise AudioError(f"cannot write {path}: {parent} is a file, not a directory")
    if not parent.is_dir():
        raise AudioError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise AudioError(f"cannot write {path}: permission denied")


def register(app: typer.Typer) -> None:
    """Add ``say`` to the app."""
    app.command("say")(say)
