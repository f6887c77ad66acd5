"""Output audio formats: one table (:data:`FORMATS`) and one streaming encoder (:class:`Encoder`).

Every front end (``csm say``, ``csm batch``, the server, help texts) reads the table, so adding a
format is one row here plus its tests.  Input is always float32 mono; the encoder takes it in chunks
as they are decoded and hands back encoded bytes as soon as the codec produces them, and the bytes
joined are one valid file.  wav/raw are written here, flac and Ogg Vorbis by libsndfile (soundfile),
mp3, Ogg Opus and AAC (ADTS) by FFmpeg's encoders inside PyAV's wheels.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .audio import atomic_file, mono_f32, pcm16le, to_int16, wav_header
from .errors import AudioError, OptionsError


@dataclass(frozen=True)
class Format:
    """One output format: how it is named, recognised, encoded and labelled."""

    #: Canonical name (what ``--format`` and file-name extensions resolve to).
    name: str
    #: File-name extensions, the first being the one written for new files.
    extensions: tuple[str, ...]
    #: MIME type; ``{rate}`` is replaced by the sample rate.
    mime: str
    #: Which encoder writes it: ``pcm`` (here), ``sndfile`` (libsndfile) or ``av`` (FFmpeg via PyAV).
    encoder: str
    #: Container/muxer and codec (or subtype) names for the ``sndfile`` or ``av`` encoder.
    container: str = ""
    codec: str = ""
    #: Other names accepted for it (``pcm`` for raw, ``vorbis`` for ogg).
    aliases: tuple[str, ...] = ()
    #: True if decoding gives back exactly the samples written (16-bit PCM), so a file can be re-read as is.
    lossless: bool = False
    #: True if bytes can leave as the audio is decoded; False means the whole file is written at the end.
    streamable: bool = True
    #: Samples the encoder takes in before its first bytes leave (AAC looks a 1024-sample frame ahead).
    holds: int = 0
    #: Default bitrate in bits/s, or None where no bitrate applies (lossless, or a quality-based codec).
    bitrate: int | None = None
    #: Allowed bitrates: the exact list a codec accepts, or an inclusive (low, high) range.
    bitrates: tuple[int, ...] = ()
    #: True when :attr:`bitrates` is a (low, high) range rather than a list of choices.
    bitrate_range: bool = False
    #: What help texts say about it, where its name alone does not.
    note: str = ""


#: MPEG-2 layer III (what mp3 is at 24 kHz) has these bitrates only.
_MP3_BITRATES = tuple(k * 1000 for k in (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160))

#: The formats, in the order help texts list them.  Notes on single rows: audio/L16 means big-endian
#: (RFC 2586), so little-endian PCM is labelled audio/pcm with its layout; a streamed FLAC would carry no
#: length in its STREAMINFO header, which libsndfile refuses to read; libsndfile writes Vorbis in whole
#: Ogg pages (about 4 KB, ~0.5 s of audio); FFmpeg's AAC encoder caps one channel at 6144 bits per
#: 1024-sample frame (144 kbit/s at 24 kHz) and looks one frame ahead.
FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("wav", (".wav", ".wave"), "audio/wav", "pcm", aliases=("wave",), lossless=True),
        Format(
            "raw",
            (".raw", ".pcm"),
            "audio/pcm;rate={rate};channels=1;encoding=s16le",
            "pcm",
            lossless=True,
            aliases=("pcm", "s16le"),
            note="raw = headerless s16le mono",
        ),
        Format(
            "flac",
            (".flac",),
            "audio/flac",
            "sndfile",
            "FLAC",
            "PCM_16",
            lossless=True,
            streamable=False,
            note="flac is written whole, not streamed",
        ),
        Format(
            "ogg", (".ogg", ".oga"), "audio/ogg", "sndfile", "OGG", "VORBIS", aliases=("vorbis",), note="ogg = Vorbis"
        ),
        Format(
            "mp3",
            (".mp3",),
            "audio/mpeg",
            "av",
            "mp3",
            "libmp3lame",
            aliases=("mpeg",),
            bitrate=128_000,
            bitrates=_MP3_BITRATES,
        ),
        Format(
            "opus",
            (".opus",),
            "audio/ogg; codecs=opus",
            "av",
            "opus",
            "libopus",
            bitrate=64_000,
            bitrates=(6_000, 256_000),
            bitrate_range=True,
            note="opus = Ogg Opus",
        ),
        Format(
            "aac",
            (".aac", ".adts"),
            "audio/aac",
            "av",
            "adts",
            "aac",
            aliases=("adts",),
            holds=2048,
            bitrate=128_000,
            bitrates=(16_000, 144_000),
            bitrate_range=True,
            note="aac = AAC-LC in ADTS",
        ),
    )
}

_NAMES = {alias: f for f in FORMATS.values() for alias in (f.name, *f.aliases)}
_BY_EXTENSION = {ext: f for f in FORMATS.values() for ext in f.extensions}
_CHOICES = ", ".join(FORMATS)


def lookup(name: str) -> Format:
    """The row for ``name`` (case, a leading dot and aliases allowed), or a one-line OptionsError."""
    fmt = _NAMES.get(str(name).strip().lower().lstrip("."))
    if fmt is None:
        raise OptionsError(f"unknown audio format '{name}': use one of {_CHOICES}")
    return fmt


def for_path(path: str | Path | None, explicit: str | None) -> str:
    """The format name for an output: ``explicit`` (``--format``) if given, else ``path``'s extension.

    ``None`` or ``-`` (stdout) without ``explicit`` is wav.
    """
    if explicit:
        return lookup(explicit).name
    if path is None or str(path) == "-":
        return "wav"
    suffix = Path(path).suffix.lower()
    if suffix in _BY_EXTENSION:
        return _BY_EXTENSION[suffix].name
    what = f"extension '{suffix}'" if suffix else "no extension"
    raise OptionsError(f"cannot tell the audio format of {path} ({what}): use {extensions_help()} or --format")


def extensions_help() -> str:
    """The extensions that name a format, for messages: ``.wav, .raw, ... or .aac``."""
    exts = [f.extensions[0] for f in FORMATS.values()]
    return ", ".join(exts[:-1]) + " or " + exts[-1]


def extension(fmt: str) -> str:
    """The file-name extension written for ``fmt`` (``.wav``, ``.raw``, ``.opus``, ...)."""
    return lookup(fmt).extensions[0]


def mime(fmt: str, sample_rate: int) -> str:
    """The Content-Type for ``fmt`` audio at ``sample_rate``."""
    return lookup(fmt).mime.format(rate=sample_rate)


def choices_help() -> str:
    """The formats for a help string: ``wav|raw|...`` and the notes of those that need one."""
    notes = "; ".join(f.note for f in FORMATS.values() if f.note)
    return f"{'|'.join(FORMATS)} ({notes})"


def bitrate_help() -> str:
    """The lossy formats' bitrates for a help string."""
    parts = [f"{f.name} {_kbps(f.bitrate)} default" for f in FORMATS.values() if f.bitrate]
    return "Bitrate of lossy formats, e.g. 96k: " + ", ".join(parts) + "."


def _kbps(bits: int) -> str:
    """``96000`` as ``96k``."""
    return f"{bits // 1000}k" if bits % 1000 == 0 else str(bits)


def _allowed(fmt: Format) -> str:
    """The bitrates ``fmt`` accepts, as text."""
    if fmt.bitrate_range:
        return f"{_kbps(fmt.bitrates[0])} to {_kbps(fmt.bitrates[1])}"
    return "one of " + ", ".join(_kbps(b) for b in fmt.bitrates)


def check_bitrate(fmt: str, bitrate: str | int | None) -> int | None:
    """The bitrate in bits/s for ``fmt``: ``bitrate`` (``96k``, ``96000``) checked, else the default.

    A one-line OptionsError names the valid values, or the formats that take one when ``fmt`` does not.
    """
    row = lookup(fmt)
    if bitrate is None:
        return row.bitrate
    if not row.bitrate:
        lossy = ", ".join(f.name for f in FORMATS.values() if f.bitrate)
        raise OptionsError(f"bitrate does not apply to {row.name}: only {lossy} take a bitrate")
    match = re.fullmatch(r"\s*(\d+)\s*(k?)\s*", str(bitrate).lower())
    value = int(match[1]) * (1000 if match[2] else 1) if match else None
    ok = value is not None and (
        row.bitrates[0] <= value <= row.bitrates[1] if row.bitrate_range else value in row.bitrates
    )
    if not ok:
        raise OptionsError(
            f"bad {row.name} bitrate '{bitrate}': use {_allowed(row)} (bits/s, e.g. {_kbps(row.bitrate)})"
        )
    return value


class _Pending:
    """A write-only byte sink the encoder drains after each chunk: a stream that cannot seek back.

    ``tell`` and seeks to where it already is are answered (libsndfile asks at open); any other seek
    raises, so an encoder never gets to rewrite a header that has already left.
    """

    def __init__(self) -> None:
        """An empty sink."""
        self._buf = bytearray()
        self._pos = 0

    def write(self, data: bytes) -> int:
        """Append ``data``."""
        self._buf += data
        self._pos += len(data)
        return len(data)

    def tell(self) -> int:
        """Bytes written so far."""
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        """Stay where the stream is; anything else is an error."""
        target = offset if whence == 0 else self._pos + offset
        if target != self._pos:
            raise OSError("a streamed output cannot seek back")
        return self._pos

    def read(self, size: int = -1) -> bytes:
        """Nothing to read back: the bytes have left."""
        return b""

    def take(self) -> bytes:
        """The bytes written since the last call."""
        data, self._buf = bytes(self._buf), bytearray()
        return data


class _StreamSink:
    """What PyAV writes a stream into: ``write`` only, so its muxers take the output as unseekable."""

    def __init__(self, pending: _Pending) -> None:
        """Forward writes to ``pending``."""
        self.write = pending.write


class Encoder:
    """Encode float32 mono chunks as ``fmt`` while they arrive.

    Without ``out`` it streams: :meth:`feed` returns the bytes the codec has produced so far and
    :meth:`finish` the rest; headers are the streamed kind (WAV sizes 0xFFFFFFFF, mp3 without a LAME
    header).  A format that cannot stream (flac) keeps everything until :meth:`finish`.  With a
    seekable binary ``out`` (a file) the bytes go there, ``feed``/``finish`` return ``b""``, and the
    header is rewritten at the end with the exact length.
    """

    def __init__(
        self, fmt: str, sample_rate: int, bitrate: str | int | None = None, out: BinaryIO | None = None
    ) -> None:
        """Start a ``fmt`` stream at ``sample_rate`` (Hz) and ``bitrate`` (lossy formats; default per format)."""
        self.format = lookup(fmt)
        self.sample_rate = sample_rate
        self.bitrate = check_bitrate(self.format.name, bitrate)
        self.samples = 0
        self._buffered = out is None and not self.format.streamable
        self._whole = out is not None or self._buffered
        self._pending = _Pending()
        self._out: BinaryIO = out if out is not None else io.BytesIO() if self._whole else self._pending
        self._start = self._out.tell() if out is not None else 0
        self._closed = False
        #: What the codec library raises for input it cannot encode (soundfile: RuntimeError).  An OSError
        #: from the output passes through, so the writer can name the file it failed to write.
        self._errors: tuple[type[Exception], ...] = (RuntimeError,)
        with self._reported():
            self._open()

    @contextlib.contextmanager
    def _reported(self) -> Iterator[None]:
        """Turn a codec or output failure into a one-line AudioError."""
        try:
            yield
        except Exception as exc:
            if not isinstance(exc, self._errors):
                raise
            raise AudioError(f"cannot encode {self.format.name} audio: {exc}") from None

    def _open(self) -> None:
        """Open the codec and write what a header needs up front."""
        kind = self.format.encoder
        if kind == "pcm":
            if self.format.name == "wav":
                self._out.write(wav_header(self.sample_rate))
        elif kind == "sndfile":
            import soundfile as sf

            self._sf = sf.SoundFile(
                self._out,
                mode="w",
                samplerate=self.sample_rate,
                channels=1,
                format=self.format.container,
                subtype=self.format.codec,
            )
        else:
            import av

            self._errors = (*self._errors, av.FFmpegError)
            target = self._out if self._whole else _StreamSink(self._pending)
            # One Ogg page per packet, so each encoded 20 ms leaves at once instead of after a second.
            options = {"page_duration": "20000"} if self.format.container in ("ogg", "opus") else {}
            self._av = av.open(target, mode="w", format=self.format.container, options=options)
            self._stream = self._av.add_stream(self.format.codec, rate=self.sample_rate, layout="mono")
            self._stream.bit_rate = self.bitrate
            self._stream.time_base = Fraction(1, self.sample_rate)

    def _drain(self) -> bytes:
        """The bytes ready to send (streaming), else ``b""``."""
        return b"" if self._whole else self._pending.take()

    def feed(self, samples: np.ndarray) -> bytes:
        """Encode ``samples`` (float, clipped to [-1, 1]); the encoded bytes ready now (see the class)."""
        if self._closed:
            raise ValueError("encoder already finished")
        mono = mono_f32(samples)
        if not len(mono):
            return self._drain()
        with self._reported():
            self._encode(mono)
        self.samples += len(mono)
        return self._drain()

    def _encode(self, mono: np.ndarray) -> None:
        """Hand ``mono`` to the codec."""
        kind = self.format.encoder
        if kind == "pcm":
            self._out.write(pcm16le(mono))
        elif kind == "sndfile":
            # PCM subtypes get int16 (libsndfile would wrap loud floats); Vorbis gets clipped floats.
            self._sf.write(np.clip(mono, -1.0, 1.0) if self.format.codec == "VORBIS" else to_int16(mono))
        else:
            import av

            frame = av.AudioFrame.from_ndarray(np.clip(mono, -1.0, 1.0)[None, :], format="flt", layout="mono")
            frame.sample_rate = self.sample_rate
            frame.pts = self.samples
            frame.time_base = self._stream.time_base
            for packet in self._stream.encode(frame):
                self._av.mux(packet)

    def finish(self) -> bytes:
        """Flush the codec and close the file; the last bytes (streaming) or the whole file (flac to a stream)."""
        if self._closed:
            return b""
        self._closed = True
        with self._reported():
            self._close()
        return self._out.getvalue() if self._buffered else self._drain()

    def _close(self) -> None:
        """Flush the codec and fix up the header where the output can seek."""
        kind = self.format.encoder
        if kind == "pcm":
            if self.format.name == "wav" and self._whole:
                end = self._out.tell()
                self._out.seek(self._start)
                self._out.write(wav_header(self.sample_rate, self.samples))
                self._out.seek(end)
        elif kind == "sndfile":
            self._sf.close()
        else:
            for packet in self._stream.encode(None):
                self._av.mux(packet)
            self._av.close()


def encode(samples: np.ndarray, fmt: str, sample_rate: int, bitrate: str | int | None = None) -> bytes:
    """``samples`` encoded in memory as one whole ``fmt`` file (exact header lengths), e.g. for HTTP."""
    buf = io.BytesIO()
    enc = Encoder(fmt, sample_rate, bitrate, out=buf)
    enc.feed(samples)
    enc.finish()
    return buf.getvalue()


def write_file(
    path: str | Path, samples: np.ndarray, fmt: str, sample_rate: int, bitrate: str | int | None = None
) -> None:
    """Write ``samples`` to ``path`` as ``fmt`` atomically (see :func:`csmcli.audio.atomic_file`)."""
    with atomic_file(path) as f:
        enc = Encoder(fmt, sample_rate, bitrate, out=f)
        enc.feed(samples)
        enc.finish()
