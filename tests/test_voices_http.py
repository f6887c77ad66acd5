"""The voices HTTP API (upload, list, delete, every limit) and the playground's files, on a real server.

Each server runs in-process on a loopback port (:class:`LiveServer`) over its own tiny-checkpoint
synthesizer, with the user's voices in a temporary ``CSM_HOME``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile as sf

from csmcli.server import ServerConfig, SpeechServer
from csmcli.server.voices_api import MAX_UPLOAD_BYTES
from csmcli.voices import VoiceLibrary

API_KEY = "voices-key-1"
TRANSCRIPT = "Hello there, this is my voice."


class LiveServer:
    """A :class:`SpeechServer` on a tiny synthesizer, served from a background event loop."""

    def __init__(self, tiny_dir: Path, home: Path, **config: object) -> None:
        from aiohttp import web

        from csmcli import Synthesizer

        self.synth = Synthesizer.load(str(tiny_dir), device="cpu", dtype="float32", max_batch_size=2)
        self.synth.voices = VoiceLibrary(self.synth.voices.prompts_dir, home=home)
        self.home = home
        self.server = SpeechServer(self.synth, ServerConfig(model_id="csm-tiny", **config))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()  # everything runs on this thread's loop (a browser driver may own the main thread's)
        self.runner = web.AppRunner(self.server.app(), handler_cancellation=True, access_log=None)
        sock = socket.create_server(("127.0.0.1", 0))
        self.server.start()
        asyncio.run_coroutine_threadsafe(self.runner.setup(), self.loop).result(30)
        asyncio.run_coroutine_threadsafe(web.SockSite(self.runner, sock).start(), self.loop).result(30)
        self.base = f"http://127.0.0.1:{sock.getsockname()[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.server.close()


@contextlib.contextmanager
def live_server(tiny_dir: Path, home: Path, **config: object) -> Iterator[LiveServer]:
    """A :class:`LiveServer` for the length of a ``with`` block."""
    server = LiveServer(tiny_dir, home, **config)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Open voices (at most 4 stored), no API key, short generations."""
    from csmcli.options import GenerationOptions

    home = tmp_path_factory.mktemp("voices-home")
    with live_server(tiny_dir, home, max_voices=4, defaults=GenerationOptions(max_audio_ms=400)) as live:
        yield live


@pytest.fixture(scope="module")
def guarded(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """An API key and read-only voices."""
    with live_server(tiny_dir, tmp_path_factory.mktemp("guarded-home"), api_key=API_KEY, read_only_voices=True) as live:
        yield live


@pytest.fixture(autouse=True)
def _clean_voices(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test starts without user voices on ``server``."""
    yield
    if "server" in request.fixturenames:
        live = request.getfixturevalue("server")
        for voice in live.synth.voices.user_voices():
            live.synth.voices.remove(voice.name)


def tone(seconds: float = 1.5, rate: int = 16000, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    return np.stack([mono] * channels, axis=1) if channels > 1 else mono


def encoded(fmt: str, seconds: float = 1.5, rate: int = 16000, channels: int = 1) -> bytes:
    """A tone in ``fmt``: libsndfile for wav/flac/ogg/mp3, PyAV for webm (opus) as browsers record it."""
    audio = tone(seconds, rate, channels)
    if fmt == "webm":
        return webm_opus(audio, rate)
    buf = io.BytesIO()
    kinds = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS"), "mp3": ("MP3", None)}
    sf.write(buf, audio, rate, format=kinds[fmt][0], subtype=kinds[fmt][1])
    return buf.getvalue()


def webm_opus(audio: np.ndarray, rate: int) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="webm") as out:
        stream = out.add_stream("libopus", rate=48000, layout="mono")
        frame = av.AudioFrame.from_ndarray(audio.reshape(1, -1).astype(np.float32), format="flt", layout="mono")
        frame.sample_rate = rate
        resampler = av.AudioResampler(format="s16", layout="mono", rate=48000)
        for piece in [*resampler.resample(frame), *resampler.resample(None)]:
            for packet in stream.encode(piece):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def upload(
    live: LiveServer,
    name: str = "mine",
    audio: bytes | None = None,
    text: str | None = TRANSCRIPT,
    filename: str = "take.wav",
    headers: dict | None = None,
    **extra: str,
) -> requests.Response:
    data = {"name": name, **extra}
    if text is not None:
        data["text"] = text
    files = {"audio": (filename, encoded("wav") if audio is None else audio)}
    return requests.post(live.url("/v1/audio/voices"), data=data, files=files, headers=headers, timeout=60)


def listed(live: LiveServer, headers: dict | None = None) -> dict[str, dict]:
    response = requests.get(live.url("/v1/audio/voices"), headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return {v["id"]: v for v in response.json()["voices"]}


def assert_error(response: requests.Response, status: int, code: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    assert error["message"]
    return error


# -- upload, list, use, delete --------------------------------------------------------------------


def test_an_uploaded_voice_is_stored_like_csm_voices_add_listed_and_spoken_with(server: LiveServer) -> None:
    response = upload(server, "mine", encoded("wav", seconds=2.0, rate=44100, channels=2), speaker="1")
    assert response.status_code == 201, response.text
    assert "Warning" not in response.headers
    voice = response.json()["voice"]
    assert voice == {
        "id": "mine",
        "name": "mine",
        "source": "user",
        "speaker": 1,
        "text": TRANSCRIPT,
        "duration_s": 2.0,
    }
    folder = server.home / "voices" / "mine"
    info = sf.info(str(folder / "audio.wav"))
    assert (info.samplerate, info.channels) == (24000, 1)
    meta = json.loads((folder / "voice.json").read_text())
    assert meta["text"] == TRANSCRIPT and meta["speaker"] == 1 and meta["source"] == "take.wav"
    assert VoiceLibrary(home=server.home).get("mine").text == TRANSCRIPT  # what `csm voices list` sees

    voices = listed(server)
    assert voices["mine"]["duration_s"] == 2.0 and voices["mine"]["speaker"] == 1
    preset = voices["conversational_a"]
    assert preset["source"] == "preset" and preset["text"] and preset["duration_s"] > 0 and preset["speaker"] == 0
    assert voices["conversational_b"]["speaker"] == 1 and voices["alloy"]["voice"] == "conversational_a"
    assert "none" in voices

    spoken = requests.post(
        server.url("/v1/audio/speech"), json={"input": "Using it.", "voice": "mine", "speaker": 1}, timeout=60
    )
    assert spoken.status_code == 200 and len(spoken.content) > 44

    gone = requests.delete(server.url("/v1/audio/voices/mine"), timeout=10)
    assert gone.status_code == 200 and gone.json() == {"deleted": "mine"}
    assert "mine" not in listed(server) and not folder.exists()


@pytest.mark.parametrize("fmt", ["flac", "ogg", "mp3", "webm"])
def test_every_upload_format_is_decoded(server: LiveServer, fmt: str) -> None:
    response = upload(server, f"in-{fmt}", encoded(fmt, seconds=1.5, rate=48000), filename=f"take.{fmt}")
    assert response.status_code == 201, response.text
    assert abs(response.json()["voice"]["duration_s"] - 1.5) < 0.1  # codecs pad a little


def test_long_audio_is_trimmed_to_30_seconds_with_a_warning(server: LiveServer) -> None:
    response = upload(server, "long", encoded("flac", seconds=31.0, rate=8000))
    assert response.status_code == 201, response.text
    assert "first 30 s were kept" in response.headers["Warning"]
    assert "first 30 s" in response.json()["warning"]
    assert response.json()["voice"]["duration_s"] == 30.0


def test_a_name_in_use_and_the_voice_count_limit_get_409(server: LiveServer) -> None:
    assert upload(server, "taken").status_code == 201
    assert_error(upload(server, "taken"), 409, "voice_exists", "name")
    for i in range(3):
        assert upload(server, f"v{i}").status_code == 201
    error = assert_error(upload(server, "one-too-many"), 409, "too_many_voices", "name")
    assert "at most 4 voices" in error["message"]
    assert "one-too-many" not in listed(server)


def test_an_upload_over_the_size_limit_gets_413_naming_audio(server: LiveServer) -> None:
    big = b"RIFF" + b"\0" * (MAX_UPLOAD_BYTES + 1)
    error = assert_error(upload(server, "huge", big), 413, "audio_too_large", "audio")
    assert "10 MB" in error["message"]
    # Without a Content-Length (chunked), the limit holds while reading.
    body = io.BytesIO()
    boundary = "xyzzy"
    body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nhuge\r\n'.encode())
    body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="text"\r\n\r\nHi.\r\n'.encode())
    body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="audio"; filename="a.wav"\r\n\r\n'.encode())
    body.write(big + f"\r\n--{boundary}--\r\n".encode())
    payload = body.getvalue()

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(payload), 1 << 20):
            yield payload[i : i + (1 << 20)]

    chunked = requests.post(
        server.url("/v1/audio/voices"),
        data=chunks(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        timeout=60,
    )
    assert_error(chunked, 413, "audio_too_large", "audio")


def silent_wav(rate: int, frames: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(frames, np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("kwargs", "status", "code", "param"),
    [
        ({"name": ""}, 400, "missing_field", "name"),
        ({"text": None}, 400, "missing_field", "text"),
        ({"text": "   "}, 400, "missing_field", "text"),
        ({"text": "x" * 5001}, 400, "text_too_long", "text"),
        ({"name": "../escape"}, 400, "invalid_voice_name", "name"),
        ({"name": "a/b"}, 400, "invalid_voice_name", "name"),
        ({"name": ".hidden"}, 400, "invalid_voice_name", "name"),
        ({"name": "x" * 65}, 400, "invalid_voice_name", "name"),
        ({"name": "none"}, 400, "invalid_voice_name", "name"),
        ({"name": "alloy"}, 400, "reserved_voice_name", "name"),
        ({"speaker": "2"}, 400, "invalid_speaker", "speaker"),
        ({"mood": "happy"}, 400, "unknown_field", "mood"),
        ({"audio": b"just some text, not audio"}, 415, "unsupported_audio_format", "audio"),
        ({"audio": b"RIFF\x10\0\0\0WAVEjunkjunk"}, 400, "invalid_audio", "audio"),
        ({"audio": b"FORM\0\0\0\x20AIFFCOMM"}, 415, "unsupported_audio_format", "audio"),
        ({"audio": silent_wav(4000, 8000)}, 400, "unsupported_sample_rate", "audio"),
        ({"audio": silent_wav(16000, 0)}, 400, "empty_audio", "audio"),
        ({"audio": b"\x1a\x45\xdf\xa3broken webm"}, 400, "invalid_audio", "audio"),
    ],
    ids=lambda v: str(v)[:40] if not isinstance(v, dict) else next(iter(v)),
)
def test_bad_uploads_get_json_errors_naming_the_field(
    server: LiveServer, kwargs: dict, status: int, code: str, param: str
) -> None:
    assert_error(upload(server, **{"name": "ok-name", **kwargs}), status, code, param)
    assert [v.name for v in server.synth.voices.user_voices()] == []


def test_uploads_must_be_multipart_with_one_audio_file(server: LiveServer) -> None:
    url = server.url("/v1/audio/voices")
    assert_error(requests.post(url, json={"name": "x", "text": "Hi."}, timeout=10), 415, "unsupported_media_type")
    missing = requests.post(url, data={"name": "x", "text": "Hi."}, files={"other": ("a", b"")}, timeout=10)
    assert_error(missing, 400, "unknown_field", "other")
    no_file = requests.post(url, files={"name": (None, "x"), "text": (None, "Hi.")}, timeout=10)
    assert_error(no_file, 400, "missing_field", "audio")
    text_as_file = requests.post(
        url, files={"name": (None, "x"), "text": ("t.txt", b"Hi."), "audio": ("a.wav", encoded("wav"))}, timeout=10
    )
    assert_error(text_as_file, 400, "invalid_type", "text")
    twice = [("name", (None, "x")), ("text", (None, "Hi.")), ("audio", ("a.wav", b"1")), ("audio", ("b.wav", b"2"))]
    assert_error(requests.post(url, files=twice, timeout=10), 400, "duplicate_field", "audio")
    for content_type in ("multipart/form-data; boundary=b", "multipart/form-data"):
        garbled = requests.post(url, data=b"--b\r\nnot a part header\r\n", headers={"Content-Type": content_type})
        assert_error(garbled, 400, "invalid_body")


def test_decoding_runs_in_a_worker_thread_while_the_server_keeps_answering(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import csmcli.server.voices_api as voices_http

    release, entered = threading.Event(), threading.Event()
    decode = voices_http.decode_upload

    def held_decode(data: bytes) -> tuple:
        entered.set()
        assert release.wait(30), "never released"
        return decode(data)

    monkeypatch.setattr(voices_http, "decode_upload", held_decode)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(upload, server, "held")
        assert entered.wait(30)
        # The decoder is stuck, yet the event loop answers: it is not decoding there.
        assert requests.get(server.url("/health"), timeout=5).status_code == 200
        release.set()
        assert pending.result().status_code == 201


def test_presets_and_builtin_names_cannot_be_deleted_and_unknown_ones_are_404(server: LiveServer) -> None:
    for name in ("conversational_a", "none", "alloy"):
        error = assert_error(requests.delete(server.url(f"/v1/audio/voices/{name}"), timeout=10), 403, "preset_voice")
        assert "cannot be deleted" in error["message"]
    assert_error(requests.delete(server.url("/v1/audio/voices/nobody"), timeout=10), 404, "unknown_voice", "name")
    assert "conversational_a" in listed(server)


def test_a_user_voice_shadowing_a_preset_is_deleted_and_the_preset_returns(server: LiveServer) -> None:
    assert upload(server, "conversational_a").status_code == 201
    assert listed(server)["conversational_a"]["source"] == "user"
    assert requests.delete(server.url("/v1/audio/voices/conversational_a"), timeout=10).status_code == 200
    assert listed(server)["conversational_a"]["source"] == "preset"


# -- API key and read-only voices -----------------------------------------------------------------


def test_the_api_key_guards_the_voices_api_but_not_the_page(guarded: LiveServer) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    assert_error(requests.get(guarded.url("/v1/audio/voices"), timeout=10), 401, "missing_api_key")
    assert_error(upload(guarded, headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
    assert_error(requests.delete(guarded.url("/v1/audio/voices/x"), timeout=10), 401, "missing_api_key")
    assert_error(requests.get(guarded.url("/v1/playground"), timeout=10), 401, "missing_api_key")
    assert "conversational_a" in listed(guarded, headers=auth)
    for path in ("/", "/ui/app.js", "/ui/style.css"):
        assert requests.get(guarded.url(path), timeout=10).status_code == 200, path


def test_read_only_voices_refuse_uploads_and_deletes_with_403(guarded: LiveServer) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    error = assert_error(upload(guarded, headers=auth), 403, "read_only_voices")
    assert "--read-only-voices" in error["message"]
    assert_error(
        requests.delete(guarded.url("/v1/audio/voices/conversational_a"), headers=auth, timeout=10),
        403,
        "read_only_voices",
    )
    config = requests.get(guarded.url("/v1/playground"), headers=auth, timeout=10).json()
    assert config["voices"]["read_only"] is True
    assert not (guarded.home / "voices").exists()


def test_serve_has_the_read_only_voices_flag(cli_env: dict[str, str]) -> None:
    out = subprocess.run(
        ["csm", "serve", "--help"], env={**cli_env, "COLUMNS": "200"}, capture_output=True, text=True, timeout=60
    ).stdout
    assert "--read-only-voices" in out and "--read_only_voices" in out


# -- the playground's files -----------------------------------------------------------------------


def test_the_page_and_its_modules_are_served_from_the_package(server: LiveServer) -> None:
    page = requests.get(server.url("/"), timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert '<script type="module" src="/ui/app.js">' in page.text and "http" not in page.text.split("<body")[0]
    app = requests.get(server.url("/ui/app.js"), timeout=10)
    assert app.headers["Content-Type"].startswith("text/javascript")
    for module in ("api.js", "player.js", "recorder.js"):
        assert f'"./{module}"' in app.text
        assert requests.get(server.url(f"/ui/{module}"), timeout=10).status_code == 200
    for bad in ("/ui/__init__.py", "/ui/..%2F__init__.py", "/ui/missing.js", "/ui/.hidden.js"):
        assert_error(requests.get(server.url(bad), timeout=10), 404, "not_found")


def test_the_playground_config_has_the_defaults_formats_and_limits(server: LiveServer) -> None:
    config = requests.get(server.url("/v1/playground"), timeout=10).json()
    assert config["defaults"]["max_audio_ms"] == 400 and config["defaults"]["temperature"] == 0.9
    assert config["formats"] == ["wav", "raw", "flac", "ogg", "mp3", "opus", "aac"]  # the whole format table
    assert config["sample_rate"] == 24000
    assert config["voices"] == {
        "read_only": False,
        "max_voices": 4,
        "max_upload_bytes": MAX_UPLOAD_BYTES,
        "max_seconds": 30.0,
        "formats": ["wav", "flac", "ogg", "mp3", "webm", "mp4"],
    }
