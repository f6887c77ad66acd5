"""Per-request context: recordings with their transcripts sent along with a speech request, unsaved.

``POST /generate`` and ``POST /v1/audio/speech`` take them as a JSON ``context`` list
(``[{"text": ..., "audio": <base64 of a recording>, "speaker": 0}]``) or as the repeatable multipart
fields ``context_audio`` (files), ``context_text`` (one per file, same order) and ``context_speaker``
(optional; the request's speaker by default).  Like the CLI's ``--context-audio`` they replace the
voice.  Each clip is decoded, trimmed to its first 30 s (with a ``Warning`` header) and Mimi-encoded
in a worker thread, once: the encoded clip is cached under a hash of its bytes, transcript and speaker,
so the same clip sent again is neither decoded nor encoded, and its prompt rows hit the engine's
prefix cache.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..audio import resample
from ..prompt import Segment
from ..voices import MAX_CONTEXT_SECONDS, fit_context_audio
from .config import ServerConfig
from .requests import MAX_BODY_BYTES, ApiError, SpeechRequest, check_strings, read_fields, speaker_field
from .uploads import decode_upload, read_form

if TYPE_CHECKING:
    from ..synthesizer import Synthesizer

#: The multipart fields that may be given more than once, and the one that holds files.
REPEATED = ("context_audio", "context_text", "context_speaker")
FILE_FIELD = "context_audio"
#: Keys of one clip of the JSON ``context`` list.
CLIP_KEYS = ("text", "audio", "speaker")


@dataclass(frozen=True)
class ContextClip:
    """One clip as sent: the recording's bytes, its transcript and speaker, and the field errors about
    its audio name (``context_audio`` or ``context[i].audio``), with ``where`` to tell files apart."""

    data: bytes = field(repr=False)
    text: str
    speaker: int
    param: str
    where: str = ""

    @property
    def key(self) -> tuple:
        """The cache key: equal bytes, transcript and speaker give equal codes."""
        return ("clip", hashlib.sha256(self.data).hexdigest(), self.text, self.speaker)


# -- reading and checking -------------------------------------------------------------------------


async def read_body(request: web.Request, config: ServerConfig, allowed: tuple[str, ...]) -> dict[str, Any]:
    """A speech request's fields.  A multipart form is read part by part, its files together up to
    ``max_context_bytes``; another body may be that large only when it carries ``context``, else
    it keeps the :data:`MAX_BODY_BYTES` limit."""
    limit = max(config.max_context_bytes, MAX_BODY_BYTES)
    if request.content_type != "multipart/form-data":
        fields = await read_fields(request, limit, config.read_timeout)
        if "context" not in fields and len(await request.read()) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body is larger than the {MAX_BODY_BYTES}-byte limit", "body_too_large")
        return fields
    reading = read_form(request, allowed, files=(FILE_FIELD,), repeatable=REPEATED, limit=config.max_context_bytes)
    try:
        form = await asyncio.wait_for(reading, config.read_timeout)
    except asyncio.TimeoutError:
        raise ApiError(
            408, f"the request body did not arrive within {config.read_timeout:g} s", "body_timeout"
        ) from None
    return check_strings(form.fields)


def with_context(req: SpeechRequest, fields: Mapping[str, Any], config: ServerConfig) -> SpeechRequest:
    """``req`` with the context clips its fields carry (checked; not yet decoded)."""
    clips = parse_context(fields, req.speaker, config.max_context_clips, config.max_text_chars)
    return req if clips is None else dataclasses.replace(req, context=clips)


def parse_context(
    fields: Mapping[str, Any], speaker: int, max_clips: int, max_text_chars: int
) -> tuple[ContextClip, ...] | None:
    """The clips of a JSON ``context`` list or of the ``context_*`` form fields; None when there are none."""
    given = fields.get("context")
    form = {name: fields[name] for name in REPEATED if fields.get(name) is not None}
    if given is not None and form:
        raise ApiError(
            400,
            f"give context either as the JSON list 'context' or as the fields {', '.join(REPEATED)}, not both",
            "conflicting_fields",
            "context",
        )
    if given is None and not form:
        return None
    if given is not None:
        clips = _json_clips(given, speaker, max_clips, max_text_chars)
    else:
        clips = _form_clips(form, speaker, max_clips, max_text_chars)
    return tuple(clips)


def _check_count(count: int, max_clips: int, param: str) -> None:
    if count == 0:
        raise ApiError(400, f"{param} is empty: give at least one clip, or leave it out", "empty_context", param)
    if count > max_clips:
        message = f"{param} has {count} clips; the limit is {max_clips}"
        raise ApiError(400, message, "too_many_context_clips", param)


def _json_clips(given: Any, speaker: int, max_clips: int, max_text_chars: int) -> list[ContextClip]:
    if isinstance(given, str):  # a form field holding the JSON list
        try:
            given = json.loads(given)
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, f"context is not valid JSON: {exc}", "invalid_json", "context") from None
    if not isinstance(given, list):
        message = f"context must be a list of {{text, audio, speaker}} objects, got {type(given).__name__}"
        raise ApiError(400, message, "invalid_type", "context")
    _check_count(len(given), max_clips, "context")
    clips = []
    for i, item in enumerate(given):
        where = f"context[{i}]"
        if not isinstance(item, dict):
            raise ApiError(400, f"{where} must be an object, got {type(item).__name__}", "invalid_type", where)
        unknown = sorted(str(k) for k in set(item) - set(CLIP_KEYS))
        if unknown:
            message = f"{where} has the unknown key {unknown[0][:40]!r}; a clip takes {', '.join(CLIP_KEYS)}"
            raise ApiError(400, message, "unknown_field", f"{where}.{unknown[0][:40]}")
        text = _clip_text(item.get("text"), f"{where}.text", max_text_chars)
        data = _base64(item.get("audio"), f"{where}.audio")
        clip_speaker = speaker_field(item.get("speaker"), speaker, f"{where}.speaker")
        clips.append(ContextClip(data, text, clip_speaker, f"{where}.audio"))
    return clips


def _form_clips(form: Mapping[str, Any], speaker: int, max_clips: int, max_text_chars: int) -> list[ContextClip]:
    files, texts = form.get(FILE_FIELD), form.get("context_text")
    speakers = form.get("context_speaker")
    for name, value, kind in (
        (FILE_FIELD, files, bytes),
        ("context_text", texts, str),
        ("context_speaker", speakers, str),
    ):
        if value is not None and not (isinstance(value, list) and all(isinstance(v, kind) for v in value)):
            message = (
                f"{name} must be given as multipart form fields ({FILE_FIELD} as files); "
                "a JSON body sends context: [{text, audio (base64), speaker}]"
            )
            raise ApiError(400, message, "invalid_type", name)
    if files is None:
        raise ApiError(
            400, "context_text is given without context_audio: send the recordings too", "missing_field", FILE_FIELD
        )
    _check_count(len(files), max_clips, FILE_FIELD)
    if texts is None or len(texts) != len(files):
        message = (
            f"give one context_text per context_audio, in the same order ({len(files)} audio, {len(texts or [])} texts)"
        )
        raise ApiError(400, message, "missing_field" if texts is None else "context_mismatch", "context_text")
    if speakers is not None and len(speakers) != len(files):
        message = f"give one context_speaker per context_audio, or none ({len(files)} audio, {len(speakers)} speakers)"
        raise ApiError(400, message, "context_mismatch", "context_speaker")
    clips = []
    for i, (data, text) in enumerate(zip(files, texts, strict=True)):
        clip_speaker = speaker_field(speakers[i] if speakers else None, speaker, "context_speaker")
        where = f" (file {i + 1} of {len(files)})" if len(files) > 1 else ""
        clips.append(
            ContextClip(data, _clip_text(text, "context_text", max_text_chars), clip_speaker, FILE_FIELD, where)
        )
    return clips


def _clip_text(value: Any, param: str, limit: int) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ApiError(400, f"missing {param}: exactly what the clip says", "missing_field", param)
    if not isinstance(value, str):
        raise ApiError(400, f"{param} must be a string, got {type(value).__name__}", "invalid_type", param)
    if len(value) > limit:
        raise ApiError(400, f"{param} is {len(value)} characters; the limit is {limit}", "text_too_long", param)
    check_strings({param: value})
    return value.strip()


def _base64(value: Any, param: str) -> bytes:
    if value is None or value == "":
        raise ApiError(400, f"missing {param}: the recording, base64-encoded", "missing_field", param)
    if not isinstance(value, str):
        raise ApiError(400, f"{param} must be a base64 string, got {type(value).__name__}", "invalid_type", param)
    if value.startswith("data:") and "," in value:  # a data: URL as browsers make them
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{param} is not valid base64", "invalid_base64", param) from None


# -- decoding and encoding ------------------------------------------------------------------------


def context_segments(synth: Synthesizer, clips: Sequence[ContextClip]) -> tuple[list[Segment], list[str]]:
    """The clips as encoded segments (decoded and encoded only on a cache miss), and a warning for
    each clip that was trimmed.  Slow on a miss: run it in a worker thread."""
    segments, warnings = [], []
    for clip in clips:
        segment, warning = synth.cached_context(clip.key, lambda clip=clip: _encode(synth, clip))
        segments.append(segment)
        if warning:
            warnings.append(warning + clip.where)
    return segments, warnings


def _encode(synth: Synthesizer, clip: ContextClip) -> tuple[Segment, str | None]:
    try:
        audio, rate, warning = decode_upload(clip.data, MAX_CONTEXT_SECONDS, clip.param)
    except ApiError as exc:
        raise ApiError(exc.status, f"{exc}{clip.where}", exc.code, exc.param) from None
    audio = fit_context_audio(resample(audio, rate, synth.sample_rate), clip.param)
    return synth.context_segment(clip.text, clip.speaker, audio), warning
