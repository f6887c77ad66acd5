"""Every output format over HTTP: ``/generate`` and ``/v1/audio/speech``, whole, streamed and as SSE.

One in-process server on the tiny checkpoint; each answer is decoded by an independent decoder
(see ``audiocheck``) and its length compared with the PCM of the same seed.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import soundfile as sf
from aiohttp import web
from audiocheck import FIRST_BYTES_AFTER, SLACK, STREAMED_SLACK, check_decodes
from test_server_hardening import serving

from csmcli import formats
from csmcli.options import GenerationOptions
from csmcli.server import ServerConfig, SpeechServer, streaming

SEED = 7
STREAMABLE = [name for name, row in formats.FORMATS.items() if row.streamable]


@pytest.fixture(scope="module")
def url(tiny_dir: Path) -> Iterator[str]:
    from csmcli import Synthesizer

    synth = Synthesizer.load(str(tiny_dir), device="cpu", dtype="float32")
    config = ServerConfig(defaults=GenerationOptions(max_audio_ms=400), model_id="tiny", request_timeout=120)
    with serving(SpeechServer(synth, config)) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def samples(url: str) -> int:
    """How many samples the seed gives: the whole raw answer's length."""
    response = requests.post(
        f"{url}/generate", json={"text": "Hello there.", "seed": SEED, "format": "pcm"}, timeout=120
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "audio/pcm;rate=24000;channels=1;encoding=s16le"
    assert len(response.content) == 2 * round(float(response.headers["X-Audio-Seconds"]) * 24000) > 0
    return len(response.content) // 2


def post(url: str, path: str, body: dict) -> requests.Response:
    field = "text" if path == "/generate" else "input"
    response = requests.post(f"{url}{path}", json={field: "Hello there.", "seed": SEED, **body}, timeout=120)
    assert response.status_code == 200, response.text
    return response


def check_headers(response: requests.Response, fmt: str) -> None:
    assert response.headers["Content-Type"] == formats.mime(fmt, 24000)
    assert response.headers["Content-Disposition"] == f'attachment; filename="speech{formats.extension(fmt)}"'


@pytest.mark.parametrize("fmt", list(formats.FORMATS))
def test_every_format_whole_and_streamed_decodes_to_the_seeds_length(url: str, samples: int, fmt: str) -> None:
    whole = post(url, "/generate", {"format": fmt})
    check_headers(whole, fmt)
    assert "X-Frames" in whole.headers
    length = check_decodes(whole.content, fmt, samples, SLACK[fmt])
    speech = post(url, "/v1/audio/speech", {"response_format": fmt})  # streamed, except flac: whole
    check_headers(speech, fmt)
    assert ("X-Frames" in speech.headers) == (fmt not in STREAMABLE)
    streamed = check_decodes(speech.content, fmt, samples, STREAMED_SLACK[fmt])
    if fmt != "mp3":  # only mp3 differs: a whole file carries the LAME header that trims the encoder's priming
        assert streamed == length
    if fmt in STREAMABLE:
        generated = post(url, "/generate", {"format": fmt, "streaming": True})
        check_headers(generated, fmt)
        assert check_decodes(generated.content, fmt, samples, STREAMED_SLACK[fmt]) == streamed


@pytest.mark.parametrize("fmt", STREAMABLE)
def test_sse_deltas_carry_the_formats_bytes(url: str, samples: int, fmt: str) -> None:
    response = post(url, "/v1/audio/speech", {"response_format": fmt, "stream_format": "sse"})
    assert response.headers["Content-Type"] == "text/event-stream"
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == {"type": "speech.audio.done"}
    data = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert all(e["type"] == "speech.audio.delta" and e["audio"] for e in events[:-1])
    check_decodes(data, fmt, samples, STREAMED_SLACK[fmt])


def test_default_speech_answer_is_mp3(url: str, samples: int) -> None:
    response = post(url, "/v1/audio/speech", {})
    assert response.headers["Content-Type"] == "audio/mpeg"
    assert sf.info(io.BytesIO(response.content)).format == "MP3"
    check_decodes(response.content, "mp3", samples, STREAMED_SLACK["mp3"])
    assert post(url, "/generate", {}).headers["Content-Type"] == "audio/wav"  # vox-serve's default stays


def test_bitrate_sets_the_size(url: str) -> None:
    low, high = (len(post(url, "/v1/audio/speech", {"bitrate": b}).content) for b in ("32k", 160000))
    assert high > 3 * low
    aac = post(url, "/generate", {"format": "aac", "bitrate": "32k"}).content
    assert len(aac) < len(post(url, "/generate", {"format": "aac"}).content) / 2


def test_first_bytes_leave_within_a_frame_of_wavs(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Frames the request had decoded when its first body bytes were written, per format."""
    first: dict[str, int] = {}
    write = web.StreamResponse.write

    async def recording(self: web.StreamResponse, data: bytes) -> None:
        run = streaming.CURRENT.get().run
        first.setdefault(run.req.fmt, run.frames)
        await write(self, data)

    monkeypatch.setattr(web.StreamResponse, "write", recording)
    for fmt in ("wav", "mp3", "opus", "aac"):
        post(url, "/generate", {"format": fmt, "streaming": True})
    assert first["wav"] == 1
    for fmt in ("mp3", "opus", "aac"):
        assert first[fmt] <= FIRST_BYTES_AFTER.get(fmt, 1) <= first["wav"] + 1, first


@pytest.mark.parametrize(
    ("path", "body", "param", "words"),
    [
        ("/generate", {"format": "mp4"}, "format", "use one of wav, raw, flac, ogg, mp3, opus, aac"),
        ("/v1/audio/speech", {"response_format": "wma"}, "response_format", "use one of wav, raw, flac, ogg, mp3"),
        ("/v1/audio/speech", {"bitrate": "97k"}, "bitrate", "bad mp3 bitrate '97k': use one of 8k, 16k"),
        ("/generate", {"format": "opus", "bitrate": "1k"}, "bitrate", "use 6k to 256k"),
        ("/generate", {"bitrate": "96k"}, "bitrate", "bitrate does not apply to wav: only mp3, opus, aac"),
        ("/generate", {"format": "mp3", "bitrate": [1]}, "bitrate", "bitrate must be a number"),
        ("/generate", {"format": "flac", "streaming": True}, "format", "flac cannot be streamed"),
        ("/v1/audio/speech", {"response_format": "flac", "stream_format": "sse"}, "response_format", "flac cannot"),
    ],
)
def test_bad_formats_and_bitrates_are_400s_listing_the_choices(
    url: str, path: str, body: dict, param: str, words: str
) -> None:
    field = "text" if path == "/generate" else "input"
    response = requests.post(f"{url}{path}", json={field: "Hi.", **body}, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
