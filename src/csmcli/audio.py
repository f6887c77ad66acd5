"""Audio I/O: reading prompts, writing files atomically, encoding for stdout/HTTP and streaming PCM.

All audio inside csmcli is float32 mono at :data:`SAMPLE_RATE` (24 kHz, CSM-1B's Mimi codec rate).
Everything written as PCM is clipped to [-1, 1] first, so loud samples never wrap around.
"""

from __future__ import annotations

import contextlib
import io
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

#: Output formats: raw is signed 16-bit little-endian mono PCM with no header.
FORMATS = ("wav", "flac", "ogg", "raw")

_EXTENSIONS = {
    ".wav": "wav",
    ".wave": "wav",
    ".flac": "flac",
    ".ogg": "ogg",
    ".oga": "ogg",
    ".raw": "raw",
    ".pcm": "raw",
}
_ALIASES = {"wave": "wav", "pcm": "raw", "s16le": "raw", "vorbis": "ogg"}
#: soundfile (format, subtype) per container format.
_SF_FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS")}
_ALLOWED = ", ".join(FORMATS)


def to_int16(x: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] to int16 PCM; out-of-range samples are clipped, never wrapped.

    Scaled by 32768 (the inverse of how libsndfile reads PCM16), so int16 -> float -> int16 is exact;
    1.0 becomes 32767 and -1.0 becomes -32768.
    """
    y = np.clip(np.asarray(x, dtype=np.float32), -1.0, 1.0)
    return np.clip(np.round(y * np.float32(32768.0)), -32768, 32767).astype(np.int16)


def _mono_f32(audio: np.ndarray) -> np.ndarray:
    """``audio`` as a contiguous 1-D float32 array (an (n, 1) column is accepted)."""
    a = np.asarray(audio, dtype=np.float32)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise ValueError(f"expected mono audio of shape (n,), got {a.shape}")
    return np.ascontiguousarray(a)


def _pcm16le(audio: np.ndarray) -> bytes:
    """Signed 16-bit little-endian PCM bytes of ``audio``."""
    return to_int16(_mono_f32(audio)).astype("<i2", copy=False).tobytes()


def _check_format(fmt: str) -> str:
    """Normalise ``fmt`` (case, leading dot, aliases) or raise naming the allowed formats."""
    name = fmt.strip().lower().lstrip(".")
    name = _ALIASES.get(name, name)
    if name not in FORMATS:
        raise AudioError(f"unknown audio format '{fmt}': use one of {_ALLOWED}")
    return name


def format_for(path: str | None, explicit: str | None) -> str:
    """The output format: ``explicit`` (``--format``) if given, else from ``path``'s extension.

    ``None`` or ``-`` (stdout) defaults to wav.
    """
    if explicit:
        return _check_format(explicit)
    if path is None or path == "-":
        return "wav"
    suffix = Path(path).suffix.lower()
    if suffix in _EXTENSIONS:
        return _EXTENSIONS[suffix]
    what = f"extension '{suffix}'" if suffix else "no extension"
    raise AudioError(
        f"cannot tell the audio format of {path} ({what}): use .wav, .flac, .ogg or .raw, or pass --format ({_ALLOWED})"
    )


def _encode_to(fileobj: BinaryIO, audio: np.ndarray, fmt: str, sample_rate: int) -> None:
    """Encode ``audio`` as ``fmt`` into an open binary file object."""
    if fmt == "raw":
        fileobj.write(_pcm16le(audio))
        return
    import soundfile as sf

    container, subtype = _SF_FORMATS[fmt]
    mono = _mono_f32(audio)
    # PCM subtypes get int16 (libsndfile would wrap loud floats); Vorbis gets clipped floats.
    data = np.clip(mono, -1.0, 1.0) if subtype == "VORBIS" else to_int16(mono)
    with sf.SoundFile(fileobj, mode="w", samplerate=sample_rate, channels=1, format=container, subtype=subtype) as f:
        f.write(data)


def encode_audio(audio: np.ndarray, fmt: str, sample_rate: int = SAMPLE_RATE) -> bytes:
    """``audio`` encoded in memory as ``fmt`` (wav, flac, ogg or raw), e.g. for stdout or HTTP."""
    fmt = _check_format(fmt)
    buf = io.BytesIO()
    try:
        _encode_to(buf, audio, fmt, sample_rate)
    except RuntimeError as exc:  # soundfile.LibsndfileError
        raise AudioError(f"cannot encode {fmt} audio: {exc}") from None
    return buf.getvalue()


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


def write_audio(path: str | Path, audio: np.ndarray, fmt: str, sample_rate: int = SAMPLE_RATE) -> None:
    """Write ``audio`` to ``path`` as ``fmt`` atomically (see :func:`atomic_file`)."""
    fmt = _check_format(fmt)
    with atomic_file(path) as f:
        _encode_to(f, audio, fmt, sample_rate)


def wav_stream_header(sample_rate: int = SAMPLE_RATE) -> bytes:
    """A 44-byte PCM16 mono WAV header for a stream of unknown length (RIFF and data sizes 0xFFFFFFFF)."""
    unknown = 0xFFFFFFFF
    return (
        b"RIFF"
        + struct.pack("<I", unknown)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
        + b"data"
        + struct.pack("<I", unknown)
    )


class StreamWriter:
    """Write audio chunks to a binary stream (e.g. stdout) as they arrive, flushing after each.

    ``raw`` writes s16le mono PCM only; ``wav`` writes :func:`wav_stream_header` before the first chunk.
    """

    def __init__(self, stream: BinaryIO, fmt: str = "wav", sample_rate: int = SAMPLE_RATE) -> None:
        """Stream to ``stream`` in ``fmt`` (wav or raw) at ``sample_rate``."""
        fmt = _check_format(fmt)
        if fmt not in ("wav", "raw"):
            raise AudioError(f"cannot stream {fmt} audio: use --format wav or raw, or write to a file")
        self.stream = stream
        self.fmt = fmt
        self.sample_rate = sample_rate
        self.samples_written = 0
        self._started = False

    def _start(self) -> None:
        """Write the header (wav) once."""
        if not self._started:
            self._started = True
            if self.fmt == "wav":
                self.stream.write(wav_stream_header(self.sample_rate))

    def write(self, chunk: np.ndarray) -> None:
        """Append ``chunk`` (float mono) and flush."""
        self._start()
        data = _pcm16le(chunk)
        self.stream.write(data)
        self.stream.flush()
        self.samples_written += len(data) // 2

    def close(self) -> None:
        """Finish the stream: a wav with no chunks still gets its header. Does not close ``stream``."""
        self._start()
        self.stream.flush()

    @property
    def seconds_written(self) -> float:
        """Seconds of audio written so far."""
        return self.samples_written / self.sample_rate

    def __enter__(self) -> StreamWriter:
        """Context manager: :meth:`close` on exit."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Flush on a clean exit; on an error leave the stream as it is."""
        if exc[0] is None:
            self.close()


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
    if rate != sample_rate and len(mono):
        import soxr

        mono = soxr.resample(mono, rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def fade(
    audio: np.ndarray, fade_in_s: float = 0.0, fade_out_s: float = 0.0, sample_rate: int = SAMPLE_RATE
) -> np.ndarray:
    """A copy of ``audio`` with linear fade-in/fade-out ramps of the given lengths."""
    out = np.array(_mono_f32(audio), dtype=np.float32, copy=True)
    n_in = min(len(out), max(0, round(fade_in_s * sample_rate)))
    n_out = min(len(out), max(0, round(fade_out_s * sample_rate)))
    if n_in:
        out[:n_in] *= np.linspace(0.0, 1.0, n_in, endpoint=False, dtype=np.float32)
    if n_out:
        out[len(out) - n_out :] *= np.linspace(1.0, 0.0, n_out + 1, dtype=np.float32)[1:]
    return out


def concat_with_pauses(chunks: Sequence[np.ndarray], pause_s: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Join mono pieces with ``pause_s`` seconds of silence between them (none before or after)."""
    if pause_s < 0:
        raise OptionsError(f"pause must be >= 0 seconds, got {pause_s}")
    pieces = [_mono_f32(c) for c in chunks]
    if not pieces:
        return np.zeros(0, dtype=np.float32)
    gap = np.zeros(round(pause_s * sample_rate), dtype=np.float32)
    parts: list[np.ndarray] = []
    for i, piece in enumerate(pieces):
        if i and len(gap):
            parts.append(gap)
        parts.append(piece)
    return np.concatenate(parts).astype(np.float32, copy=False)
