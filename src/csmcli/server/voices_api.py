"""Voices over HTTP and the playground page that ``csm serve`` shows at ``/``.

``POST /v1/audio/voices`` stores an uploaded recording exactly as ``csm voices add`` does (through
:class:`~csmcli.voices.VoiceLibrary`), ``GET /v1/audio/voices`` lists every voice with its transcript,
length and speaker, ``DELETE /v1/audio/voices/{name}`` removes a user voice.  Uploads are read with
their own size limit and decoded in a worker thread: libsndfile for wav, flac, ogg and mp3, PyAV for
the webm/opus (and mp4) recordings browsers make.  The page and its scripts are package data served
without an API key; everything they call goes through the server's usual key check.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import re
import tempfile
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from .. import formats
from ..errors import AudioError, InputError
from ..voices import DEFAULT_VOICES, MAX_CONTEXT_SECONDS, NO_VOICE, Voice, VoiceLibrary
from .requests import OPENAI_VOICES, ApiError, check_fields

if TYPE_CHECKING:
    from .app import SpeechServer

#: Largest recording an upload may carry (bytes).
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
#: Largest plain (non-file) field of an upload form (bytes).
MAX_FIELD_BYTES = 64 * 1024
#: Sample rates an uploaded recording may have (Hz).
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8000, 192_000
#: Fields ``POST /v1/audio/voices`` takes.
UPLOAD_FIELDS = ("name", "text", "audio", "speaker")
#: Recording formats an upload may be in, as the page and the errors name them.
UPLOAD_FORMATS = ("wav", "flac", "ogg", "mp3", "webm", "mp4")
#: Where the page's files are served from; they and ``/`` need no API key.
UI_PREFIX = "/ui/"

_UI_FILE = re.compile(r"^[a-z0-9_-]+\.(html|css|js)$")
_CONTENT_TYPES = {"html": "text/html", "css": "text/css", "js": "text/javascript"}
#: The page loads nothing from elsewhere; audio it plays or records lives in blob: URLs.
_PAGE_POLICY = "default-src 'self'; media-src 'self' blob:; img-src 'self' data:; object-src 'none'"
_SOUNDFILE_FORMATS = {"WAV": "wav", "WAVEX": "wav", "RF64": "wav", "FLAC": "flac", "OGG": "ogg", "MP3": "mp3"}


def is_public(path: str) -> bool:
    """Whether ``path`` is the playground page or one of its files (served without an API key)."""
    return path == "/" or path.startswith(UI_PREFIX)


def add_routes(app: web.Application, server: SpeechServer) -> None:
    """Register the voices API and the playground on ``app`` (``server``'s application)."""
    routes = VoiceRoutes(server)
    app.router.add_get("/", routes.page)
    app.router.add_get(UI_PREFIX + "{file}", routes.ui_file)
    app.router.add_get("/v1/playground", routes.playground)
    app.router.add_get("/v1/audio/voices", routes.list_voices)
    app.router.add_post("/v1/audio/voices", routes.add_voice)
    app.router.add_delete("/v1/audio/voices/{name}", routes.delete_voice)


@dataclasses.dataclass
class Upload:
    """An upload form's plain fields and its recording."""

    fields: dict[str, str]
    audio: bytes | None = None
    filename: str = ""


class VoiceRoutes:
    """The handlers, around one server (its config, its synthesizer's voice library)."""

    def __init__(self, server: SpeechServer) -> None:
        self.server = server

    @property
    def library(self) -> VoiceLibrary:
        return self.server.synth.voices

    # -- the page -------------------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.Response:
        """The playground."""
        return _ui_response("index.html")

    async def ui_file(self, request: web.Request) -> web.Response:
        """One of the page's stylesheets or scripts."""
        return _ui_response(request.match_info["file"])

    async def playground(self, request: web.Request) -> web.Response:
        """What the page needs to know: request defaults, formats and the voice upload limits."""
        config = self.server.config
        return web.json_response(
            {
                "model": config.model_id,
                "sample_rate": self.server.sample_rate,
                "defaults": dataclasses.asdict(config.defaults),
                "formats": list(formats.FORMATS),
                "max_text_chars": config.max_text_chars,
                "voices": {
                    "read_only": config.read_only_voices,
                    "max_voices": config.max_voices,
                    "max_upload_bytes": MAX_UPLOAD_BYTES,
                    "max_seconds": MAX_CONTEXT_SECONDS,
                    "formats": list(UPLOAD_FORMATS),
                },
            }
        )

    # -- voices ---------------------------------------------------------------------------------

    async def list_voices(self, request: web.Request) -> web.Response:
        """Preset and user voices (transcript, seconds, speaker), ``none``, and the OpenAI names."""
        voices = await asyncio.to_thread(lambda: [_describe(v) for v in self.library.list()])
        voices.append({"id": NO_VOICE, "name": NO_VOICE, "source": "builtin", "speaker": 0})
        voices += [
            {"id": name, "name": name, "source": "openai", "speaker": s, "voice": DEFAULT_VOICES[s]}
            for name, s in OPENAI_VOICES.items()
        ]
        return web.json_response({"voices": voices})

    async def add_voice(self, request: web.Request) -> web.Response:
        """Store an uploaded recording and its transcript as a user voice (201)."""
        self._check_writable()
        upload = await read_upload(request)
        name = _required(upload.fields, "name")
        text = _required(upload.fields, "text")
        speaker = _speaker(upload.fields.get("speaker", ""))
        limit = self.server.config.max_text_chars
        if len(text) > limit:
            raise ApiError(400, f"text is {len(text)} characters; the limit is {limit}", "text_too_long", "text")
        if name.lower() in OPENAI_VOICES:
            raise ApiError(
                400, f"name {name!r} is an OpenAI voice name here: choose another", "reserved_voice_name", "name"
            )
        if upload.audio is None:
            raise ApiError(400, "missing required field 'audio': the recording (a file)", "missing_field", "audio")
        voice, warning = await asyncio.to_thread(self._store, name, text, speaker, upload)
        body = {"voice": _describe(voice)}
        headers = {}
        if warning:
            body["warning"] = warning
            headers["Warning"] = f'299 csm "{warning}"'
        return web.json_response(body, status=201, headers=headers)

    def _store(self, name: str, text: str, speaker: int, upload: Upload) -> tuple[Voice, str | None]:
        """Decode, check and store the recording (a worker thread: decoding takes a while)."""
        existing = {v.name for v in self.library.user_voices()}
        if name not in existing and len(existing) >= self.server.config.max_voices:
            raise ApiError(
                409,
                f"the server keeps at most {self.server.config.max_voices} voices: delete one first",
                "too_many_voices",
                "name",
            )
        audio, rate, warning = decode_upload(upload.audio or b"")
        import soundfile as sf

        with tempfile.TemporaryDirectory(prefix="csm-voice-") as tmp:
            path = Path(tmp) / "upload.wav"
            sf.write(path, audio, rate, subtype="FLOAT")
            try:
                voice = self.library.add(name, path, text)
            except AudioError as exc:
                raise ApiError(400, f"audio: {exc}", "invalid_audio", "audio") from None
            except InputError as exc:
                raise _add_error(str(exc), name) from None
        meta = voice.audio_path.parent / "voice.json"
        data = json.loads(meta.read_text())
        meta.write_text(json.dumps({**data, "source": upload.filename or "upload", "speaker": speaker}))
        return voice, warning

    async def delete_voice(self, request: web.Request) -> web.Response:
        """Delete a user voice; presets and built-in names cannot be deleted (403)."""
        self._check_writable()
        name = request.match_info["name"]

        def remove() -> bool:
            if name in {v.name for v in self.library.user_voices()}:
                self.library.remove(name)
                return True
            return False

        if await asyncio.to_thread(remove):
            return web.json_response({"deleted": name})
        builtin = {v.name for v in self.library.presets()} | {NO_VOICE, *OPENAI_VOICES}
        if name in builtin:
            raise ApiError(403, f"voice {name!r} is built in and cannot be deleted", "preset_voice", "name")
        raise ApiError(404, f"no user voice {name!r}: GET /v1/audio/voices lists the voices", "unknown_voice", "name")

    def _check_writable(self) -> None:
        if self.server.config.read_only_voices:
            raise ApiError(
                403, "voices are read-only on this server (--read-only-voices)", "read_only_voices", "voices"
            )


# -- reading and decoding uploads -----------------------------------------------------------------


async def read_upload(request: web.Request, limit: int = MAX_UPLOAD_BYTES) -> Upload:
    """The multipart form's fields and its one file, each read only up to its limit."""
    if request.content_type != "multipart/form-data":
        raise ApiError(
            415,
            f"unsupported Content-Type {request.content_type!r}: send multipart/form-data with "
            "fields name, text and the audio file",
            "unsupported_media_type",
        )
    if request.content_length is not None and request.content_length > limit + MAX_FIELD_BYTES:
        raise _upload_too_large(limit)
    try:
        reader = await request.multipart()
        upload = Upload({})
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or not part.name:
                raise ApiError(400, "every form part needs a field name", "invalid_body")
            check_fields({part.name: None}, UPLOAD_FIELDS)
            if part.name in upload.fields or (part.name == "audio" and upload.audio is not None):
                raise ApiError(400, f"field {part.name!r} is given twice", "duplicate_field", part.name)
            if part.name == "audio":
                upload.audio = await _read_part(part, limit, "audio")
                upload.filename = Path(part.filename or "").name[:128]
            elif part.filename is not None:
                raise ApiError(400, f"field {part.name!r} must be a plain value, not a file", "invalid_type", part.name)
            else:
                raw = await _read_part(part, MAX_FIELD_BYTES, part.name)
                upload.fields[part.name] = raw.decode(part.get_charset("utf-8"))
    except (ValueError, UnicodeDecodeError, LookupError, HttpProcessingError) as exc:
        reason = str(exc).strip().replace("\n", " ") or type(exc).__name__
        raise ApiError(400, f"malformed multipart body: {reason}", "invalid_body") from None
    return upload


async def _read_part(part: BodyPartReader, limit: int, name: str) -> bytes:
    data = bytearray()
    while chunk := await part.read_chunk(256 * 1024):
        data += chunk
        if len(data) > limit:
            if name == "audio":
                raise _upload_too_large(limit)
            raise ApiError(400, f"field {name!r} is longer than {limit} bytes", "field_too_long", name)
    return bytes(data)


def _upload_too_large(limit: int) -> ApiError:
    return ApiError(
        413, f"audio is larger than the {limit // (1024 * 1024)} MB upload limit", "audio_too_large", "audio"
    )


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


def decode_upload(data: bytes, max_seconds: float = MAX_CONTEXT_SECONDS) -> tuple[np.ndarray, int, str | None]:
    """Float32 mono audio, its rate, and a warning when it was cut to its first ``max_seconds``.

    Only the first ``max_seconds`` are decoded (a voice keeps no more), so a small file of very long
    audio costs no more memory than a short one."""
    fmt = sniff_format(data)
    if fmt is None:
        raise ApiError(
            415,
            f"audio is not in a supported format: send {', '.join(UPLOAD_FORMATS[:-1])} or {UPLOAD_FORMATS[-1]}",
            "unsupported_audio_format",
            "audio",
        )
    if fmt in ("webm", "mp4"):
        audio, rate, longer = _decode_av(data, max_seconds)
    else:
        audio, rate, longer = _decode_soundfile(data, max_seconds)
    if len(audio) == 0:
        raise ApiError(400, "audio has no samples: record or send a few seconds of speech", "empty_audio", "audio")
    warning = None
    if longer:
        warning = f"audio is longer than {max_seconds:g} s: its first {max_seconds:g} s were kept"
    return audio, rate, warning


def _check_rate(rate: int) -> None:
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise ApiError(
            400,
            f"audio has a sample rate of {rate} Hz: use {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} Hz",
            "unsupported_sample_rate",
            "audio",
        )


def _unreadable(fmt: str, exc: BaseException) -> ApiError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ApiError(400, f"audio could not be decoded as {fmt}: {reason}", "invalid_audio", "audio")


def _decode_soundfile(data: bytes, max_seconds: float) -> tuple[np.ndarray, int, bool]:
    import soundfile as sf

    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            fmt = _SOUNDFILE_FORMATS.get(f.format)
            if fmt is None:
                raise ApiError(415, f"audio is {f.format}, not a supported format", "unsupported_audio_format", "audio")
            _check_rate(f.samplerate)
            keep = int(max_seconds * f.samplerate)
            frames = f.read(keep + 1, dtype="float32", always_2d=True)
    except (RuntimeError, OSError) as exc:  # RuntimeError: soundfile.LibsndfileError
        raise _unreadable(sniff_format(data) or "audio", exc) from None
    longer = len(frames) > keep
    return _mono(frames[:keep]), f.samplerate, longer


def _decode_av(data: bytes, max_seconds: float) -> tuple[np.ndarray, int, bool]:
    import av

    pieces: list[np.ndarray] = []
    kept = 0
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            streams = [s for s in container.streams if s.type == "audio"]
            if not streams:
                raise ApiError(400, "audio: the file has no audio track", "invalid_audio", "audio")
            rate = streams[0].rate or streams[0].codec_context.sample_rate
            _check_rate(rate)
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
        raise _unreadable(sniff_format(data) or "audio", exc) from None
    audio = np.concatenate(pieces).astype(np.float32) if pieces else np.zeros(0, np.float32)
    return audio[:keep], rate, audio.size > keep


def _mono(frames: np.ndarray) -> np.ndarray:
    return frames.mean(axis=1, dtype=np.float32) if frames.shape[1] > 1 else np.ascontiguousarray(frames[:, 0])


# -- small helpers --------------------------------------------------------------------------------


def _describe(voice: Voice) -> dict[str, Any]:
    """A voice as the list shows it: transcript, seconds of audio and the speaker it suits."""
    import soundfile as sf

    speaker = {name: s for s, name in DEFAULT_VOICES.items()}.get(voice.name, 0)
    if voice.source == "user":
        try:
            speaker = int(json.loads((voice.audio_path.parent / "voice.json").read_text()).get("speaker", 0))
        except (OSError, ValueError, TypeError):
            speaker = 0
    try:
        seconds = min(sf.info(str(voice.audio_path)).duration, MAX_CONTEXT_SECONDS)
    except (RuntimeError, OSError):
        seconds = None
    return {
        "id": voice.name,
        "name": voice.name,
        "source": voice.source,
        "speaker": speaker,
        "text": voice.text,
        "duration_s": None if seconds is None else round(seconds, 3),
    }


def _required(fields: dict[str, str], name: str) -> str:
    value = fields.get(name, "").strip()
    if not value:
        what = "the voice's name" if name == "name" else "exactly what the recording says"
        raise ApiError(400, f"missing required field {name!r}: {what}", "missing_field", name)
    return value


def _speaker(value: str) -> int:
    if value.strip() in ("", "0", "1"):
        return int(value.strip() or 0)
    raise ApiError(400, f"speaker must be 0 or 1, got {value!r}", "invalid_speaker", "speaker")


def _add_error(message: str, name: str) -> ApiError:
    """The HTTP error for an :class:`InputError` from ``VoiceLibrary.add`` (a bad name or a clash)."""
    if message.startswith("voice name"):
        return ApiError(400, message, "invalid_voice_name", "name")
    if "exists" in message:
        return ApiError(409, f"voice {name!r} exists: delete it first", "voice_exists", "name")
    return ApiError(400, message, "invalid_voice")


def _ui_response(name: str) -> web.Response:
    if not _UI_FILE.match(name):
        raise web.HTTPNotFound()
    resource = resources.files("csmcli.webui") / name
    if not resource.is_file():
        raise web.HTTPNotFound()
    kind = _CONTENT_TYPES[name.rsplit(".", 1)[1]]
    headers = {
        "Cache-Control": "no-cache",
        "Content-Security-Policy": _PAGE_POLICY,
        "X-Content-Type-Options": "nosniff",
    }
    return web.Response(text=resource.read_text(encoding="utf-8"), content_type=kind, headers=headers)


__all__ = ["MAX_UPLOAD_BYTES", "UPLOAD_FORMATS", "add_routes", "decode_upload", "is_public", "sniff_format"]
