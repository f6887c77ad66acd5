"""Voices: context audio plus its transcript, which is what keeps CSM's voice from run to run.

Presets come from the checkpoint's ``prompts/*.wav`` with their transcripts; user voices live
under ``$CSM_HOME/voices/NAME/`` (``audio.wav`` at 24 kHz mono and ``voice.json``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .audio import SAMPLE_RATE, read_audio
from .errors import AudioError, InputError
from .formats import write_file
from .options import check_text

if TYPE_CHECKING:  # listing, adding and removing voices does not import torch (prompt does)
    from .prompt import Segment

log = logging.getLogger("csmcli")

#: Transcripts of the prompt audio shipped in the sesame/csm-1b repository.
PRESET_TRANSCRIPTS = {
    "conversational_a": (
        "like revising for an exam I'd have to try and like keep up the momentum because I'd start really "
        "early I'd be like okay I'm gonna start revising now and then like you're revising for ages and then "
        "I just like start losing steam I didn't do that for the exam we had recently to be fair that was a "
        "more of a last minute scenario but like yeah I'm trying to like yeah I noticed this yesterday that "
        "like Mondays I sort of start the day with this not like a panic but like a"
    ),
    "conversational_b": (
        "like a super Mario level. Like it's very like high detail. And like, once you get into the park, it "
        "just like, everything looks like a computer game and they have all these, like, you know, if, if "
        "there's like a, you know, like in a Mario game, they will have like a question block. And if you "
        "like, you know, punch it, a coin will come out. So like everyone, when they come into the park, they "
        "get like this little bracelet and then you can go punching question blocks around."
    ),
}
#: The voice each speaker gets when none is named and the checkpoint has it.
DEFAULT_VOICES = {0: "conversational_a", 1: "conversational_b"}
#: ``--voice none``: no context, the raw model (a new voice every run).
NO_VOICE = "none"
#: Longest context audio kept per segment; longer audio is trimmed with a warning.
MAX_CONTEXT_SECONDS = 30.0

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def default_home() -> Path:
    """The platform's data directory for csmcli (the CLI's ``$CSM_HOME`` overrides it)."""
    from platformdirs import user_data_dir

    return Path(user_data_dir("csmcli", appauthor=False))


@dataclass(frozen=True)
class Voice:
    """A named voice: audio file, transcript and where it came from (``preset`` or ``user``).

    ``stamp`` is the audio file's modification time when the voice was listed (0 if unknown), so a
    voice replaced under the same name is not mistaken for the old one.
    """

    name: str
    text: str
    audio_path: Path
    source: str
    stamp: int = 0

    def load(self) -> np.ndarray:
        """The voice's audio, 24 kHz mono float32, at most :data:`MAX_CONTEXT_SECONDS` of it (a longer
        file is cut before it is decoded).  The error for unreadable audio names the voice, not the
        file (the log has the file), since a server shows it to its clients."""
        try:
            audio = read_context_audio(self.audio_path)
        except AudioError as exc:
            log.warning("voice %s: %s", self.name, exc)
            raise InputError(f"voice {self.name!r} cannot be used: its audio is missing or unreadable") from None
        return fit_context_audio(audio, f"of voice {self.name!r}")


def read_context_audio(path: Path) -> np.ndarray:
    """Like :func:`~csmcli.audio.read_audio`, but a file longer than :data:`MAX_CONTEXT_SECONDS`
    (by its header) has only its first :data:`MAX_CONTEXT_SECONDS` read and resampled."""
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except (OSError, RuntimeError):  # not a file libsndfile knows: read_audio says why
        return read_audio(path)
    keep = int(MAX_CONTEXT_SECONDS * info.samplerate)
    if info.frames <= keep or path.suffix.lower() in (".raw", ".pcm"):
        return read_audio(path)
    log.warning("context audio %s is %.1f s long; using its first %.0f s", path, info.duration, MAX_CONTEXT_SECONDS)
    try:
        data, rate = sf.read(str(path), frames=keep, dtype="float32", always_2d=True)
    except (OSError, RuntimeError) as exc:
        raise AudioError(f"cannot read audio {path}: {exc}") from None
    mono = data.mean(axis=1, dtype=np.float32)
    if rate != SAMPLE_RATE and len(mono):
        import soxr

        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(mono[: int(MAX_CONTEXT_SECONDS * SAMPLE_RATE)], dtype=np.float32)


def fit_context_audio(audio: np.ndarray, label: str) -> np.ndarray:
    """Trim overlong context audio (with a warning); reject silence-free emptiness."""
    if len(audio) == 0:
        raise InputError(f"context audio {label} is empty")
    limit = int(MAX_CONTEXT_SECONDS * SAMPLE_RATE)
    if len(audio) > limit:
        log.warning(
            "context audio %s is %.1f s long; using its first %.0f s",
            label,
            len(audio) / SAMPLE_RATE,
            MAX_CONTEXT_SECONDS,
        )
        audio = audio[:limit]
    return audio


class VoiceLibrary:
    """Preset voices of a checkpoint plus the user's own voices.

    The listing is kept in memory and read again only when the prompts or voices folder changes
    (its modification time), so asking for a voice costs two ``stat`` calls, not a folder scan;
    :meth:`add` and :meth:`remove` touch the voices folder so other processes see their changes.
    """

    def __init__(self, prompts_dir: Path | None = None, home: Path | None = None) -> None:
        self.prompts_dir = prompts_dir
        self.home = home
        self._lock = threading.Lock()
        self._listed: tuple[tuple[int, int], list[Voice], list[Voice]] | None = None

    @property
    def user_dir(self) -> Path:
        """Where user voices are stored."""
        return (self.home or default_home()) / "voices"

    def presets(self) -> list[Voice]:
        """Prompt audio of the checkpoint that has a transcript (built in, or a ``NAME.txt`` beside it)."""
        return list(self._listing()[1])

    def user_voices(self) -> list[Voice]:
        """Voices added with ``csm voices add``."""
        return list(self._listing()[2])

    def list(self) -> list[Voice]:
        """User voices first (they shadow presets of the same name), then presets."""
        seen: dict[str, Voice] = {}
        for voice in [*self.user_voices(), *self.presets()]:
            seen.setdefault(voice.name, voice)
        return list(seen.values())

    def _listing(self) -> tuple[tuple[int, int], list[Voice], list[Voice]]:
        """``(folder stamps, presets, user voices)``, read again when either folder changed."""
        stamps = (_mtime(self.prompts_dir), _mtime(self.user_dir))
        with self._lock:
            if self._listed is None or self._listed[0] != stamps:
                self._listed = (stamps, self._scan_presets(), self._scan_user_voices())
            return self._listed

    def _scan_presets(self) -> list[Voice]:
        if self.prompts_dir is None or not self.prompts_dir.is_dir():
            return []
        out = []
        for wav in sorted(self.prompts_dir.glob("*.wav")):
            sidecar = wav.with_suffix(".txt")
            text = sidecar.read_text().strip() if sidecar.is_file() else PRESET_TRANSCRIPTS.get(wav.stem)
            if text:
                out.append(Voice(wav.stem, text, wav, "preset", _mtime(wav)))
        return out

    def _scan_user_voices(self) -> list[Voice]:
        if not self.user_dir.is_dir():
            return []
        out = []
        for meta in sorted(self.user_dir.glob("*/voice.json")):
            try:
                data = json.loads(meta.read_text())
                audio = meta.parent / "audio.wav"
                out.append(Voice(meta.parent.name, data["text"], audio, "user", _mtime(audio)))
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("ignoring damaged voice %s", meta.parent)
        return out

    def get(self, name: str) -> Voice:
        """The voice called ``name``; a one-line error naming ``csm voices list`` otherwise."""
        for voice in self.list():
            if voice.name == name:
                return voice
        raise InputError(f"unknown voice {name!r}: `csm voices list` shows the available voices")

    def default_for(self, speaker: int) -> Voice | None:
        """The preset a speaker gets by default, if the checkpoint ships it."""
        name = DEFAULT_VOICES.get(speaker)
        return next((v for v in self._listing()[1] if v.name == name), None)

    def add(self, name: str, audio_file: Path, text: str, force: bool = False) -> Voice:
        """Store a voice: the audio resampled to 24 kHz mono (trimmed if overlong) and its transcript."""
        if not _NAME.match(name) or name == NO_VOICE:
            raise InputError(f"voice name {name!r} must be letters, digits, '.', '_' or '-' (not 'none')")
        check_text(text)
        folder = self.user_dir / name
        if folder.exists() and not force:
            raise InputError(f"voice {name!r} exists: remove it first or pass --force")
        audio = fit_context_audio(read_audio(audio_file), str(audio_file))
        folder.mkdir(parents=True, exist_ok=True)
        write_file(folder / "audio.wav", audio, "wav", SAMPLE_RATE)
        (folder / "voice.json").write_text(json.dumps({"text": text.strip(), "source": str(audio_file)}))
        os.utime(self.user_dir)  # a voice replaced in place changes no folder listing: mark the change
        return Voice(name, text.strip(), folder / "audio.wav", "user", _mtime(folder / "audio.wav"))

    def remove(self, name: str) -> None:
        """Delete a user voice (presets cannot be removed)."""
        folder = self.user_dir / name
        if not _NAME.match(name) or not (folder / "voice.json").is_file():
            raise InputError(f"no user voice {name!r}: `csm voices list` shows the available voices")
        shutil.rmtree(folder)
        os.utime(self.user_dir)


def _mtime(path: Path | None) -> int:
    """A file's or folder's modification time in nanoseconds; 0 if it does not exist."""
    try:
        return os.stat(path).st_mtime_ns if path is not None else 0
    except OSError:
        return 0


def context_segments(audio_files: list[Path], texts: list[str], speaker: int) -> list[Segment]:
    """Segments from ``--context-audio`` / ``--context-text`` pairs (in order)."""
    from .prompt import Segment

    if len(audio_files) != len(texts):
        raise InputError(f"give one --context-text per --context-audio ({len(audio_files)} audio, {len(texts)} texts)")
    segments = []
    for file, text in zip(audio_files, texts, strict=True):
        check_text(text)
        segments.append(Segment(text.strip(), speaker, fit_context_audio(read_audio(file), str(file))))
    return segments
