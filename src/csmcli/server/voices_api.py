"""Voices over HTTP and the playground page that ``csm serve`` shows at ``/``.

``POST /v1/audio/voices`` stores an uploaded recording exactly as ``csm voices add`` does (through
:class:`~csmcli.voices.VoiceLibrary`), ``GET /v1/audio/voices`` lists every voice with its transcript,
length and speaker, ``DELETE /v1/audio/voices/{name}`` removes a user voice.  Uploads are read with
their own size limit and decoded in a worker thread (see :mod:`.uploads`).  The page and its scripts
are package data served without an API key; everything they call goes through the server's usual key check.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import tempfile
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .. import formats
from ..errors import AudioError, InputError
from ..voices import DEFAULT_VOICES, MAX_CONTEXT_SECONDS, NO_VOICE, Voice, VoiceLibrary
from .requests import OPENAI_VOICES, ApiError, speaker_field
from .uploads import MAX_UPLOAD_BYTES, UPLOAD_FORMATS, decode_upload, read_form, sniff_format

if TYPE_CHECKING:
    from .app import SpeechServer

#: Fields ``POST /v1/audio/voices`` takes.
UPLOAD_FIELDS = ("name", "text", "audio", "speaker")
#: Where the page's files are served from; they and ``/`` need no API key.
UI_PREFIX = "/ui/"

_UI_FILE = re.compile(r"^[a-z0-9_-]+\.(html|css|js)$")
_CONTENT_TYPES = {"html": "text/html", "css": "text/css", "js": "text/javascript"}
#: The page loads nothing from elsewhere; audio it plays or records lives in blob: URLs.
_PAGE_POLICY = "default-src 'self'; media-src 'self' blob:; img-src 'self' data:; object-src 'none'"


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
        speaker = speaker_field(upload.fields.get("speaker"))
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
    """The multipart form's fields and its one recording, each read only up to its limit."""
    form = await read_form(request, UPLOAD_FIELDS, files=("audio",), limit=limit)
    audio = form.fields.pop("audio", None)
    return Upload(form.fields, audio, form.filenames.get("audio", ""))


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
