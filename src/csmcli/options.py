"""Generation options: one definition shared by the Python API, the CLI flags and the HTTP fields."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .errors import InputError, OptionsError

#: The model ``csm`` and :meth:`Synthesizer.load` use when none is named.
DEFAULT_MODEL = "sesame/csm-1b"
#: Milliseconds of audio per generated frame (Mimi runs at 12.5 frames per second).
FRAME_MS = 80
#: The speaker ids CSM-1B knows.
SPEAKERS = (0, 1)
#: How many recent frames the repetition penalty looks back over.
REPETITION_WINDOW = 64
#: Largest ``top_k``: the audio codes per codebook (a larger k would filter nothing, and overflows the sampler).
MAX_TOP_K = 2051


@dataclass(frozen=True)
class GenerationOptions:
    """How to sample one utterance.

    ``temperature == 0`` or ``top_k == 1`` means greedy decoding (argmax, deterministic).
    ``top_p == 1.0`` and ``repetition_penalty == 1.0`` switch those filters off.
    ``seed`` makes sampling reproducible; ``None`` draws a fresh seed for every request.
    """

    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_audio_ms: int = 90_000
    seed: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature == 0 or self.top_k == 1

    @property
    def max_frames(self) -> int:
        """The frame budget implied by ``max_audio_ms`` (at least one frame)."""
        return max(1, math.ceil(self.max_audio_ms / FRAME_MS))

    def replace(self, **changes: Any) -> GenerationOptions:
        """A copy with some fields changed; ``None`` values are ignored (meaning "keep")."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Raise :class:`OptionsError` with a one-line message if any field is out of range."""
        _check_number("temperature", self.temperature, float)
        _check_number("top_k", self.top_k, int)
        _check_number("top_p", self.top_p, float)
        _check_number("repetition_penalty", self.repetition_penalty, float)
        _check_number("max_audio_ms", self.max_audio_ms, int)
        if self.seed is not None:
            _check_number("seed", self.seed, int)
        if not 0 <= self.temperature <= 10:
            raise OptionsError(f"temperature must be between 0 and 10 (0 = greedy), got {self.temperature}")
        if not 1 <= self.top_k <= MAX_TOP_K:
            raise OptionsError(f"top_k must be between 1 and {MAX_TOP_K}, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise OptionsError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not 1 <= self.repetition_penalty <= 10:
            raise OptionsError(f"repetition_penalty must be between 1 and 10 (1 = off), got {self.repetition_penalty}")
        if not FRAME_MS <= self.max_audio_ms <= 3_600_000:
            raise OptionsError(f"max_audio_ms must be between {FRAME_MS} and 3600000, got {self.max_audio_ms}")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise OptionsError(f"seed must be between 0 and 4294967295, got {self.seed}")

    @classmethod
    def from_mapping(cls, fields: dict[str, Any], base: GenerationOptions | None = None) -> GenerationOptions:
        """Build options from loosely typed fields (HTTP JSON or form), coercing digit strings.

        Unknown keys are not accepted here; callers pick the option keys out first.
        """
        base = base or cls()
        coerced: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in fields or fields[f.name] is None:
                continue
            coerced[f.name] = _coerce(f.name, fields[f.name], int if f.name in INT_FIELDS else float)
        return dataclasses.replace(base, **coerced)


#: Option fields whose values are integers.
INT_FIELDS = frozenset({"top_k", "max_audio_ms", "seed"})
#: Every option field name, in declaration order (the CLI, HTTP and API all use these).
OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(GenerationOptions))


def check_text(text: str) -> None:
    """Reject empty or non-string text with a one-line error."""
    if not isinstance(text, str) or not text.strip():
        raise InputError("text is empty: give some words to speak")


def check_speaker(speaker: int) -> None:
    """CSM-1B knows speakers 0 and 1."""
    if isinstance(speaker, bool) or not isinstance(speaker, int) or speaker not in SPEAKERS:
        raise InputError(f"speaker must be 0 or 1, got {speaker!r}")


def real_time_factor(seconds: float, audio_seconds: float) -> str:
    """The one speed figure every front end reports: generation time over audio duration, so
    below 1 is faster than real time; ``-`` when there is no audio."""
    return f"{seconds / audio_seconds:.2f}" if audio_seconds > 0 else "-"


def format_rtf(seconds: float, audio_seconds: float) -> str:
    """The real-time factor in words, e.g. ``RTF 0.67 (faster than real time)``."""
    rtf = real_time_factor(seconds, audio_seconds)
    if rtf == "-":
        return "RTF -"
    pace = "faster than" if float(rtf) < 1 else "slower than" if float(rtf) > 1 else "as fast as"
    return f"RTF {rtf} ({pace} real time)"


def _check_number(name: str, value: Any, kind: type) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and isinstance(value, int):
        ok = kind is int or abs(value) < 2**1000  # float() of a bigger int overflows
    elif ok and kind is int:
        ok = value.is_integer()
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        shown = repr(value) if len(repr(value)) < 40 else f"{repr(value)[:20]}... ({len(repr(value))} characters)"
        raise OptionsError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {shown}")


def _coerce(name: str, value: Any, kind: type) -> int | float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise OptionsError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None
    _check_number(name, value, kind)
    return int(value) if kind is int else float(value)
