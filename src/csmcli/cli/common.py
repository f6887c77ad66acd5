"""Flags shared by the commands, each declared once, named like the API and HTTP fields.

A command takes a whole group of flags as one parameter annotated with a group class
(:class:`ModelFlags`, :class:`GenerationFlags`, :class:`VoiceFlags`); :func:`command` spreads the
group's fields into the command line and hands the command the group built from the parsed values.
Nothing here imports torch: help, usage errors and these checks stay fast.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, get_type_hints

import typer

from .. import formats
from ..options import DEFAULT_MODEL, REPETITION_WINDOW, GenerationOptions, check_speaker
from ..threads import AUTO, check_threads

if TYPE_CHECKING:
    from ..prompt import Segment
    from ..synthesizer import Synthesizer

_DEFAULTS = GenerationOptions()

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", envvar="CSM_MODEL", help="Hub id or local checkpoint directory.")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto|cpu|cuda|mps.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto|float32|bfloat16|float16.")]
QuantizeOpt = Annotated[
    str,
    typer.Option(
        "--quantize",
        envvar="CSM_QUANTIZE",
        help="none|int8|int4: weight-only int8 (half the weight memory, faster on CPUs) or 4-bit groups (int4; "
        "heads and the decoder's input projection stay int8); slightly different audio; quantized once and cached.",
    ),
]
CompileOpt = Annotated[
    bool,
    typer.Option(
        "--compile",
        envvar="CSM_COMPILE",
        help="Compile the frame with torch.compile at start-up (a CPU needs --quantize int8 or int4, or bf16 "
        "without AMX): faster frames after 10 s to a minute of compiling.",
    ),
]
ThreadsOpt = Annotated[
    str,
    typer.Option(
        "--threads",
        help="CPU threads: a number, or auto: the physical cores other processes leave free (measured at start-up).",
    ),
]
BitrateOpt = Annotated[str | None, typer.Option("--bitrate", help=formats.bitrate_help())]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display on stderr.")]


@dataclass(frozen=True)
class ModelFlags:
    """Which checkpoint to load and how: ``--model --device --dtype --quantize --compile --threads``;
    the thread count is checked on parsing."""

    model: ModelOpt = DEFAULT_MODEL
    device: DeviceOpt = "auto"
    dtype: DtypeOpt = "auto"
    quantize: QuantizeOpt = "none"
    compile: CompileOpt = False
    threads: ThreadsOpt = AUTO

    def __post_init__(self) -> None:
        check_threads(self.threads)

    @property
    def thread_setting(self) -> int | str:
        """``--threads`` as the loader takes it: ``auto`` or a number."""
        return check_threads(self.threads)

    def load(self, show: bool, max_batch_size: int = 1) -> Synthesizer:
        """The :class:`~csmcli.synthesizer.Synthesizer` for these flags (spinner on stderr when ``show``)."""
        from .loading import load_synthesizer

        return load_synthesizer(
            self.model,
            self.device,
            self.dtype,
            show,
            max_batch_size,
            quantize=self.quantize,
            compile=self.compile,
            threads=self.thread_setting,
        )


@dataclass(frozen=True)
class GenerationFlags:
    """The sampling flags; their names are :data:`csmcli.options.OPTION_FIELDS`, their defaults the API's."""

    temperature: Annotated[float, typer.Option("--temperature", "-t", help="Sampling temperature; 0 = greedy.")] = (
        _DEFAULTS.temperature
    )
    top_k: Annotated[int, typer.Option("--top-k", "--top_k", help="Keep the k likeliest codes; 1 = greedy.")] = (
        _DEFAULTS.top_k
    )
    top_p: Annotated[float, typer.Option("--top-p", "--top_p", help="Nucleus sampling mass in (0, 1]; 1 = off.")] = (
        _DEFAULTS.top_p
    )
    repetition_penalty: Annotated[
        float,
        typer.Option(
            "--repetition-penalty",
            "--repetition_penalty",
            help=f"Penalty for codes used in the last {REPETITION_WINDOW} frames; 1 = off.",
        ),
    ] = _DEFAULTS.repetition_penalty
    max_audio_ms: Annotated[
        int, typer.Option("--max-audio-ms", "--max_audio_ms", help="Longest audio to generate, in ms.")
    ] = _DEFAULTS.max_audio_ms
    seed: Annotated[
        int | None, typer.Option("--seed", help="Seed for reproducible sampling (a fresh one per run when left out).")
    ] = _DEFAULTS.seed

    def options(self) -> GenerationOptions:
        """The flags as checked :class:`GenerationOptions` (a one-line OptionsError when out of range)."""
        return GenerationOptions(**dataclasses.asdict(self))


@dataclass(frozen=True)
class VoiceFlags:
    """Who speaks: ``--speaker --voice --context-audio --context-text``; the speaker is checked on parsing."""

    speaker: Annotated[int, typer.Option("--speaker", "-s", help="Speaker id: 0 or 1.")] = 0
    voice: Annotated[
        str | None,
        typer.Option(
            "--voice",
            "-v",
            help="Voice name (preset or `csm voices add`), or 'none' for the raw model; the speaker's preset "
            "when left out.",
        ),
    ] = None
    context_audio: Annotated[
        list[Path] | None,
        typer.Option("--context-audio", help="Audio of an earlier utterance to condition on (repeatable)."),
    ] = None
    context_text: Annotated[
        list[str] | None,
        typer.Option("--context-text", help="What the matching --context-audio says (repeatable)."),
    ] = None

    def __post_init__(self) -> None:
        check_speaker(self.speaker)

    def explicit_context(self) -> list[Segment] | None:
        """Segments from --context-audio/--context-text, or None when none were given."""
        if not self.context_audio and not self.context_text:
            return None
        from ..voices import context_segments

        return context_segments(list(self.context_audio or []), list(self.context_text or []), self.speaker)


FLAG_GROUPS = (ModelFlags, GenerationFlags, VoiceFlags)
#: The OpenMP settings that decide whether waiting threads spin; when the user sets none, csmcli decides.
OPENMP_SPIN_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def openmp_waits(expect_load: bool = False) -> None:
    """Before torch loads, unless the user chose a policy: if other processes keep a core busy now (or
    ``expect_load``: ``csm bench --busy-cores``), waiting OpenMP threads sleep (``OMP_WAIT_POLICY=PASSIVE``).

    A spinning thread that shares its core with a busy process holds it for a time slice at each of a
    frame's hundreds of barriers (seconds a frame), where a sleeping one costs a wake-up; on free
    cores spinning is faster (int4: about 145 against 210 ms a frame on 2 cores), and ``--threads
    auto`` keeps to the free cores."""
    from ..threads import busy_cores

    if "torch" in sys.modules or any(name in os.environ for name in OPENMP_SPIN_SETTINGS):
        return
    try:
        loaded = expect_load or busy_cores() >= 0.5
    except (OSError, ValueError):  # no /proc: keep OpenMP's default
        loaded = False
    if loaded:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


F = TypeVar("F", bound=Callable[..., Any])


def command(func: F) -> F:
    """``func`` as a Typer command whose flag-group parameters are spread into their flags.

    The group's flags take the parameter's place in the help; the call gets the group object, built
    (and so checked) before the command's body runs.
    """
    hints = get_type_hints(func, include_extras=True)
    params: list[inspect.Parameter] = []
    groups: dict[str, type] = {}
    for param in inspect.signature(func).parameters.values():
        kind = hints.get(param.name, param.annotation)
        if kind in FLAG_GROUPS:
            groups[param.name] = kind
            fields = get_type_hints(kind, include_extras=True)
            params += [
                inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=fields[f.name])
                for f in dataclasses.fields(kind)
            ]
        else:
            params.append(param.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=kind))

    @functools.wraps(func)
    def run(**values: Any) -> Any:
        if ModelFlags in groups.values():
            openmp_waits(expect_load=bool(values.get("busy_cores")))
        for name, kind in groups.items():
            values[name] = kind(**{f.name: values.pop(f.name) for f in dataclasses.fields(kind)})
        return func(**values)

    del run.__wrapped__  # Typer reads the spread signature below, not func's
    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params}
    return run  # type: ignore[return-value]


def stderr_is_tty() -> bool:
    """Whether progress displays make sense."""
    return sys.stderr.isatty()
