"""Request bodies: reading JSON or form fields, validating them, and the JSON error every failure becomes."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .. import formats
from ..errors import OptionsError
from ..options import OPTION_FIELDS, SPEAKERS, GenerationOptions
from ..voices import DEFAULT_VOICES

#: Longest text one request may carry (characters).
MAX_TEXT_CHARS = 5000
#: Largest request body (bytes); bigger bodies get 413.
MAX_BODY_BYTES = 256 * 1024
#: Fields ``POST /generate`` takes besides the generation options.
GENERATE_OWN_FIELDS = ("text", "speaker", "streaming", "voice", "format", "bitrate")
#: Per-request context (both endpoints): JSON ``context`` clips, or repeatable multipart fields.
CONTEXT_FIELDS = ("context", "context_audio", "context_text", "context_speaker")
GENERATE_FIELDS = (*GENERATE_OWN_FIELDS, *OPTION_FIELDS, *CONTEXT_FIELDS)
#: Fields ``POST /v1/audio/speech`` takes besides the generation options (``speaker`` is ours).
SPEECH_OWN_FIELDS = (
    "model",
    "input",
    "voice",
    "instructions",
    "response_format",
    "speed",
    "stream_format",
    "speaker",
    "bitrate",
)
SPEECH_FIELDS = (*SPEECH_OWN_FIELDS, *OPTION_FIELDS, *CONTEXT_FIELDS)
#: OpenAI voice names and the speaker (with its default preset voice) each one maps to.
OPENAI_VOICES = {
    "alloy": 0,
    "coral": 0,
    "nova": 0,
    "sage": 0,
    "shimmer": 0,
    "marin": 0,
    "ash": 1,
    "ballad": 1,
    "echo": 1,
    "fable": 1,
    "onyx": 1,
    "verse": 1,
    "cedar": 1,
}
#: Longest piece of a bad value quoted back in an error message.
SHOWN_CHARS = 40

_ERROR_TYPES = {
    401: "authentication_error",
    404: "not_found_error",
    408: "timeout_error",
    503: "service_unavailable",
    504: "timeout_error",
}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class ApiError(Exception):
    """An error answered as JSON ``{"error": {"message", "type", "code", "param"}}``."""

    def __init__(
        self, status: int, message: str, code: str, param: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        """The JSON response for this error."""
        return error_response(self.status, str(self), self.code, self.param, self.headers)


def error_response(
    status: int, message: str, code: str, param: str | None = None, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A JSON error body with the OpenAI-style ``type`` for ``status``."""
    return web.Response(
        body=error_body(status, message, code, param), status=status, headers=headers, content_type="application/json"
    )


def error_body(status: int, message: str, code: str, param: str | None = None) -> bytes:
    """The bytes of a JSON error body (also written raw by the connection-level handlers)."""
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return json.dumps({"error": {"message": message, "type": kind, "code": code, "param": param}}).encode()


def shown(value: Any) -> str:
    """``repr(value)``, cut to :data:`SHOWN_CHARS` characters for an error message."""
    big = isinstance(value, int) and abs(value) >= 10**SHOWN_CHARS
    text = f"a {len(str(value))}-digit number" if big else repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


@dataclass(frozen=True)
class SpeechRequest:
    """A validated request: what to say, how, and how to answer (``whole``, ``audio`` stream or ``sse``);
    ``context`` holds the request's own context clips (they replace the voice), None without."""

    text: str
    speaker: int
    voice: str | None
    options: GenerationOptions
    fmt: str = "wav"
    mode: str = "whole"
    #: Bits/s for a lossy ``fmt`` (its default when not asked), else None.
    bitrate: int | None = None
    context: tuple[Any, ...] | None = None


# -- request bodies -----------------------------------------------------------------------------


async def read_fields(request: web.Request, limit: int = MAX_BODY_BYTES, timeout: float = 30.0) -> dict[str, Any]:
    """The request's fields from a JSON object, a urlencoded form or a multipart form; 408 if the body
    takes longer than ``timeout`` seconds to arrive."""
    try:
        return check_strings(await asyncio.wait_for(_read_fields(request, limit), timeout))
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s", "body_timeout") from None


async def _read_fields(request: web.Request, limit: int) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    try:
        if request.content_type == "multipart/form-data":
            return _form_fields(await request.post())
        body = await request.read()
        if request.content_type == "application/x-www-form-urlencoded" and body.lstrip()[:1] != b"{":
            return _form_fields(await request.post())  # JSON sent with curl -d but no -H is parsed below
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(limit) from None
    except (ValueError, UnicodeDecodeError, AssertionError) as exc:  # AssertionError: a broken multipart body
        raise ApiError(400, f"malformed form body: {shown(str(exc))}", "invalid_body") from None
    json_type = request.content_type == "application/json" or request.content_type.endswith("+json")
    if not json_type and body.lstrip()[:1] not in (b"{", b"["):
        raise ApiError(
            415,
            f"unsupported Content-Type {shown(request.content_type)}: send a JSON object (application/json) or form "
            "fields",
            "unsupported_media_type",
        )
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"malformed JSON body: {exc}", "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the JSON body must be an object, got {type(data).__name__}", "invalid_json")
    return data


def check_strings(fields: dict[str, Any]) -> dict[str, Any]:
    """400 for a field name or string value that is not valid Unicode (a lone surrogate from a JSON
    ``\\ud800`` escape): the tokenizer and the log cannot take it."""
    for key, value in fields.items():
        for text in (key, value):
            if isinstance(text, str) and not _encodable(text):
                name = key if isinstance(key, str) and _encodable(key) else shown(key)
                message = f"field {name!r} holds a lone surrogate (invalid Unicode)"
                raise ApiError(400, message, "invalid_unicode", name)
    return fields


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body is larger than the {limit}-byte limit", "body_too_large")


def _form_fields(form: Mapping[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key in set(form.keys()):
        values = form.getall(key)  # type: ignore[attr-defined]
        if len(values) > 1:
            raise ApiError(400, f"field {shown(key)} is given {len(values)} times", "duplicate_field", key)
        if not isinstance(values[0], str):
            raise ApiError(400, f"field {shown(key)} must be a plain value, not a file", "invalid_type", key)
        fields[key] = values[0]
    return fields


def check_fields(fields: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    """400 naming every field not in ``allowed`` (and listing the accepted ones)."""
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        names = ", ".join(shown(name)[1:-1] if isinstance(name, str) else shown(name) for name in unknown[:5])
        raise ApiError(
            400,
            f"unknown field{'s' if len(unknown) > 1 else ''} {names}; accepted fields: {', '.join(allowed)}",
            "unknown_field",
            unknown[0][:SHOWN_CHARS],
        )


def _absent(value: Any) -> bool:
    return value is None or value == ""


def _text(fields: Mapping[str, Any], name: str, limit: int) -> str:
    value = fields.get(name)
    if value is None:
        raise ApiError(400, f"missing required field {name!r}: the text to speak", "missing_field", name)
    if not isinstance(value, str):
        raise ApiError(400, f"{name} must be a string, got {type(value).__name__}", "invalid_type", name)
    if not value.strip():
        raise ApiError(400, f"{name} is empty: give some words to speak", "empty_text", name)
    if len(value) > limit:
        raise ApiError(
            400,
            f"{name} is {len(value)} characters; the limit is {limit}: split it into several requests",
            "text_too_long",
            name,
        )
    return value.strip()


def _string(fields: Mapping[str, Any], name: str) -> str | None:
    value = fields.get(name)
    if _absent(value):
        return None
    if not isinstance(value, str):
        raise ApiError(400, f"{name} must be a string, got {type(value).__name__}", "invalid_type", name)
    return value.strip()


def speaker_field(value: Any, default: int = 0, param: str = "speaker") -> int:
    """A speaker id from JSON or a form: one of :data:`~csmcli.options.SPEAKERS`, as a number or its
    digits (``"1"``); absent or empty is ``default``; anything else a 400 naming ``param``."""
    if _absent(value) or value == "":
        return default
    if isinstance(value, str) and value.strip() in {str(s) for s in SPEAKERS}:
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value not in SPEAKERS:
        raise ApiError(400, f"{param} must be 0 or 1, got {shown(value)}", "invalid_speaker", param)
    return value


def _flag(fields: Mapping[str, Any], name: str, default: bool) -> bool:
    value = fields.get(name)
    if _absent(value):
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, str) or value in (0, 1) else None
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ApiError(400, f"{name} must be true or false, got {shown(value)}", "invalid_type", name)


def _choice(fields: Mapping[str, Any], name: str, choices: tuple[str, ...], default: str) -> str:
    value = _string(fields, name)
    if value is None:
        return default
    if value.lower() not in choices:
        raise ApiError(
            400, f"{name} {shown(value)} is not supported: use one of {', '.join(choices)}", f"unsupported_{name}", name
        )
    return value.lower()


def _format(fields: Mapping[str, Any], name: str, default: str) -> tuple[str, int | None]:
    """The format named by field ``name`` (any name or alias in :data:`csmcli.formats.FORMATS`) and the
    ``bitrate`` field checked for it; a 400 naming the field and listing the choices."""
    value = _string(fields, name)
    try:
        fmt = formats.lookup(default if value is None else value).name
    except OptionsError as exc:
        raise ApiError(400, f"{name}: {exc}", f"unsupported_{name}", name) from None
    bitrate = fields.get("bitrate")
    if isinstance(bitrate, bool) or not (_absent(bitrate) or isinstance(bitrate, (str, int))) or len(str(bitrate)) > 12:
        raise ApiError(
            400, f"bitrate must be a number of bits/s or e.g. '96k', got {shown(bitrate)}", "invalid_type", "bitrate"
        )
    try:
        return fmt, formats.check_bitrate(fmt, None if _absent(bitrate) else bitrate)
    except OptionsError as exc:
        raise ApiError(400, f"bitrate: {exc}", "invalid_bitrate", "bitrate") from None


def _options(fields: Mapping[str, Any], base: GenerationOptions) -> GenerationOptions:
    given = {k: fields[k] for k in OPTION_FIELDS if not _absent(fields.get(k))}
    try:
        options = GenerationOptions.from_mapping(given, base=base)
    except OptionsError as exc:
        param = next((k for k in OPTION_FIELDS if str(exc).startswith(k)), None)
        raise ApiError(400, str(exc), exc.code, param) from None
    return options if options.seed is not None else options.replace(seed=secrets.randbits(32))


def parse_generate(fields: Mapping[str, Any], defaults: GenerationOptions, max_text_chars: int) -> SpeechRequest:
    """Validate a ``POST /generate`` body (vox-serve's fields plus ours)."""
    check_fields(fields, GENERATE_FIELDS)
    text = _text(fields, "text", max_text_chars)
    speaker = speaker_field(fields.get("speaker"))
    streaming = _flag(fields, "streaming", False)
    fmt, bitrate = _format(fields, "format", "wav")
    if streaming and not formats.lookup(fmt).streamable:
        raise ApiError(
            400, f"{fmt} cannot be streamed: use streaming false, or another format", "unsupported_format", "format"
        )
    mode = "audio" if streaming else "whole"
    return SpeechRequest(text, speaker, _string(fields, "voice"), _options(fields, defaults), fmt, mode, bitrate)


def parse_speech(fields: Mapping[str, Any], defaults: GenerationOptions, max_text_chars: int) -> SpeechRequest:
    """Validate an OpenAI ``POST /v1/audio/speech`` body."""
    check_fields(fields, SPEECH_FIELDS)
    _string(fields, "model")
    _string(fields, "instructions")
    text = _text(fields, "input", max_text_chars)
    fmt, bitrate = _format(fields, "response_format", "mp3")
    speed = fields.get("speed")
    if not _absent(speed):
        try:
            ok = not isinstance(speed, bool) and float(speed) == 1.0
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise ApiError(
                400,
                f"speed must be 1.0, got {shown(speed)}: CSM-1B cannot change its speaking rate",
                "unsupported_speed",
                "speed",
            )
    sse = _choice(fields, "stream_format", ("audio", "sse"), "audio") == "sse"
    streamable = formats.lookup(fmt).streamable
    if sse and not streamable:
        raise ApiError(
            400,
            f"stream_format sse streams the audio, and {fmt} cannot be streamed: use another response_format",
            "unsupported_response_format",
            "response_format",
        )
    voice = _string(fields, "voice")
    speaker = 0
    if voice is not None and voice.lower() in OPENAI_VOICES:
        speaker, voice = OPENAI_VOICES[voice.lower()], None
    elif voice is not None:
        speaker = next((s for s, name in DEFAULT_VOICES.items() if name == voice), 0)
    mode = "sse" if sse else "audio" if streamable else "whole"  # flac is answered whole
    return SpeechRequest(
        text, speaker_field(fields.get("speaker"), speaker), voice, _options(fields, defaults), fmt, mode, bitrate
    )
