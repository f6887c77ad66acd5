"""Hardening of the HTTP server: inputs that used to give 500, HTTP/1.0 streams, aiohttp's own errors,
slow clients, connection limits, the end of a stream, and a property-based fuzz over both endpoints.

One in-process server (API key, short timeouts, few connections) on a loopback port; requests go
over raw sockets where the exact bytes matter.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server import assert_error

from csmcli.engine import AudioChunk, JobStats
from csmcli.options import OPTION_FIELDS, GenerationOptions
from csmcli.server import (
    GENERATE_FIELDS,
    SPEECH_FIELDS,
    ServerConfig,
    SpeechRequest,
    SpeechServer,
    make_runner,
    streaming,
)

KEY = "hardening-key"
AUTH = f"Authorization: Bearer {KEY}\r\n".encode()
BUDGET_MS = 240  # 3 frames: every request here is short
SAMPLES = BUDGET_MS * 24


@dataclass
class Live:
    url: str
    port: int
    server: SpeechServer


@contextlib.contextmanager
def serving(server: SpeechServer) -> Iterator[int]:
    """Run ``server`` (the real runner: limits, timeouts, JSON errors) on a loopback port in a thread."""
    loop = asyncio.new_event_loop()
    sock = socket.create_server(("127.0.0.1", 0))
    server.start()

    async def start() -> web.AppRunner:
        runner = make_runner(server)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        return runner

    runner = loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        server.close()


@pytest.fixture(scope="module")
def live(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    from csmcli import Synthesizer

    synth = Synthesizer.load(str(tiny_dir), device="cpu", dtype="float32", max_batch_size=2)
    synth.voices.home = tmp_path_factory.mktemp("home")
    config = ServerConfig(
        defaults=GenerationOptions(max_audio_ms=BUDGET_MS),
        model_id="tiny",
        api_key=KEY,
        request_timeout=60,
        keepalive_timeout=1.0,
        read_timeout=1.0,
        max_connections=8,
        max_buffered_s=1.0,
    )
    server = SpeechServer(synth, config)
    with serving(server) as port:
        yield Live(f"http://127.0.0.1:{port}", port, server)


def exchange(port: int, data: bytes, timeout: float = 60, rcvbuf: int | None = None) -> bytes:
    """Send raw bytes, read until the server closes the connection."""
    with socket.socket() as sock:
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


def request(path: str, body: bytes, content_type: str | None = "application/json", extra: bytes = AUTH) -> bytes:
    """A raw HTTP/1.1 POST that asks the server to close the connection after answering."""
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
    if content_type is not None:
        head += f"Content-Type: {content_type}\r\n"
    return head.encode() + extra + b"\r\n" + body


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of a raw response (chunked bodies joined)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    headers = {k.lower(): v for k, v in headers.items()}
    if headers.get("transfer-encoding") == "chunked":
        joined, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            joined, rest = joined + rest[:n], rest[n + 2 :]
        body = joined
    return int(lines[0].split()[1]), headers, body


def json_error(raw: bytes, status: int | None = None) -> dict:
    """The error object of a JSON error response (checking its shape)."""
    got, headers, body = parse(raw)
    assert status is None or got == status, raw[:300]
    assert 400 <= got < 600 and headers["content-type"].startswith("application/json"), raw[:300]
    error = json.loads(body)["error"]
    assert set(error) >= {"message", "type", "code", "param"} and error["message"]
    return error


# -- inputs that used to give 500 ----------------------------------------------------------------

MANY_DIGITS = "7" * 5000
FORM = "application/x-www-form-urlencoded"
BAD_INPUTS = [
    ("/generate", b'{"text": "hi", "speaker": "\\u00b2"}', "application/json", "invalid_speaker", "speaker"),
    ("/generate", "text=hi&speaker=²".encode(), FORM, "invalid_speaker", "speaker"),
    (
        "/generate",
        f'{{"text": "hi", "speaker": "{MANY_DIGITS}"}}'.encode(),
        "application/json",
        "invalid_speaker",
        "speaker",
    ),
    ("/v1/audio/speech", b'{"input": "hi", "speaker": "\\u00b2"}', "application/json", "invalid_speaker", "speaker"),
    ("/v1/audio/speech", f"input=hi&speaker={MANY_DIGITS}".encode(), FORM, "invalid_speaker", "speaker"),
    ("/generate", b'{"text": "hi \\ud800"}', "application/json", "invalid_unicode", "text"),
    ("/generate", b'{"text": "hi \\ud800", "streaming": true}', "application/json", "invalid_unicode", "text"),
    ("/v1/audio/speech", b'{"input": "hi \\udfff there"}', "application/json", "invalid_unicode", "input"),
    ("/generate", b'{"text": "hi", "voice": "\\ud800"}', "application/json", "invalid_unicode", "voice"),
    ("/generate", b'{"text": "hi", "top_k": 1e20}', "application/json", "invalid_option", "top_k"),
    ("/generate", b'{"text": "hi", "top_k": 100000000000000000000}', "application/json", "invalid_option", "top_k"),
    ("/v1/audio/speech", b"input=hi&top_k=1e20", FORM, "invalid_option", "top_k"),
    (
        "/generate",
        b'{"text": "hi", "temperature": 1' + b"0" * 400 + b"}",
        "application/json",
        "invalid_option",
        "temperature",
    ),
]


@pytest.mark.parametrize(("path", "body", "content_type", "code", "param"), BAD_INPUTS)
def test_inputs_that_used_to_give_500_are_400s_naming_the_field(
    live: Live, path: str, body: bytes, content_type: str, code: str, param: str
) -> None:
    error = json_error(exchange(live.port, request(path, body, content_type)), 400)
    assert error["code"] == code and error["param"] == param
    assert len(error["message"]) < 300


@pytest.mark.parametrize(
    "token", ["Bearer \xff\xfe".encode("latin-1"), "Bearer café".encode(), b"Bearer \xe9\x00x"[:-2]]
)
def test_a_non_ascii_authorization_header_is_401(live: Live, token: bytes) -> None:
    for path in ("/v1/models", "/v1/stats"):
        raw = exchange(
            live.port,
            f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode()
            + b"Authorization: "
            + token
            + b"\r\n\r\n",
        )
        assert json_error(raw, 401)["code"] == "invalid_api_key"
    raw = exchange(live.port, request("/generate", b'{"text": "hi"}', extra=b"Authorization: " + token + b"\r\n"))
    assert json_error(raw, 401)["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("path", "body", "header"),
    [
        ("/generate", {"text": "Old client.", "streaming": True}, b"RIFF"),
        ("/v1/audio/speech", {"input": "Old client.", "voice": "alloy", "response_format": "wav"}, b"RIFF"),
        ("/v1/audio/speech", {"input": "Old client.", "response_format": "pcm"}, b""),
    ],
)
def test_streams_over_http_1_0_end_with_the_connection(live: Live, path: str, body: dict, header: bytes) -> None:
    data = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n".encode()
    status, headers, content = parse(exchange(live.port, head + AUTH + b"\r\n" + data))
    assert status == 200 and "transfer-encoding" not in headers
    assert content.startswith(header) and len(content) == len(header) * 11 + 2 * SAMPLES  # a WAV header is 44 bytes


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
        b"\x16\x03\x01\x02\x00garbage\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["header over 8190 bytes", "garbage request line", "length and chunked", "bad bytes in the path"],
)
def test_aiohttps_own_errors_are_json(live: Live, raw: bytes) -> None:
    error = json_error(exchange(live.port, raw))
    assert "Traceback" not in error["message"]


def test_stats_figures_are_rounded(live: Live) -> None:
    live.server.counters.audio_seconds = 17.999999999999996
    raw = exchange(live.port, b"GET /v1/stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + AUTH + b"\r\n")
    assert json.loads(parse(raw)[2])["requests"]["audio_seconds"] == 18.0


class _FakeJob:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.error = None
        self.cancelled = False
        self.stats = JobStats()

    def cancel(self) -> None:
        self.cancelled = True


# -- slow clients ---------------------------------------------------------------------------------


def test_slow_headers_are_cut_after_the_keepalive_timeout(live: Live) -> None:
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the server, not the 10 s client timeout
        assert time.monotonic() - started < 6


def test_a_slow_body_gets_408(live: Live) -> None:
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
        sock.sendall(request("/generate", b"{" * 100)[:-99])  # 1 of 100 body bytes
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    assert json_error(out, 408)["code"] == "body_timeout"


def test_connections_past_the_limit_get_503(live: Live) -> None:
    time.sleep(1.5)  # idle connections of earlier tests time out
    socks = []
    try:
        for _ in range(live.server.config.max_connections + 2):
            socks.append(socket.create_connection(("127.0.0.1", live.port), timeout=10))
        last = socks[-1]
        out = b""
        while chunk := last.recv(65536):
            out += chunk
        assert json_error(out, 503)["code"] == "too_many_connections"
    finally:
        for sock in socks:
            sock.close()
    time.sleep(0.2)
    assert parse(exchange(live.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))[0] == 200


def test_a_reader_that_falls_behind_is_cut_and_its_job_cancelled(live: Live) -> None:
    """Chunks wait in the request's queue while its client does not read; past ``max_buffered_s``
    (1 s here) of audio the job is cancelled and the connection aborted, so memory stays bounded."""

    class Transport:
        aborted = False

        def abort(self) -> None:
            self.aborted = True

    streaming.CURRENT.set(streaming.Note("test"))
    run = streaming.Run(live.server, SpeechRequest("x", 0, None, GenerationOptions(seed=1)))
    job, transport, queue = _FakeJob(), Transport(), asyncio.Queue()
    run.jobs.append(job)
    run.transport = transport
    chunk = AudioChunk(np.zeros(14_400, dtype=np.float32), 24000, 0, 8)  # 0.6 s
    run.arrive(queue, chunk)
    assert not job.cancelled and not transport.aborted
    run.arrive(queue, chunk)
    assert job.cancelled and transport.aborted and run.outcome == "slow_client"
    assert run.stop_reason == "slow_client"


# -- the end of a stream ---------------------------------------------------------------------------


def test_a_final_chunk_queued_as_the_poll_times_out_is_not_lost(live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine thread queues the final chunk (call_soon_threadsafe) and then sets ``done``; a poll
    that times out between the two must still deliver the chunk."""
    streaming.CURRENT.set(streaming.Note("test"))
    run = streaming.Run(live.server, SpeechRequest("x", 0, None, GenerationOptions(seed=1)))
    job = _FakeJob()
    final = AudioChunk(np.ones(1920, dtype=np.float32), 24000, 0, 1, final=True)
    real_wait_for = asyncio.wait_for
    polls: list[float] = []

    async def main() -> list[np.ndarray]:
        queue: asyncio.Queue = asyncio.Queue()

        async def first_poll_times_out_mid_handover(awaitable, timeout):
            polls.append(timeout)
            if len(polls) > 1:
                return await real_wait_for(awaitable, timeout)
            awaitable.close()
            asyncio.get_running_loop().call_soon(queue.put_nowait, final)  # queued, not yet run
            job.done.set()
            raise asyncio.TimeoutError

        monkeypatch.setattr(streaming.asyncio, "wait_for", first_poll_times_out_mid_handover)
        return [samples async for samples in run.drain(job, queue)]

    got = asyncio.run(main())
    assert len(got) == 1 and len(got[0]) == 1920


def test_a_new_voice_is_loaded_without_holding_the_engine(live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    from csmcli.voices import Voice

    synth = live.server.synth
    src = Path(synth.voices.prompts_dir) / "read_speech_a.wav"
    synth.voices.add("slowpoke", src, "A voice that loads slowly.")
    engine_free: list[bool] = []
    real_load = Voice.load

    def probe() -> None:
        free = synth.engine.lock.acquire(timeout=5)
        if free:
            synth.engine.lock.release()
        engine_free.append(free)

    def load(self: Voice) -> np.ndarray:
        holder = threading.Thread(target=probe)
        holder.start()
        holder.join()
        return real_load(self)

    monkeypatch.setattr(Voice, "load", load)
    raw = exchange(live.port, request("/generate", b'{"text": "Hello.", "voice": "slowpoke"}'))
    assert parse(raw)[0] == 200, raw[:300]
    assert engine_free == [True]


def test_an_unreadable_voice_does_not_show_server_paths(live: Live) -> None:
    voices = live.server.synth.voices
    folder = voices.user_dir / "broken"
    folder.mkdir(parents=True)
    (folder / "audio.wav").write_bytes(b"not audio at all")
    (folder / "voice.json").write_text(json.dumps({"text": "Broken."}))
    error = json_error(exchange(live.port, request("/generate", b'{"text": "Hi.", "voice": "broken"}')), 400)
    assert "broken" in error["message"] and str(folder) not in error["message"] and "/" not in error["message"]


# -- fuzz -----------------------------------------------------------------------------------------

VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["0", "1", "²", "wav", "pcm", "flac", "sse", "true", "1e20", "none", "alloy", "\ud800"]),
    st.lists(st.integers(), max_size=2),
)
SHORT = st.sampled_from([80, 160, 1e20, -5, "80", None])
FIELD_NAMES = st.sampled_from(sorted({*GENERATE_FIELDS, *SPEECH_FIELDS, "colour", ""}))
BODIES = st.dictionaries(FIELD_NAMES, VALUES, max_size=6).map(
    lambda d: {k: v for k, v in d.items() if k != "max_audio_ms"}
)
CONTENT_TYPES = st.sampled_from(
    [None, "application/json", FORM, "multipart/form-data", "text/plain", "application/json; charset=latin-1", "x/\xff"]
)


def _encode(fields: dict, kind: str) -> bytes:
    if kind == "json":
        return json.dumps(fields).encode("utf-8", "surrogatepass")
    if kind == "form":
        from urllib.parse import urlencode

        return urlencode({k: str(v) for k, v in fields.items()}, encoding="utf-8", errors="surrogatepass").encode()
    return json.dumps(fields).encode("utf-8", "surrogatepass")[::-1]


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    path=st.sampled_from(["/generate", "/v1/audio/speech"]),
    fields=BODIES,
    text=st.one_of(st.none(), st.text(max_size=30)),
    budget=SHORT,
    kind=st.sampled_from(["json", "form", "bytes"]),
    content_type=CONTENT_TYPES,
    auth=st.sampled_from([AUTH, b"", b"Authorization: Bearer \xff\r\n", b"Authorization: nope\r\n"]),
    extra=st.binary(max_size=20).filter(lambda b: b"\r" not in b and b"\n" not in b),
)
def test_fuzz_any_body_header_or_content_type_gets_200_or_a_json_4xx(
    live: Live, path: str, fields: dict, text: str | None, budget, kind: str, content_type, auth: bytes, extra: bytes
) -> None:
    body = dict(fields)
    if text is not None:
        body["text" if path == "/generate" else "input"] = text
    if budget is not None:
        body["max_audio_ms"] = budget
    if "streaming" in body or "stream_format" in body:
        body.setdefault("max_audio_ms", 80)
    raw = request(path, _encode(body, kind), content_type, auth + b"X-Fuzz: " + extra + b"\r\n")
    response = exchange(live.port, raw)
    status = parse(response)[0]
    if status != 200:
        assert 400 <= status < 500, response[:500]
        json_error(response)


def test_the_server_still_serves_after_the_fuzz(live: Live) -> None:
    raw = exchange(live.port, request("/generate", b'{"text": "Still fine."}'))
    status, _, body = parse(raw)
    assert status == 200 and len(body) == 44 + 2 * SAMPLES
    assert live.server.counters.failed == 0
    assert set(OPTION_FIELDS) <= set(GENERATE_FIELDS)


# -- the engine loop and the flags --------------------------------------------------------------


def test_health_and_requests_fail_once_the_generation_loop_dies(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from csmcli import Synthesizer

    synth = Synthesizer.load(str(tiny_dir), device="cpu", dtype="float32", max_batch_size=2)
    server = SpeechServer(synth, ServerConfig(model_id="tiny"))
    with serving(server) as port, ThreadPoolExecutor(1) as pool:
        url = f"http://127.0.0.1:{port}"
        assert requests.get(f"{url}/health", timeout=10).json()["status"] == "ok"
        pending = pool.submit(requests.post, f"{url}/generate", json={"text": "Doomed.", "voice": "none"}, timeout=60)
        deadline = time.monotonic() + 30
        while not synth.engine.active_count and time.monotonic() < deadline:
            time.sleep(0.02)

        def broken_step() -> bool:
            raise RuntimeError("the GPU fell off the bus")

        monkeypatch.setattr(synth.engine, "step", broken_step)
        error = assert_error(pending.result(), 503, "engine_stopped")
        assert "GPU fell off" in error["message"]
        health = requests.get(f"{url}/health", timeout=10)
        assert health.status_code == 503 and health.json()["error"]["code"] == "engine_stopped"
        assert_error(requests.post(f"{url}/generate", json={"text": "Anyone?"}, timeout=10), 503, "engine_stopped")


def test_serve_help_lists_both_spellings_of_the_flags(cli_env: dict[str, str]) -> None:
    out = subprocess.run(
        ["csm", "serve", "--help"],
        env={**cli_env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    for flag in (
        "--model",
        "--host",
        "--port",
        "--temperature",
        "--top-k",
        "--top_k",
        "--top-p",
        "--top_p",
        "--repetition-penalty",
        "--repetition_penalty",
        "--max-audio-ms",
        "--seed",
        "--max-batch-size",
        "--max-queue",
        "--api-key",
        "--request-timeout",
        "--device",
        "--dtype",
        "--keepalive-timeout",
        "--read-timeout",
        "--max-connections",
        "--max_connections",
    ):
        assert flag in out, flag
