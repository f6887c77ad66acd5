"""Audio sent to the server: multipart forms read within their limits, and recordings decoded.

The voices API (``POST /v1/audio/voices``) and the speech endpoints' per-request context both read
their forms and decode their recordings here: libsndfile for wav, flac, ogg and mp3, PyAV for the
webm/opus (and mp4) recordings browsers make.  Decoding is slow: callers run it in a worker thread.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from ..voices import MAX_CONTEXT_SECONDS
from .requests import ApiError, check_fields

#: Largest recording (or recordings, together) one request may carry (bytes).
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
#: Largest plain (non-file) field of an upload form (bytes).
MAX_FIELD_BYTES = 64 * 1024
#: Sample rates an uploaded recording may have (Hz).
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8000, 192_000
#: Recording formats an upload may be in, as the page and the errors name them.
UPLOAD_FORMATS = ("wav", "flac", "ogg", "mp3", "webm", "mp4")

_SOUNDFILE_FORMATS = {"WAV": "wav", "WAVEX": "wav", "RF64": "wav", "FLAC": "flac", "OGG": "ogg", "MP3": "mp3"}


@dataclass
class Form:
    """A multipart form: plain fields as text, file fields as bytes; a repeatable field's values in a
    list (in the order sent); ``filenames`` holds the name each file was sent under."""

    fields: dict[str, Any]
    filenames: dict[str, str] = field(default_factory=dict)


async def read_form(
    request: web.Request,
    allowed: tuple[str, ...],
    files: Iterable[str],
    repeatable: Iterable[str] = (),
    limit: int = MAX_UPLOAD_BYTES,
) -> Form:
    """The multipart form of ``request``, read part by part: the ``files`` fields together hold at
    most ``limit`` bytes (413 naming the field past it), every other field :data:`MAX_FIELD_BYTES`."""
    files, repeatable = tuple(files), tuple(repeatable)
    if request.content_type != "multipart/form-data":
        raise ApiError(
            415,
            f"unsupported Content-Type {request.content_type!r}: send multipart/form-data with the fields "
            f"{', '.join(allowed)}",
            "unsupported_media_type",
        )
    if request.content_length is not None and request.content_length > limit + MAX_FIELD_BYTES:
        raise upload_too_large(limit, files[0])
    form = Form({})
    budget = limit
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or not part.name:
                raise ApiError(400, "every form part needs a field name", "invalid_body")
            name = part.name
            check_fields({name: None}, allowed)
            if name in form.fields and name not in repeatable:
                raise ApiError(400, f"field {name!r} is given twice", "duplicate_field", name)
            if name in files:
                value: Any = await _read_part(part, budget, upload_too_large(limit, name))
                budget -= len(value)
                form.filenames[name] = Path(part.filename or "").name[:128]
            elif part.filename is not None:
                raise ApiError(400, f"field {name!r} must be a plain value, not a file", "invalid_type", name)
            else:
                too_long = ApiError(400, f"field {name!r} is over {MAX_FIELD_BYTES} bytes", "field_too_long", name)
                raw = await _read_part(part, MAX_FIELD_BYTES, too_long)
                value = raw.decode(part.get_charset("utf-8"))
            if name in repeatable:
                form.fields.setdefault(name, []).append(value)
            else:
                form.fields[name] = value
    except (ValueError, UnicodeDecodeError, LookupError, HttpProcessingError) as exc:
        reason = str(exc).strip().replace("\n", " ") or type(exc).__name__
        raise ApiError(400, f"malformed multipart body: {reason}", "invalid_body") from None
    return form


async def _read_part(part: BodyPartReader, room: int, too_long: ApiError) -> bytes:
    data = bytearray()
    while chunk := await part.read_chunk(256 * 1024):
        data += chunk
        if len(data) > room:
            raise too_long
    return bytes(data)


def upload_too_large(limit: int, name: str) -> ApiError:
    """413 for recordings past ``limit`` bytes, naming the file field."""
    size = f"{limit // (1024 * 1024)} MB" if limit % (1024 * 1024) == 0 else f"{limit}-byte"
    return ApiError(413, f"{name} is larger than the {size} upload limit", f"{name}_too_large", name)


def sniff_format(data: bytes) -> str | None:
    """The container of an upload from its first bytes: one of :data:`UPLOAD_FORMATS`, or None."""
    head = data[:12]
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "mp3"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "webm"
    if head[4:8] == b"ftyp":
        return "mp4"
    return None


def decode_upload(
    data: bytes, max_seconds: float = MAX_CONTEXT_SECONDS, param: str = "audio"
) -> tuple[np.ndarray, int, str | None]:
    """Float32 mono audio, its rate, and a warning when it was cut to its first ``max_seconds``;
    errors and the warning name the field ``param``.

    Only the first ``max_seconds`` are decoded (a voice keeps no more), so a small file of very long
    audio costs no more memory than a short one."""
    fmt = sniff_format(data)
    if fmt is None:
        raise ApiError(
            415,
            f"{param} is not in a supported format: send {', '.join(UPLOAD_FORMATS[:-1])} or {UPLOAD_FORMATS[-1]}",
            "unsupported_audio_format",
            param,
        )
    if fmt in ("webm", "mp4"):
        audio, rate, longer = _decode_av(data, max_seconds, param)
    else:
        audio, rate, longer = _decode_soundfile(data, max_seconds, param)
    if len(audio) == 0:
        raise ApiError(400, f"{param} has no samples: record or send a few seconds of speech", "empty_audio", param)
    warning = None
    if longer:
        warning = f"{param} is longer than {max_seconds:g} s: its first {max_seconds:g} s were kept"
    return audio, rate, warning


def _check_rate(rate: int, param: str) -> None:
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise ApiError(
            400,
            f"{param} has a sample rate of {rate} Hz: use {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz",
            "unsupported_sample_rate",
            param,
        )


def _unreadable(fmt: str, exc: BaseException, param: str) -> ApiError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ApiError(400, f"{param} could not be decoded as {fmt}: {reason}", "invalid_audio", param)


def _decode_soundfile(data: bytes, max_seconds: float, param: str) -> tuple[np.ndarray, int, bool]:
    import soundfile as sf

    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            fmt = _SOUNDFILE_FORMATS.get(f.format)
            if fmt is None:
                raise ApiError(415, f"{param} is {f.format}, not a supported format", "unsupported_audio_format", param)
            _check_rate(f.samplerate, param)
            keep = int(max_seconds * f.samplerate)
            frames = f.read(keep + 1, dtype="float32", always_2d=True)
    except (RuntimeError, OSError) as exc:  # RuntimeError: soundfile.LibsndfileError
        raise _unreadable(sniff_format(data) or "audio", exc, param) from None
    longer = len(frames) > keep
    return _mono(frames[:keep]), f.samplerate, longer


def _decode_av(data: bytes, max_seconds: float, param: str) -> tuple[np.ndarray, int, bool]:
    import av

    pieces: list[np.ndarray] = []
    kept = 0
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            streams = [s for s in container.streams if s.type == "audio"]
            if not streams:
                raise ApiError(400, f"{param}: the file has no audio track", "invalid_audio", param)
            rate = streams[0].rate or streams[0].codec_context.sample_rate
            _check_rate(rate, param)
            keep = int(max_seconds * rate)
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            for frame in container.decode(streams[0]):
                for out in resampler.resample(frame):
                    pieces.append(out.to_ndarray().reshape(-1))
                    kept += pieces[-1].size
                if kept > keep:
                    break
            else:
                pieces += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
    except av.FFmpegError as exc:
        raise _unreadable(sniff_format(data) or "audio", exc, param) from None
    audio = np.concatenate(pieces).astype(np.float32) if pieces else np.zeros(0, np.float32)
    return audio[:keep], rate, audio.size > keep


def _mono(frames: np.ndarray) -> np.ndarray:
    return frames.mean(axis=1, dtype=np.float32) if frames.shape[1] > 1 else np.ascontiguousarray(frames[:, 0])
