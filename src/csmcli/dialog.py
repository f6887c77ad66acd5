"""Dialogue scripts for ``csm batch``: parsing and validation of the plain-text and JSON Lines formats.

Plain text, one turn per line::

    # comments and blank lines are skipped
    Alice: Did you hear that?
    Bob: Hear what?
    [0] A line for speaker 0 by number.

Names become speakers 0 and 1 in order of first appearance unless a mapping (``Alice=0,Bob=1``)
is given.  JSON Lines (``.jsonl``), one object per turn: ``text``, ``speaker`` (0, 1 or a name),
optional ``voice``, optional ``out`` (the turn's file name) and optional generation options
(``temperature``, ``seed``, ...).  The whole file is checked before anything is generated and
every problem is reported as ``FILE:LINE: message``.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import CsmError, InputError
from .formats import extensions_help, for_path
from .options import OPTION_FIELDS, SPEAKERS, GenerationOptions

#: Suffixes read as JSON Lines; every other file is plain text.
JSONL_SUFFIXES = (".jsonl", ".ndjson")
#: Fields a JSON Lines turn may have besides the generation options.
TURN_FIELDS = ("text", "speaker", "voice", "out")

_NAME = r"[^\W\d_][\w .'\-]{0,39}"
_BRACKET = re.compile(r"\[\s*([^\]]*?)\s*\]\s*(.*)")
_NAMED = re.compile(rf"({_NAME}?)\s*:\s*(.*)")


@dataclass(frozen=True)
class Turn:
    """One line of a dialogue: who says what, and how.

    ``number`` counts turns from 1; ``line`` is where the turn is in its file.  ``options``
    holds per-turn generation options (JSON Lines only) on top of the command's.
    """

    number: int
    line: int
    text: str
    speaker: int
    name: str
    voice: str | None = None
    out: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Script:
    """A parsed dialogue file."""

    path: Path
    turns: list[Turn]

    @property
    def label(self) -> str:
        """The file as the user named it, for messages."""
        return str(self.path)


class ScriptError(InputError):
    """A script has problems; ``problems`` lists every one as ``FILE:LINE: message``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(problems[0] if len(problems) == 1 else f"{len(problems)} problems in the script")
        self.problems = problems


def parse_pairs(spec: str | None, flag: str) -> list[tuple[str, str]]:
    """``"A=x,B=y"`` as ``[("A", "x"), ("B", "y")]``; a one-line error naming ``flag`` otherwise."""
    if spec is None:
        return []
    pairs = []
    for item in spec.split(","):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise InputError(f"{flag}: expected NAME=VALUE pairs separated by commas, got {item.strip()!r}")
        pairs.append((key.strip(), value.strip()))
    return pairs


def _speaker_tag(text: str) -> int | None:
    """The speaker id a written ``0`` or ``1`` names (None for anything else)."""
    return next((s for s in SPEAKERS if text == str(s)), None)


def parse_speakers(spec: str | None) -> dict[str, int] | None:
    """``--speakers Alice=0,Bob=1`` as a name -> speaker id mapping (None when not given)."""
    pairs = parse_pairs(spec, "--speakers")
    if not pairs:
        return None
    mapping = {}
    for name, value in pairs:
        speaker = _speaker_tag(value)
        if speaker is None:
            raise InputError(f"--speakers: speaker id for {name!r} must be 0 or 1, got {value!r}")
        mapping[name] = speaker
    return mapping


class ThirdSpeaker(ValueError):
    """A name beyond the two speakers CSM-1B has, with no ``--speakers`` mapping given."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class SpeakerNames:
    """Maps names to speaker ids: a fixed mapping, or ids in order of first appearance."""

    def __init__(self, fixed: dict[str, int] | None = None) -> None:
        self.fixed = fixed is not None
        self.ids: dict[str, int] = {}
        self.spelling: dict[str, str] = {}
        self.unmapped: dict[str, str] = {}
        for name, speaker in (fixed or {}).items():
            self._add(name, speaker)

    def _add(self, name: str, speaker: int) -> None:
        self.ids[name.casefold()] = speaker
        self.spelling.setdefault(name.casefold(), name)

    def resolve(self, name: str) -> tuple[int, str]:
        """The speaker id and display name for ``name``; :class:`ValueError` with the reason if none
        (:class:`ThirdSpeaker` for a name beyond the first two)."""
        key = name.casefold()
        if key not in self.ids:
            if self.fixed:
                known = ", ".join(self.spelling.values())
                raise ValueError(f"speaker {name!r} is not in --speakers ({known})")
            if len(self.ids) >= len(SPEAKERS):
                self.unmapped.setdefault(key, name)
                raise ThirdSpeaker(name)
            self._add(name, SPEAKERS[len(self.ids)])
        return self.ids[key], self.spelling[key]

    def name_for(self, speaker: int) -> str:
        """A display name for a bare speaker id: the first name mapped to it, else ``speakerN``."""
        return next((self.spelling[k] for k, v in self.ids.items() if v == speaker), f"speaker{speaker}")

    def suggestion(self) -> str:
        """A ``--speakers`` value that maps every name seen onto 0 and 1 (later names alternate)."""
        pairs = [f"{n}={i}" for n, i in zip(self.spelling.values(), SPEAKERS, strict=False)]
        pairs += [f"{n}={SPEAKERS[k % len(SPEAKERS)]}" for k, n in enumerate(self.unmapped.values())]
        return ",".join(pairs)

    def explain(self, problem: ValueError) -> str:
        """The message for a turn's problem; a third speaker's names a mapping for the whole script."""
        if isinstance(problem, ThirdSpeaker):
            return (
                f"a third speaker {problem.name!r}: CSM-1B has two (0 and 1); map every name to one of "
                f"them, e.g. --speakers {self.suggestion()}"
            )
        return str(problem)


def parse_script(
    path: Path, speakers: dict[str, int] | None = None, fmt: str = "wav", reserved: dict[str, str] | None = None
) -> tuple[Script, list[str]]:
    """The turns that parse and every problem found, in line order (``FILE:LINE: message``).

    The format goes by the suffix (``.jsonl``/``.ndjson`` or plain text).  Turn file names (with
    ``fmt`` as the default extension) must be unique and not in ``reserved`` (name -> what it is).
    """
    try:
        source = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        return Script(path, []), [f"{path}: not UTF-8 text"]
    except OSError as exc:
        return Script(path, []), [f"{path}: cannot read it: {exc.strerror or exc}"]
    parse = parse_jsonl if path.suffix.lower() in JSONL_SUFFIXES else parse_text
    turns, problems = parse(source, str(path), speakers)
    if not turns and not problems:
        problems = [f"{path}: no turns (expected lines like 'NAME: text' or '[0] text')"]
    script = Script(path, turns)
    problems += check_files(script, fmt, reserved or {})
    prefix = re.compile(re.escape(f"{path}:") + r"(\d+):")
    return script, sorted(problems, key=lambda p: int(m.group(1)) if (m := prefix.match(p)) else 0)


def _lines(source: str) -> list[tuple[int, str]]:
    """Numbered lines that are neither blank nor ``#`` comments, stripped."""
    out = []
    for number, raw in enumerate(source.splitlines(), start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            out.append((number, line))
    return out


def parse_text(source: str, label: str, speakers: dict[str, int] | None = None) -> tuple[list[Turn], list[str]]:
    """Turns of a plain-text script and the problems found (``LABEL:LINE: message``)."""
    return _parse_lines(source, label, speakers, _text_turn)


def _parse_lines(
    source: str, label: str, speakers: dict[str, int] | None, one_turn: Callable[[str, SpeakerNames, int, int], Turn]
) -> tuple[list[Turn], list[str]]:
    """Each turn line through ``one_turn(line, names, number, line_no)``; problems as ``LABEL:LINE: message``
    (written once every line is read, so a suggested ``--speakers`` names every speaker)."""
    names = SpeakerNames(speakers)
    turns: list[Turn] = []
    found: list[tuple[int, ValueError]] = []
    for number, line in _lines(source):
        try:
            turns.append(one_turn(line, names, len(turns) + 1, number))
        except ValueError as exc:
            found.append((number, exc))
    return turns, [f"{label}:{number}: {names.explain(exc)}" for number, exc in found]


def _text_turn(line: str, names: SpeakerNames, number: int, line_no: int) -> Turn:
    """One ``NAME: text`` or ``[N] text`` line."""
    bracket = _BRACKET.fullmatch(line)
    if bracket:
        tag, text = bracket.groups()
        speaker = _speaker_tag(tag)
        if speaker is None:
            raise ValueError(f"speaker in [{tag}] must be 0 or 1")
        name = names.name_for(speaker)
    else:
        named = _NAMED.fullmatch(line)
        if not named:
            raise ValueError(
                "expected 'NAME: text' or '[0] text' (a name is up to 40 letters, digits, "
                "spaces, '.', '-' or \"'\", starting with a letter)"
            )
        text = named.group(2)
        speaker, name = names.resolve(named.group(1).strip())
    if not text.strip():
        raise ValueError(f"nothing to say for {name}")
    return Turn(number, line_no, text.strip(), speaker, name)


def parse_jsonl(source: str, label: str, speakers: dict[str, int] | None = None) -> tuple[list[Turn], list[str]]:
    """Turns of a JSON Lines script and the problems found (``LABEL:LINE: message``)."""
    return _parse_lines(source, label, speakers, _json_turn)


def _json_turn(line: str, names: SpeakerNames, number: int, line_no: int) -> Turn:
    """One JSON Lines turn, checked field by field."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError('expected a JSON object like {"text": "...", "speaker": 0}')
    unknown = sorted(set(obj) - set(TURN_FIELDS) - set(OPTION_FIELDS))
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} (allowed: {', '.join(TURN_FIELDS + OPTION_FIELDS)})")
    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("'text' must be a non-empty string")
    speaker, name = _json_speaker(obj, names)
    voice = _optional_str(obj, "voice")
    out = _optional_str(obj, "out")
    if out is not None:
        check_out_name(out)
    options = {k: obj[k] for k in OPTION_FIELDS if obj.get(k) is not None}
    try:
        GenerationOptions.from_mapping(options)
    except CsmError as exc:
        raise ValueError(str(exc)) from None
    return Turn(number, line_no, text.strip(), speaker, name, voice, out, options)


def _json_speaker(obj: dict[str, Any], names: SpeakerNames) -> tuple[int, str]:
    """The turn's speaker id and display name from ``speaker`` (0, 1 or a name)."""
    if "speaker" not in obj:
        raise ValueError("'speaker' is missing (0, 1 or a name)")
    value = obj["speaker"]
    if isinstance(value, int) and not isinstance(value, bool):
        if value not in SPEAKERS:
            raise ValueError(f"'speaker' must be 0 or 1, got {value}")
        return value, names.name_for(value)
    if isinstance(value, str) and re.fullmatch(_NAME, value.strip()):
        return names.resolve(value.strip())
    raise ValueError(f"'speaker' must be 0, 1 or a name, got {json.dumps(value)}")


def _optional_str(obj: dict[str, Any], key: str) -> str | None:
    """``obj[key]`` as a non-empty string, or None when absent or null."""
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key!r} must be a non-empty string")
    return value.strip()


def check_out_name(out: str) -> None:
    """An ``out`` file name must be a relative path inside the output folder with a known extension."""
    parts = PurePosixPath(out.replace("\\", "/")).parts
    if out.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", out) or ".." in parts or not parts:
        raise ValueError(f"'out' must be a file name inside the output folder, got {out!r}")
    if parts[-1].startswith("."):
        raise ValueError(f"'out' must not be a hidden file, got {out!r}")
    try:
        for_path(out, None)
    except CsmError:
        raise ValueError(f"'out' needs an audio extension ({extensions_help()}), got {out!r}") from None


def slug(name: str) -> str:
    """``name`` as a lower-case ASCII file-name part (``Dr. Who`` -> ``dr_who``)."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "_", ascii_name.lower()).strip("_")[:32]


def turn_file(turn: Turn, fmt: str) -> str:
    """The turn's file name: its ``out``, else ``0001_alice.wav`` (extension from ``fmt``)."""
    if turn.out is not None:
        return turn.out.replace("\\", "/")
    return f"{turn.number:04d}_{slug(turn.name) or f'speaker{turn.speaker}'}.{fmt}"


def check_files(script: Script, fmt: str, reserved: dict[str, str]) -> list[str]:
    """Problems with the turns' file names: duplicates, or names taken by ``reserved`` (name -> what)."""
    problems = []
    seen: dict[str, int] = {}
    for turn in script.turns:
        name = turn_file(turn, fmt)
        key = name.casefold()
        if key in reserved:
            problems.append(f"{script.label}:{turn.line}: file {name!r} is the {reserved[key]}")
        elif key in seen:
            problems.append(f"{script.label}:{turn.line}: file {name!r} is also used by line {seen[key]}")
        else:
            seen[key] = turn.line
    return problems
