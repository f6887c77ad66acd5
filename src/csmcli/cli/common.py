"""Options shared by the commands: one definition per flag, named like the API and HTTP fields."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..options import GenerationOptions

_GEN = "Generation"
_MODEL = "Model"

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model", "-m", envvar="CSM_MODEL", rich_help_panel=_MODEL, help="Hub id or local checkpoint directory."
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", rich_help_panel=_MODEL, help="auto|cpu|cuda|mps.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", rich_help_panel=_MODEL, help="auto|float32|bfloat16|float16.")]
QuantizeOpt = Annotated[
    str,
    typer.Option(
        "--quantize",
        envvar="CSM_QUANTIZE",
        rich_help_panel=_MODEL,
        help="none|int8: weight-only int8 (half the weight memory, faster on CPUs; slightly different audio).",
    ),
]
CompileOpt = Annotated[
    bool,
    typer.Option(
        "--compile",
        envvar="CSM_COMPILE",
        rich_help_panel=_MODEL,
        help="Compile the frame with torch.compile at start-up (a CPU needs --quantize int8): faster frames after "
        "10 s to a minute of compiling.",
    ),
]
SpeakerOpt = Annotated[int, typer.Option("--speaker", "-s", rich_help_panel=_GEN, help="Speaker id: 0 or 1.")]
TemperatureOpt = Annotated[
    float | None,
    typer.Option(
        "--temperature", "-t", rich_help_panel=_GEN, help="Sampling temperature \\[default: 0.9]; 0 = greedy."
    ),
]
TopKOpt = Annotated[
    int | None,
    typer.Option(
        "--top-k", "--top_k", rich_help_panel=_GEN, help="Keep the k likeliest codes \\[default: 50]; 1 = greedy."
    ),
]
TopPOpt = Annotated[
    float | None,
    typer.Option(
        "--top-p", "--top_p", rich_help_panel=_GEN, help="Nucleus sampling mass in (0, 1] \\[default: 1.0 = off]."
    ),
]
RepetitionPenaltyOpt = Annotated[
    float | None,
    typer.Option(
        "--repetition-penalty",
        "--repetition_penalty",
        rich_help_panel=_GEN,
        help="Penalty for codes used in the last 64 frames \\[default: 1.0 = off].",
    ),
]
MaxAudioMsOpt = Annotated[
    int | None,
    typer.Option(
        "--max-audio-ms",
        "--max_audio_ms",
        rich_help_panel=_GEN,
        help="Longest audio to generate, in ms \\[default: 90000].",
    ),
]
SeedOpt = Annotated[
    int | None, typer.Option("--seed", rich_help_panel=_GEN, help="Seed for reproducible sampling \\[default: random].")
]
VoiceOpt = Annotated[
    str | None,
    typer.Option(
        "--voice",
        "-v",
        rich_help_panel=_GEN,
        help="Voice name (preset or `csm voices add`), or 'none' for the raw model \\[default: the speaker's preset].",
    ),
]
ContextAudioOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--context-audio", rich_help_panel=_GEN, help="Audio of an earlier utterance to condition on (repeatable)."
    ),
]
ContextTextOpt = Annotated[
    list[str] | None,
    typer.Option("--context-text", rich_help_panel=_GEN, help="What the matching --context-audio says (repeatable)."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display on stderr.")]


def generation_options(
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float | None,
    max_audio_ms: int | None,
    seed: int | None,
    base: GenerationOptions | None = None,
) -> GenerationOptions:
    """Options from CLI flags; flags left out keep ``base``'s values (the defaults)."""
    return (base or GenerationOptions()).replace(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        max_audio_ms=max_audio_ms,
        seed=seed,
    )


def explicit_context(audio: list[Path] | None, text: list[str] | None, speaker: int):  # noqa: ANN201
    """Segments from --context-audio/--context-text, or None when none were given."""
    if not audio and not text:
        return None
    from ..voices import context_segments

    return context_segments(list(audio or []), list(text or []), speaker)


def stderr_is_tty() -> bool:
    """Whether progress displays make sense."""
    return sys.stderr.isatty()
