"""Per-request context on ``/generate`` and ``/v1/audio/speech``: JSON and multipart clips, the encode
cache, every limit, and decoding off the event loop; on a live in-process tiny-checkpoint server."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile as sf
from test_voices_http import LiveServer, assert_error, encoded, live_server, silent_wav

from csmcli.audio import to_int16
from csmcli.options import GenerationOptions

CLIP_TEXT = "This is how I sound."
SEED, MS = 7, 320


@pytest.fixture(scope="module")
def server(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Short generations; context bodies up to 1 MiB so the size limits are cheap to reach."""
    home = tmp_path_factory.mktemp("context-home")
    config = {"defaults": GenerationOptions(max_audio_ms=MS), "max_context_bytes": 1024 * 1024}
    with live_server(tiny_dir, home, **config) as live:
        yield live


@pytest.fixture(scope="module")
def clip() -> bytes:
    """A 1 s, 16 kHz stereo wav: decoding downmixes and resamples it."""
    return encoded("wav", seconds=1.0, rate=16000, channels=2)


@pytest.fixture(scope="module")
def reference(tiny_dir: Path, clip: bytes, tmp_path_factory: pytest.TempPathFactory) -> dict[int, np.ndarray]:
    """What the Python API speaks with the same clip as ``--context-audio`` (by speaker), as int16."""
    from csmcli import Synthesizer
    from csmcli.voices import context_segments

    path = tmp_path_factory.mktemp("clip") / "clip.wav"
    path.write_bytes(clip)
    synth = Synthesizer.load(str(tiny_dir), device="cpu", dtype="float32", max_batch_size=2)
    options = GenerationOptions(seed=SEED, max_audio_ms=MS)
    out = {}
    for speaker in (0, 1):
        context = context_segments([path], [CLIP_TEXT], speaker)
        out[speaker] = to_int16(synth.generate("Say it my way.", speaker, context=context, options=options).samples)
    return out


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def post(
    live: LiveServer, path: str, body: dict, clips: list[tuple[bytes, str]] | None = None, json_body: bool = True
) -> requests.Response:
    """``body`` plus ``clips`` as a JSON ``context`` list, or as multipart ``context_*`` fields."""
    if clips is None:
        return requests.post(live.url(path), json=body, timeout=60)
    if json_body:
        context = [{"text": text, "audio": b64(data)} for data, text in clips]
        return requests.post(live.url(path), json={**body, "context": context}, timeout=60)
    parts = [(k, (None, str(v))) for k, v in body.items()]
    parts += [("context_audio", (f"c{i}.wav", data)) for i, (data, _) in enumerate(clips)]
    parts += [("context_text", (None, text)) for _, text in clips]
    return requests.post(live.url(path), files=parts, timeout=60)


def speak(live: LiveServer, endpoint: str, speaker: int, clips: list[tuple[bytes, str]], json_body: bool):
    if endpoint == "/generate":
        body = {"text": "Say it my way.", "speaker": speaker, "format": "pcm", "seed": SEED}
    else:
        # flac: answered whole, so decoded in the same pieces as the API's generate()
        body = {
            "input": "Say it my way.",
            "speaker": speaker,
            "response_format": "flac",
            "seed": SEED,
            "voice": "alloy",
        }
    return post(live, endpoint, body, clips, json_body)


def stats(live: LiveServer) -> dict:
    return requests.get(live.url("/v1/stats"), timeout=10).json()["context"]


@pytest.mark.parametrize("endpoint", ["/generate", "/v1/audio/speech"])
@pytest.mark.parametrize("json_body", [True, False], ids=["json", "multipart"])
def test_context_on_both_endpoints_speaks_like_the_api_with_the_same_context(
    server: LiveServer, clip: bytes, reference: dict[int, np.ndarray], endpoint: str, json_body: bool
) -> None:
    for speaker in (0, 1):
        response = speak(server, endpoint, speaker, [(clip, CLIP_TEXT)], json_body)
        assert response.status_code == 200, response.text
        assert "Warning" not in response.headers
        if endpoint == "/generate":
            got = np.frombuffer(response.content, dtype="<i2")
        else:
            got = sf.read(io.BytesIO(response.content), dtype="int16")[0]
        assert len(got) > 0 and np.array_equal(got, reference[speaker])


def test_the_same_clip_again_is_not_encoded_again_and_hits_the_prefix_cache(server: LiveServer) -> None:
    fresh = encoded("flac", seconds=0.8, rate=22050)
    before = stats(server)
    first = speak(server, "/generate", 0, [(fresh, "Once more.")], json_body=True)
    assert first.status_code == 200, first.text
    middle = stats(server)
    assert middle["encodes"] == before["encodes"] + 1
    prefixes = dict(server.synth.engine.prefix_store)
    # The same bytes, text and speaker, sent the other way, on the other endpoint: no decode, no encode.
    again = speak(server, "/v1/audio/speech", 0, [(fresh, "Once more.")], json_body=False)
    assert again.status_code == 200, again.text
    after = stats(server)
    assert after["encodes"] == middle["encodes"] and after["cache_hits"] > middle["cache_hits"]
    assert set(server.synth.engine.prefix_store) == set(prefixes)  # the prompt's prefix rows were the same
    # Another transcript is another clip.
    other = speak(server, "/generate", 0, [(fresh, "Something else.")], json_body=True)
    assert other.status_code == 200 and stats(server)["encodes"] == after["encodes"] + 1


def test_several_clips_with_their_own_speakers_and_context_replaces_the_voice(server: LiveServer, clip: bytes) -> None:
    second = encoded("ogg", seconds=1.0, rate=48000)
    context = [{"text": CLIP_TEXT, "audio": b64(clip)}, {"text": "And I answer.", "audio": b64(second), "speaker": 1}]
    body = {"text": "Back to me.", "voice": "no-such-voice", "context": context, "streaming": True}
    response = requests.post(server.url("/generate"), json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("audio/wav") and len(response.content) > 44
    parts = [
        ("text", (None, "Back to me.")),
        ("context_audio", ("a.wav", clip)),
        ("context_audio", ("b.ogg", second)),
        ("context_text", (None, CLIP_TEXT)),
        ("context_text", (None, "And I answer.")),
        ("context_speaker", (None, "0")),
        ("context_speaker", (None, "1")),
    ]
    assert requests.post(server.url("/generate"), files=parts, timeout=60).status_code == 200


def test_a_clip_over_30_seconds_is_trimmed_with_a_warning(server: LiveServer) -> None:
    long = encoded("flac", seconds=31.0, rate=8000)
    response = post(server, "/v1/audio/speech", {"input": "Hi.", "seed": 1}, [(long, "A long one.")])
    assert response.status_code == 200, response.text
    assert "context[0].audio is longer than 30 s: its first 30 s were kept" in response.headers["Warning"]


def many(n: int, clip: bytes) -> list[dict]:
    return [{"text": "Hi.", "audio": b64(clip)}] * n


BAD_JSON = [
    ("not-a-list", lambda c: {"context": {"text": "Hi."}}, 400, "invalid_type", "context"),
    ("empty", lambda c: {"context": []}, 400, "empty_context", "context"),
    ("nine-clips", lambda c: {"context": many(9, c)}, 400, "too_many_context_clips", "context"),
    ("not-an-object", lambda c: {"context": ["Hi."]}, 400, "invalid_type", "context[0]"),
    ("unknown-key", lambda c: {"context": [{"text": "Hi.", "audio": b64(c), "mood": 1}]}, 400, "unknown_field", None),
    ("no-text", lambda c: {"context": [{"audio": b64(c)}]}, 400, "missing_field", "context[0].text"),
    ("blank-text", lambda c: {"context": [{"text": " ", "audio": b64(c)}]}, 400, "missing_field", "context[0].text"),
    ("long-text", lambda c: {"context": [{"text": "x" * 5001, "audio": b64(c)}]}, 400, "text_too_long", None),
    ("no-audio", lambda c: {"context": [{"text": "Hi."}]}, 400, "missing_field", "context[0].audio"),
    ("audio-number", lambda c: {"context": [{"text": "Hi.", "audio": 5}]}, 400, "invalid_type", "context[0].audio"),
    ("bad-base64", lambda c: {"context": [{"text": "Hi.", "audio": "%%%"}]}, 400, "invalid_base64", "context[0].audio"),
    (
        "not-audio",
        lambda c: {"context": [{"text": "Hi.", "audio": b64(b"plain words")}]},
        415,
        "unsupported_audio_format",
        "context[0].audio",
    ),
    (
        "low-rate",
        lambda c: {"context": [{"text": "Hi.", "audio": b64(silent_wav(4000, 8000))}]},
        400,
        "unsupported_sample_rate",
        "context[0].audio",
    ),
    (
        "no-samples",
        lambda c: {"context": [{"text": "Hi.", "audio": b64(silent_wav(16000, 0))}]},
        400,
        "empty_audio",
        "context[0].audio",
    ),
    (
        "bad-speaker",
        lambda c: {"context": [{"text": "Hi.", "audio": b64(c), "speaker": 2}]},
        400,
        "invalid_speaker",
        "context[0].speaker",
    ),
    (
        "both-ways",
        lambda c: {"context": many(1, c), "context_text": "Hi."},
        400,
        "conflicting_fields",
        "context",
    ),
    ("audio-in-json", lambda c: {"context_audio": b64(c), "context_text": "Hi."}, 400, "invalid_type", None),
    ("bad-json-string", lambda c: {"context": ""}, 400, "invalid_json", "context"),
]


@pytest.mark.parametrize("endpoint", ["/generate", "/v1/audio/speech"])
@pytest.mark.parametrize(("name", "make", "status", "code", "param"), BAD_JSON, ids=[b[0] for b in BAD_JSON])
def test_bad_json_context_gets_a_json_error_naming_the_field(
    server: LiveServer, clip: bytes, endpoint: str, name: str, make, status: int, code: str, param: str | None
) -> None:
    body = {"text": "Hi."} if endpoint == "/generate" else {"input": "Hi."}
    response = requests.post(server.url(endpoint), json={**body, **make(clip)}, timeout=60)
    error = assert_error(response, status, code, param)
    assert error["param"] and error["param"].startswith("context")


def form(*parts: tuple[str, tuple]) -> list[tuple[str, tuple]]:
    return [("text", (None, "Hi.")), *parts]


BAD_FORMS = [
    ("no-text", lambda c: form(("context_audio", ("a.wav", c))), 400, "missing_field", "context_text"),
    (
        "two-audio-one-text",
        lambda c: form(("context_audio", ("a.wav", c)), ("context_audio", ("b.wav", c)), ("context_text", (None, "A"))),
        400,
        "context_mismatch",
        "context_text",
    ),
    ("text-only", lambda c: form(("context_text", (None, "Hi."))), 400, "missing_field", "context_audio"),
    (
        "speakers-mismatch",
        lambda c: form(
            ("context_audio", ("a.wav", c)),
            ("context_text", (None, "A")),
            ("context_speaker", (None, "0")),
            ("context_speaker", (None, "1")),
        ),
        400,
        "context_mismatch",
        "context_speaker",
    ),
    (
        "bad-speaker",
        lambda c: form(
            ("context_audio", ("a.wav", c)), ("context_text", (None, "A")), ("context_speaker", (None, "7"))
        ),
        400,
        "invalid_speaker",
        "context_speaker",
    ),
    (
        "broken-wav",
        lambda c: form(("context_audio", ("a.wav", b"RIFF\x10\0\0\0WAVEjunkjunk")), ("context_text", (None, "A"))),
        400,
        "invalid_audio",
        "context_audio",
    ),
    (
        "text-as-file",
        lambda c: form(("context_audio", ("a.wav", c)), ("context_text", ("t.txt", b"A"))),
        400,
        "invalid_type",
        "context_text",
    ),
    (
        "nine-files",
        lambda c: form(*[("context_audio", ("a.wav", c))] * 9, *[("context_text", (None, "A"))] * 9),
        400,
        "too_many_context_clips",
        "context_audio",
    ),
    ("unknown-field", lambda c: form(("context_mood", (None, "x"))), 400, "unknown_field", "context_mood"),
    ("text-twice", lambda c: [("text", (None, "A")), ("text", (None, "B"))], 400, "duplicate_field", "text"),
    (
        "too-big",
        lambda c: form(("context_audio", ("a.wav", b"RIFF" + b"\0" * (1024 * 1024)))),
        413,
        "context_audio_too_large",
        "context_audio",
    ),
]


@pytest.mark.parametrize(("name", "make", "status", "code", "param"), BAD_FORMS, ids=[b[0] for b in BAD_FORMS])
def test_bad_multipart_context_gets_a_json_error_naming_the_field(
    server: LiveServer, clip: bytes, name: str, make, status: int, code: str, param: str
) -> None:
    response = requests.post(server.url("/generate"), files=make(clip), timeout=60)
    assert_error(response, status, code, param)


def test_the_second_of_several_files_is_named_in_its_error(server: LiveServer, clip: bytes) -> None:
    parts = form(
        ("context_audio", ("a.wav", clip)),
        ("context_audio", ("b.wav", b"not audio at all")),
        ("context_text", (None, "A")),
        ("context_text", (None, "B")),
    )
    error = assert_error(
        requests.post(server.url("/generate"), files=parts, timeout=60), 415, "unsupported_audio_format"
    )
    assert error["param"] == "context_audio" and "(file 2 of 2)" in error["message"]


def test_body_limits_are_larger_only_for_bodies_with_context(server: LiveServer, clip: bytes) -> None:
    # A JSON body with base64 clips may pass the 256 KiB limit of plain requests ...
    big_clip = encoded("wav", seconds=9.0, rate=16000)  # 288 KB, 384 KB as base64
    response = post(server, "/generate", {"text": "Hi.", "seed": 1}, [(big_clip, "Hi.")])
    assert response.status_code == 200, response.text
    # ... up to max_context_bytes; a plain body keeps its 256 KiB.
    huge = {"text": "Hi.", "context": [{"text": "Hi.", "audio": "A" * (1024 * 1024 + 8)}]}
    assert_error(requests.post(server.url("/generate"), json=huge, timeout=60), 413, "body_too_large")
    padded = {"text": "Hi.", "voice": "x" * 300_000}
    assert_error(requests.post(server.url("/generate"), json=padded, timeout=60), 413, "body_too_large")


def test_decoding_a_clip_does_not_stall_other_streams(
    server: LiveServer, clip: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    import csmcli.server.context as context_module

    release, entered = threading.Event(), threading.Event()
    decode = context_module.decode_upload

    def held_decode(*args: object) -> tuple:
        entered.set()
        assert release.wait(30), "never released"
        return decode(*args)

    monkeypatch.setattr(context_module, "decode_upload", held_decode)
    held_clip = encoded("wav", seconds=0.5, rate=12000)  # not yet in the cache
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(speak, server, "/generate", 0, [(held_clip, "Held.")], True)
        assert entered.wait(30)
        # The clip's decode is stuck in a worker thread, yet another request streams to its end.
        other = requests.post(server.url("/generate"), json={"text": "Meanwhile.", "streaming": True}, timeout=30)
        assert other.status_code == 200 and len(other.content) > 44
        assert not pending.done()
        release.set()
        assert pending.result().status_code == 200
