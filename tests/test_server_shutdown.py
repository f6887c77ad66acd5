"""Shutdown of ``csm serve``: the grace period answers 503 (``/health`` included) while in-flight work
runs, lasts ``--grace-period`` once (not twice), then cuts what is left; a second signal exits at once."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import requests
from test_server import ServerProcess, all_ready

GRACE_S = 5


@pytest.fixture(scope="module")
def processes(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("shutdown")
    env = {k: v for k, v in os.environ.items() if k not in ("CSM_MODEL", "CSM_API_KEY")}
    env.update({"HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf"), "CSM_HOME": str(root / "home")})
    env["PYTHONUNBUFFERED"] = "1"
    args = ["--model", str(tiny_dir), "--device", "cpu", "--dtype", "float32", "-q", "--max-batch-size", "1"]
    started = [
        ServerProcess([*args, "--grace-period", str(GRACE_S)], env, root / "graceful.log"),
        ServerProcess([*args, "--grace-period", "120"], env, root / "impatient.log"),
    ]
    with all_ready(started):
        yield started


def hold_a_stream(server: ServerProcess) -> tuple[threading.Thread, list[float], list[BaseException]]:
    """A client reading a long stream in a thread; returns it, the time its stream ended (once it
    has) and the exception its read ended with (if any)."""
    first = threading.Event()
    ended: list[BaseException] = []
    ended_at: list[float] = []

    def listen() -> None:
        body = {"text": "A very long answer.", "streaming": True, "max_audio_ms": 600_000, "voice": "none"}
        try:
            with requests.post(server.url("/generate"), json=body, stream=True, timeout=120) as response:
                for _ in response.iter_content(chunk_size=None):
                    first.set()
        except requests.RequestException as exc:
            ended.append(exc)
        ended_at.append(time.monotonic())

    client = threading.Thread(target=listen)
    client.start()
    assert first.wait(60)
    return client, ended_at, ended


def test_the_grace_period_answers_503_then_cuts_what_is_left_once(processes: list[ServerProcess]) -> None:
    server = processes[0]
    client, ended_at, ended = hold_a_stream(server)
    server.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    time.sleep(0.5)
    health = requests.get(server.url("/health"), timeout=10)
    assert health.status_code == 503 and health.json()["error"]["code"] == "shutting_down"
    busy = requests.post(server.url("/generate"), json={"text": "New work?"}, timeout=10)
    assert busy.status_code == 503 and busy.json()["error"]["code"] == "shutting_down"
    assert int(busy.headers["Retry-After"]) >= 1
    client.join(60)
    assert server.proc.wait(60) == 0
    took = ended_at[0] - signalled
    assert GRACE_S - 0.5 < took < 1.7 * GRACE_S, took  # aiohttp alone let it run twice the grace period
    assert ended and isinstance(ended[0], requests.exceptions.ChunkedEncodingError)  # cut, not ended cleanly
    log = server.log()
    assert "grace period over: cutting 1 request(s)" in log and log.rstrip().endswith("stopped")


def test_a_second_signal_exits_at_once(processes: list[ServerProcess]) -> None:
    server = processes[1]
    client, _, _ = hold_a_stream(server)
    server.proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    server.proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    code = server.proc.wait(30)
    assert time.monotonic() - started < 5 and code == 128 + signal.SIGINT
    client.join(30)
    assert "second SIGINT: exiting now" in server.log()
