"""``csm say``: one utterance to a file or to stdout."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from .. import audio as audio_io
from ..errors import AudioError, InputError
from ..options import FRAME_MS, check_text
from .common import GenerationFlags, ModelFlags, QuietOpt, VoiceFlags, command, stderr_is_tty
from .progress import GenerationProgress


@command
def say(
    text: Annotated[str | None, typer.Argument(help="Text to speak; '-' or nothing reads stdin.")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Read the text from this file.")] = None,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Output file, or '-' for stdout [default: stdout when piped].")
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option("--format", help="wav|flac|ogg|raw (raw = s16le mono 24 kHz) [default: from the extension]."),
    ] = None,
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
    kind = audio_io.format_for(None if output == "-" else output, fmt)
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
    streaming = output == "-" and kind in ("raw", "wav")
    if streaming and kind == "raw":
        print("csm: writing raw PCM: signed 16-bit little-endian, mono, 24000 Hz", file=sys.stderr)
    pieces = []
    out = sys.stdout.buffer
    with GenerationProgress(show) as progress:
        if streaming and kind == "wav":
            out.write(audio_io.wav_stream_header(synth.sample_rate))
        frames = 0
        for job in jobs:
            for chunk in synth.run(job):
                if streaming:
                    out.write(audio_io.to_int16(chunk.samples).tobytes())
                    out.flush()
                else:
                    pieces.append(chunk.samples)
                frames += chunk.frames
                progress.update(frames, frames * FRAME_MS / 1000)
    if streaming:
        return
    samples = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
    if output == "-":
        out.write(audio_io.encode_audio(samples, kind, synth.sample_rate))
        out.flush()
    else:
        audio_io.write_audio(output, samples, kind, synth.sample_rate)


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
