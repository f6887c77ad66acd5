"""End-to-end tests of ``csm serve``: a real server process on loopback, real HTTP clients (requests, curl).

Two servers per module, started together: ``server`` (batch 4, no API key) for the seed page's
examples, the OpenAI endpoint, bad input, disconnects and concurrency; ``guarded`` (an API key, one
slot, no queue, a short request time limit) for auth, 503, timeouts and SIGTERM (its last test).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile as sf
from scipy.io import wavfile

from csmcli.options import OPTION_FIELDS
from csmcli.server import GENERATE_FIELDS, GENERATE_OWN_FIELDS
from csmcli.server.requests import CONTEXT_FIELDS

#: 800 ms = 10 frames = 19200 samples: every request on ``server`` runs to this budget (random model).
BUDGET_MS, BUDGET_SAMPLES = 800, 19200
API_KEY = "test-key-123"

CSM_SERVE = ["csm", "serve"]


class ServerProcess:
    """A ``csm serve`` child process, its log file and its URL."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [*CSM_SERVE, *args, "--port", "0"], env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.port = 0

    def wait_ready(self, timeout: float = 240) -> None:
        """Wait for the 'listening on' line; fail with the log if the process dies first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", self.log())
            if found:
                self.port = int(found.group(1))
                return
            if self.proc.poll() is not None:
                pytest.fail(f"csm serve exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.1)
        pytest.fail(f"csm serve did not start in {timeout} s:\n{self.log()}")

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@contextlib.contextmanager
def all_ready(processes: list[ServerProcess]) -> Iterator[None]:
    """Wait for every server to listen; stop them all (killing if need be) on the way out."""
    try:
        for process in processes:
            process.wait_ready()
        yield
    finally:
        for process in processes:
            process.stop()


@pytest.fixture(scope="module")
def servers(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Both servers, started in parallel and stopped (killed if need be) at the end of the module."""
    root = tmp_path_factory.mktemp("serve")
    env = {k: v for k, v in os.environ.items() if k not in ("CSM_MODEL", "CSM_API_KEY")}
    env.update(
        {"HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf"), "CSM_HOME": str(root / "home"), "PYTHONUNBUFFERED": "1"}
    )
    common = ["--model", str(tiny_dir), "--device", "cpu", "--dtype", "float32", "-q", "--max-audio-ms", str(BUDGET_MS)]
    started = [
        ServerProcess(
            [*common, "--max-batch-size", "4", "--max-queue", "32", "--request-timeout", "120"],
            env,
            root / "server.log",
        ),
        ServerProcess(
            [
                *common,
                "--max-batch-size",
                "1",
                "--max_queue",
                "0",
                "--request_timeout",
                "6",
                "--grace-period",
                "30",
                "--top_p",
                "0.9",
                "--repetition_penalty",
                "1.1",
                "--temperature",
                "0.7",
            ],
            {**env, "CSM_API_KEY": API_KEY},
            root / "guarded.log",
        ),
    ]
    with all_ready(started):
        yield started


@pytest.fixture(scope="module")
def server(servers: list[ServerProcess]) -> ServerProcess:
    return servers[0]


@pytest.fixture(scope="module")
def guarded(servers: list[ServerProcess]) -> ServerProcess:
    return servers[1]


def read_wav(data: bytes) -> np.ndarray:
    """int16 samples of a WAV file, read by soundfile and checked against scipy."""
    samples, rate = sf.read(io.BytesIO(data), dtype="int16")
    assert rate == 24000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", wavfile.WavFileWarning)  # a streamed WAV's open-ended size
        scipy_rate, scipy_samples = wavfile.read(io.BytesIO(data))
    assert scipy_rate == 24000
    np.testing.assert_array_equal(samples, scipy_samples)
    return samples


def assert_error(response: requests.Response, status: int, code: str | None = None) -> dict:
    """A JSON error body of the documented shape, with no traceback in it."""
    assert response.status_code == status, response.text[:500]
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert error["message"] and "Traceback" not in response.text
    if code is not None:
        assert error["code"] == code, error
    return error


def stats(server: ServerProcess, **headers: str) -> dict:
    return requests.get(server.url("/v1/stats"), headers=headers, timeout=10).json()


# -- the seed page's examples, verbatim (only the port differs) --------------------------------------


def test_seed_quickstart_and_basic_usage(
    server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    url = server.url("/generate", host="localhost")

    response = requests.post(url, json={"text": "Hello, this is CSM speaking!", "speaker": 0})

    with open("output.wav", "wb") as f:
        f.write(response.content)

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "audio/wav"
    samples = read_wav(Path("output.wav").read_bytes())
    assert len(samples) == BUDGET_SAMPLES and np.abs(samples).max() > 0

    response = requests.post(url, json={"text": "How are you doing today?", "speaker": 0})
    assert len(read_wav(response.content)) == BUDGET_SAMPLES


def test_seed_conversational_exchange(server: ServerProcess) -> None:
    url = server.url("/generate", host="localhost")

    # Speaker A
    response_a = requests.post(url, json={"text": "Hello! How can I help you?", "speaker": 0})

    # Speaker B
    response_b = requests.post(url, json={"text": "I'd like to know more about your services.", "speaker": 1})

    a, b = read_wav(response_a.content), read_wav(response_b.content)
    assert len(a) == len(b) == BUDGET_SAMPLES
    assert not np.array_equal(a, b)


def test_seed_streaming_saves_a_file_that_reads_whole(
    server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    url = server.url("/generate", host="localhost")

    with requests.post(  # noqa: SIM117 (verbatim from the seed page)
        url, json={"text": "Hello world!", "speaker": 0, "streaming": True}, stream=True
    ) as response:
        with open("output.wav", "wb") as f:
            for chunk in response.iter_content(chunk_size=8192):
                f.write(chunk)

    assert response.headers["Transfer-Encoding"] == "chunked"
    data = Path("output.wav").read_bytes()
    assert data[4:8] == data[40:44] == b"\xff\xff\xff\xff"  # RIFF and data sizes: unknown
    samples, _ = sf.read("output.wav", dtype="int16")
    assert len(samples) == BUDGET_SAMPLES
    with pytest.warns(wavfile.WavFileWarning):  # scipy notes the open-ended size, then reads every sample
        _, scipy_samples = wavfile.read("output.wav")
    np.testing.assert_array_equal(samples, scipy_samples)


def test_seed_curl_example(server: ServerProcess, tmp_path: Path) -> None:
    command = f"""curl -X POST "http://localhost:{server.port}/generate" \\
  -H "Content-Type: application/json" \\
  -d '{{"text": "Hello from CSM!", "speaker": 0}}' \\
  -o output.wav"""
    subprocess.run(command, shell=True, cwd=tmp_path, check=True, capture_output=True, timeout=60)
    assert len(read_wav((tmp_path / "output.wav").read_bytes())) == BUDGET_SAMPLES


# -- /generate beyond the seed page ---------------------------------------------------------------


def test_every_format_and_mode_gives_the_same_audio_for_a_seed(server: ServerProcess) -> None:
    """Same seed, same codes; streams decode in smaller chunks, which may move a sample by 1 LSB."""
    body = {"text": "Same seed, same audio.", "speaker": 1, "seed": 7}
    whole = requests.post(server.url("/generate"), json=body, timeout=60)
    assert whole.headers["X-Seed"] == "7" and whole.headers["X-Frames"] == "10"
    reference = {False: read_wav(whole.content)}
    for extra in ({"streaming": True}, {"format": "pcm"}, {"streaming": "true", "format": "pcm"}, {"format": "flac"}):
        response = requests.post(server.url("/generate"), json={**body, **extra}, timeout=60)
        assert response.status_code == 200, response.text
        if extra.get("format") == "pcm":
            assert response.headers["Content-Type"] == "audio/pcm;rate=24000;channels=1;encoding=s16le"
            samples = np.frombuffer(response.content, dtype="<i2")
        else:
            samples, _ = sf.read(io.BytesIO(response.content), dtype="int16")
        streamed = "streaming" in extra
        np.testing.assert_array_equal(samples, reference.setdefault(streamed, samples))
    assert np.abs(reference[True].astype(int) - reference[False]).max() <= 1


def test_form_bodies_and_json_without_content_type(server: ServerProcess) -> None:
    fields = {
        "text": "Forms work too.",
        "speaker": "1",
        "streaming": "false",
        "temperature": "0.7",
        "top_k": "40",
        "seed": "11",
        "max_audio_ms": "400",
    }
    urlencoded = requests.post(server.url("/generate"), data=fields, timeout=60)
    multipart = requests.post(server.url("/generate"), files={k: (None, v) for k, v in fields.items()}, timeout=60)
    curl = subprocess.run(
        [
            "curl",
            "-s",
            "-f",
            "-X",
            "POST",
            server.url("/generate"),
            "-d",
            json.dumps({**fields, "speaker": 1, "seed": 11}),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    samples = read_wav(urlencoded.content)
    assert len(samples) == 9600  # 400 ms
    np.testing.assert_array_equal(read_wav(multipart.content), samples)
    np.testing.assert_array_equal(read_wav(curl), samples)


def test_long_text_stays_within_the_request_budget_streamed_or_whole(server: ServerProcess) -> None:
    """max_audio_ms bounds the whole request, however many pieces the text has (a random model
    never ends a piece, so its first piece takes the whole budget; test_api covers the pieces)."""
    from csmcli.textsplit import split_text

    text = " ".join(
        f"This is sentence number {i}, which is long enough to need its own little piece of the "
        "text when everything is put together."
        for i in range(4)
    )
    pieces = len(split_text(text))
    assert pieces > 1
    body = {"text": text, "max_audio_ms": 160, "seed": 9}
    whole = requests.post(server.url("/generate"), json=body, timeout=120)
    assert whole.headers["X-Frames"] == "2"
    samples = read_wav(whole.content)
    assert len(samples) == 2 * 1920
    streamed = requests.post(server.url("/generate"), json={**body, "streaming": True}, timeout=120)
    assert np.abs(read_wav(streamed.content).astype(int) - samples).max() <= 1


def test_the_server_takes_exactly_the_option_fields_plus_its_own(server: ServerProcess) -> None:
    assert set(GENERATE_FIELDS) == set(OPTION_FIELDS) | set(GENERATE_OWN_FIELDS) | set(CONTEXT_FIELDS)
    error = assert_error(
        requests.post(server.url("/generate"), json={"text": "x", "colour": 1, "pitch": 2}), 400, "unknown_field"
    )
    assert "colour" in error["message"] and "pitch" in error["message"]
    accepted = error["message"].split("accepted fields: ")[1].split(", ")
    own = {"text", "speaker", "streaming", "voice", "format", "bitrate"}
    assert set(accepted) == set(OPTION_FIELDS) | own | set(CONTEXT_FIELDS)
    every = {"temperature": 0.5, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.2, "max_audio_ms": 240, "seed": 3}
    assert set(every) == set(OPTION_FIELDS)
    response = requests.post(
        server.url("/generate"), json={"text": "All options.", "voice": "none", **every}, timeout=60
    )
    assert response.status_code == 200 and response.headers["X-Seed"] == "3"
    assert len(read_wav(response.content)) == 3 * 1920


HUGE = "word " * 1100

BAD_REQUESTS = [
    (
        "malformed json",
        {"data": '{"text": "hi", ', "headers": {"Content-Type": "application/json"}},
        400,
        "invalid_json",
    ),
    ("json array", {"json": ["hello"]}, 400, "invalid_json"),
    ("missing text", {"json": {"speaker": 0}}, 400, "missing_field"),
    ("empty text", {"json": {"text": "   "}}, 400, "empty_text"),
    ("huge text", {"json": {"text": HUGE}}, 400, "text_too_long"),
    ("speaker 5", {"json": {"text": "hi", "speaker": 5}}, 400, "invalid_speaker"),
    ("speaker word", {"data": {"text": "hi", "speaker": "one"}}, 400, "invalid_speaker"),
    ("speaker bool", {"json": {"text": "hi", "speaker": True}}, 400, "invalid_speaker"),
    ("text number", {"json": {"text": 42}}, 400, "invalid_type"),
    ("streaming word", {"json": {"text": "hi", "streaming": "perhaps"}}, 400, "invalid_type"),
    ("temperature word", {"json": {"text": "hi", "temperature": "hot"}}, 400, "invalid_option"),
    ("top_k fraction", {"json": {"text": "hi", "top_k": 1.5}}, 400, "invalid_option"),
    ("top_p out of range", {"json": {"text": "hi", "top_p": 0, "streaming": True}}, 400, "invalid_option"),
    ("unknown fields", {"json": {"text": "hi", "foo": 1}}, 400, "unknown_field"),
    ("unknown voice", {"json": {"text": "hi", "voice": "nobody", "streaming": True}}, 400, "unknown_voice"),
    ("mp4", {"json": {"text": "hi", "format": "mp4"}}, 400, "unsupported_format"),
    ("streamed flac", {"json": {"text": "hi", "format": "flac", "streaming": True}}, 400, "unsupported_format"),
    ("duplicate form field", {"data": [("text", "a"), ("text", "b")]}, 400, "duplicate_field"),
    ("file upload", {"files": {"text": ("t.txt", b"hi")}}, 400, "invalid_type"),
    ("oversized body", {"json": {"text": "x" * 2_000_000}}, 413, "body_too_large"),
    ("plain text body", {"data": "hello", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type"),
]


@pytest.mark.parametrize(("kwargs", "status", "code"), [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_json_errors(server: ServerProcess, kwargs: dict, status: int, code: str) -> None:
    assert_error(requests.post(server.url("/generate"), timeout=30, **kwargs), status, code)


def test_wrong_routes_and_methods(server: ServerProcess) -> None:
    assert_error(requests.get(server.url("/generate")), 405, "method_not_allowed")
    assert_error(requests.post(server.url("/nowhere"), json={}), 404, "not_found")


def test_the_server_still_serves_after_bad_requests(server: ServerProcess) -> None:
    response = requests.post(server.url("/generate"), json={"text": "Still here.", "max_audio_ms": 160}, timeout=60)
    assert len(read_wav(response.content)) == 2 * 1920
    health = requests.get(server.url("/health"), timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert stats(server)["requests"]["client_errors"] >= len(BAD_REQUESTS)


# -- OpenAI-compatible endpoints ------------------------------------------------------------------


def test_openai_speech_formats_and_sse(server: ServerProcess) -> None:
    body = {"model": "tts-1", "input": "The quick brown fox.", "voice": "echo", "seed": 5}
    url = server.url("/v1/audio/speech")
    wav = requests.post(url, json={**body, "response_format": "wav"}, timeout=60)
    reference = read_wav(wav.content)
    assert len(reference) == BUDGET_SAMPLES
    pcm = requests.post(url, json={**body, "response_format": "pcm"}, timeout=60)
    assert pcm.headers["Content-Type"].startswith("audio/pcm;rate=24000")
    np.testing.assert_array_equal(np.frombuffer(pcm.content, "<i2"), reference)
    flac = requests.post(url, json={**body, "response_format": "flac", "speed": 1.0}, timeout=60)
    assert flac.headers["Content-Type"] == "audio/flac" and flac.content[:4] == b"fLaC"
    whole = sf.read(io.BytesIO(flac.content), dtype="int16")[0]  # not streamed: decoded in bigger chunks
    assert np.abs(whole.astype(int) - reference).max() <= 1

    sse = requests.post(url, json={**body, "response_format": "pcm", "stream_format": "sse"}, timeout=60)
    assert sse.headers["Content-Type"].startswith("text/event-stream")
    events = [json.loads(line[len("data: ") :]) for line in sse.text.splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert events[-1]["type"] == "speech.audio.done"
    audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    np.testing.assert_array_equal(np.frombuffer(audio, "<i2"), reference)

    other_voice = requests.post(url, json={**body, "voice": "alloy", "response_format": "wav"}, timeout=60)
    assert not np.array_equal(read_wav(other_voice.content), reference)  # alloy is speaker 0, echo speaker 1


@pytest.mark.parametrize(
    ("change", "code", "words"),
    [
        ({"speed": 1.5}, "unsupported_speed", "1.0"),
        ({"response_format": "mp4"}, "unsupported_response_format", "wav, raw, flac, ogg, mp3, opus, aac"),
        ({"stream_format": "sse", "response_format": "flac"}, "unsupported_response_format", "flac cannot"),
        ({"voice": "nobody"}, "unknown_voice", "/v1/audio/voices"),
        ({"input": ""}, "empty_text", "input"),
        ({"style": "cheerful"}, "unknown_field", "style"),
    ],
)
def test_openai_speech_errors(server: ServerProcess, change: dict, code: str, words: str) -> None:
    body = {"model": "tts-1", "input": "Hi.", "voice": "alloy", **change}
    error = assert_error(requests.post(server.url("/v1/audio/speech"), json=body, timeout=30), 400, code)
    assert words in error["message"]


def test_openai_listings(server: ServerProcess) -> None:
    models = requests.get(server.url("/v1/models"), timeout=10).json()
    assert models["object"] == "list" and models["data"][0]["id"] == "csm-tiny"
    assert requests.get(server.url("/v1/audio/models"), timeout=10).json()["models"][0]["id"] == "csm-tiny"
    voices = {v["id"]: v for v in requests.get(server.url("/v1/audio/voices"), timeout=10).json()["voices"]}
    assert voices["conversational_a"]["speaker"] == 0 and voices["conversational_b"]["speaker"] == 1
    assert voices["alloy"]["voice"] == "conversational_a" and voices["echo"]["voice"] == "conversational_b"
    assert "none" in voices


# -- serving under load and misbehaving clients ----------------------------------------------------


@pytest.mark.parametrize("streaming", [True, False], ids=["streaming", "whole file"])
def test_a_client_that_disconnects_cancels_its_generation(server: ServerProcess, streaming: bool) -> None:
    before = stats(server)["requests"]
    body = {"text": "A long one.", "streaming": streaming, "max_audio_ms": 60_000}
    if streaming:
        response = requests.post(server.url("/generate"), json=body, stream=True, timeout=60)
        chunks = response.iter_content(chunk_size=None)
        next(chunks), next(chunks)  # audio is flowing
        response.close()
    else:
        with pytest.raises(requests.exceptions.ReadTimeout):  # the client gives up and hangs up
            requests.post(server.url("/generate"), json=body, timeout=(10, 1.5))
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        now = stats(server)
        if now["requests"]["cancelled"] > before["cancelled"] and now["engine"]["active"] == 0:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the job was not cancelled: {now}")
    if streaming:
        assert now["requests"]["frames"] - before["frames"] < 100  # of the 750 frames asked for
    assert re.search(r"POST /generate client went away .* stop=cancelled", server.log())
    assert requests.get(server.url("/health"), timeout=10).status_code == 200
    response = requests.post(server.url("/generate"), json={"text": "Next.", "max_audio_ms": 160}, timeout=60)
    assert len(read_wav(response.content)) == 2 * 1920


def test_sixteen_concurrent_requests_succeed_and_match_their_solo_audio(server: ServerProcess) -> None:
    bodies = [
        {
            "text": f"Request number {i} says hello.",
            "speaker": i % 2,
            "seed": 100 + i,
            "max_audio_ms": 480,
            "streaming": i % 3 == 0,
        }
        for i in range(16)
    ]

    def post(body: dict) -> np.ndarray:
        response = requests.post(server.url("/generate"), json=body, timeout=120)
        assert response.status_code == 200, response.text
        return sf.read(io.BytesIO(response.content), dtype="int16")[0]

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(post, bodies))
    alone = [post(body) for body in bodies]
    for i, (a, b) in enumerate(zip(together, alone, strict=True)):
        assert len(a) == 6 * 1920
        np.testing.assert_array_equal(a, b, err_msg=f"request {i} differs when batched")


# -- auth, back-pressure, time limits, shutdown (the guarded server) ------------------------------


def test_api_key_is_required_except_on_health(guarded: ServerProcess) -> None:
    assert requests.get(guarded.url("/health"), timeout=10).status_code == 200
    missing = requests.get(guarded.url("/v1/models"), timeout=10)
    assert_error(missing, 401, "missing_api_key")
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    wrong = requests.post(
        guarded.url("/generate"), json={"text": "hi"}, headers={"Authorization": "Bearer nope"}, timeout=10
    )
    assert_error(wrong, 401, "invalid_api_key")
    ok = requests.post(
        guarded.url("/generate"),
        json={"text": "hi", "max_audio_ms": 160},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )
    assert len(read_wav(ok.content)) == 2 * 1920


def test_a_full_server_answers_503_with_retry_after(guarded: ServerProcess) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    long_stream = {"text": "Holding the only slot.", "streaming": True, "max_audio_ms": 60_000}
    holder = requests.post(guarded.url("/generate"), json=long_stream, headers=auth, stream=True, timeout=60)
    audio = holder.iter_content(chunk_size=None)  # keep a reference: collecting it closes the connection
    next(audio)
    busy = requests.post(guarded.url("/generate"), json={"text": "Me too?"}, headers=auth, timeout=10)
    assert_error(busy, 503, "server_busy")
    assert int(busy.headers["Retry-After"]) >= 1
    holder.close()
    deadline = time.monotonic() + 15
    while stats(guarded, **auth)["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.1)
    ok = requests.post(
        guarded.url("/generate"), json={"text": "My turn.", "max_audio_ms": 160}, headers=auth, timeout=60
    )
    assert ok.status_code == 200


def test_a_request_past_the_time_limit_gets_504(guarded: ServerProcess) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    before = stats(guarded, **auth)["requests"]
    started = time.monotonic()
    slow = requests.post(
        guarded.url("/generate"), json={"text": "Far too long.", "max_audio_ms": 600_000}, headers=auth, timeout=60
    )
    assert_error(slow, 504, "timeout")
    assert time.monotonic() - started < 20
    deadline = time.monotonic() + 15
    while stats(guarded, **auth)["engine"]["active"] and time.monotonic() < deadline:
        time.sleep(0.1)
    after = stats(guarded, **auth)["requests"]
    assert after["timed_out"] == 1 and after["client_errors"] == before["client_errors"]  # counted once


def test_a_stream_past_the_time_limit_is_cut_not_ended(guarded: ServerProcess) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    body = {"text": "Far too long.", "max_audio_ms": 600_000, "streaming": True}
    received = []
    with (
        pytest.raises(requests.exceptions.ChunkedEncodingError),
        requests.post(guarded.url("/generate"), json=body, headers=auth, stream=True, timeout=60) as response,
    ):
        assert response.status_code == 200
        for chunk in response.iter_content(chunk_size=None):
            received.append(chunk)
    assert received  # audio came, then the connection was cut without the chunked terminator
    assert re.search(r"stream cut before its end: ApiError: the request took longer", guarded.log())
    deadline = time.monotonic() + 15
    while stats(guarded, **auth)["engine"]["active"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stats(guarded, **auth)["requests"]["timed_out"] == 2


def test_sigterm_finishes_in_flight_requests_then_exits_0(guarded: ServerProcess) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    received: list[bytes] = []
    first = threading.Event()

    def listen() -> None:
        with requests.post(
            guarded.url("/generate"),
            json={"text": "Finish me.", "streaming": True},
            headers=auth,
            stream=True,
            timeout=60,
        ) as response:
            for chunk in response.iter_content(chunk_size=None):
                received.append(chunk)
                first.set()

    client = threading.Thread(target=listen)
    client.start()
    assert first.wait(30)
    guarded.proc.send_signal(signal.SIGTERM)
    client.join(60)
    assert guarded.proc.wait(60) == 0
    samples, _ = sf.read(io.BytesIO(b"".join(received)), dtype="int16")
    assert len(samples) == BUDGET_SAMPLES
    log = guarded.log()
    assert "shutting down: 1 request(s) in flight" in log and log.rstrip().endswith("stopped")
