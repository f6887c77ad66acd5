"""Audio I/O: reading prompts, writing files atomically, PCM samples and WAV headers (encoding: formats).

All audio inside csmcli is float32 mono at :data:`SAMPLE_RATE` (24 kHz, CSM-1B's Mimi codec rate).
Everything written as PCM is clipped to [-1, 1] first, so loud samples never wrap around.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import AudioError, OptionsError

#: Output sample rate of CSM-1B (Hz).
SAMPLE_RATE = 24000


def to_int16(x: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] to int16 PCM; out-of-range samples are clipped, never wrapped.

    Scaled by 32768 (the inverse of how libsndfile reads PCM16), so int16 -> float -> int16 is exact;
    1.0 becomes 32767 and -1.0 becomes -32768.
    """
    y = np.clip(np.asarray(x, dtype=np.float32), -1.0, 1.0)
    return np.clip(np.round(y * np.float32(32768.0)), -32768, 32767).astype(np.int16)


def mono_f32(audio: np.ndarray) -> np.ndarray:
    """``audio`` as a contiguous 1-D float32 array (an (n, 1) column is accepted)."""
    a = np.asarray(audio, dtype=np.float32)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise ValueError(f"expected mono audio of shape (n,), got {a.shape}")
    return np.ascontiguousarray(a)


def pcm16le(audio: np.ndarray) -> bytes:
    """Signed 16-bit little-endian PCM bytes of ``audio``."""
    return to_int16(mono_f32(audio)).astype("<i2", copy=False).tobytes()


def _new_file_mode(path: Path) -> int:
    """Permission bits for a newly written ``path``: the old file's, else 0o666 minus the umask."""
    with contextlib.suppress(OSError):
        return path.stat().st_mode & 0o777
    umask = None
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Umask:"):
                umask = int(line.split()[1], 8)
    if umask is None:
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def _reason(exc: BaseException) -> str:
    """A short lower-case reason for an OSError/libsndfile error."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text[0].lower() + text[1:] if text else text


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file that becomes ``path`` only when the block ends without an error.

    It is written as a temp file beside ``path`` (``.NAME.*.part``), flushed to disk, given the old
    file's permissions (else the umask's), then renamed over ``path``; on any error the temp file
    is removed and ``path`` is left as it was.  OSErrors surface as a one-line :class:`AudioError`.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise AudioError(f"cannot write {path}: it is a directory; give a file name")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=parent)
    except OSError as exc:
        raise AudioError(f"cannot write {path}: {_reason(exc)}") from None
    try:
        with os.fdopen(fd, "w+b") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), _new_file_mode(path))
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, (OSError, RuntimeError)):  # RuntimeError: soundfile.LibsndfileError
            raise AudioError(f"cannot write {path}: {_reason(exc)}") from None
        raise


def wav_header(sample_rate: int = SAMPLE_RATE, samples: int | None = None) -> bytes:
    """A 44-byte PCM16 mono WAV header for ``samples`` samples, or for a stream of unknown length.

    A stream's RIFF and data sizes are 0xFFFFFFFF, which readers take as "until the end".
    """
    riff, data = (0xFFFFFFFF, 0xFFFFFFFF) if samples is None else (36 + 2 * samples, 2 * samples)
    return (
        b"RIFF"
        + struct.pack("<I", riff)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
        + b"data"
        + struct.pack("<I", data)
    )


def read_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read any file libsndfile reads (wav, flac, ogg, mp3, ...) as float32 mono at ``sample_rate``.

    Channels are averaged; other rates are resampled with soxr (high quality). ``.raw``/``.pcm``
    files are taken as s16le mono at ``sample_rate`` (what ``--format raw`` writes).
    """
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        what = "it is a directory" if path.is_dir() else "no such file"
        raise AudioError(f"cannot read audio {path}: {what}; check the path")
    try:
        if path.suffix.lower() in (".raw", ".pcm"):
            data, rate = sf.read(
                path,
                dtype="float32",
                always_2d=True,
                samplerate=sample_rate,
                channels=1,
                format="RAW",
                subtype="PCM_16",
                endian="LITTLE",
            )
        else:
            data, rate = sf.read(path, dtype="float32", always_2d=True)
    except (OSError, RuntimeError) as exc:  # RuntimeError: soundfile.LibsndfileError
        raise AudioError(
            f"cannot read audio {path}: {_reason(exc).rstrip('.')}; use a WAV, FLAC, OGG or MP3 file"
        ) from None
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    return resample(mono, rate, sample_rate)


def resample(mono: np.ndarray, rate: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono audio at ``rate`` Hz as contiguous float32 at ``sample_rate`` (soxr, high quality)."""
    if rate != sample_rate and len(mono):
        import soxr

        mono = soxr.resample(mono, rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def concat_with_pauses(chunks: Sequence[np.ndarray], pause_s: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Join mono pieces with ``pause_s`` seconds of silence between them (none before or after)."""
    if pause_s < 0:
        raise OptionsError(f"pause must be >= 0 seconds, got {pause_s}")
    pieces = [mono_f32(c) for c in chunks]
    if not pieces:
        return np.zeros(0, dtype=np.float32)
    gap = np.zeros(round(pause_s * sample_rate), dtype=np.float32)
    parts: list[np.ndarray] = []
    for i, piece in enumerate(pieces):
        if i and len(gap):
            parts.append(gap)
        parts.append(piece)
    return np.concatenate(parts).astype(np.float32, copy=False)
