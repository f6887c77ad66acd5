"""`csm play` through a real PortAudio -> ALSA path (a `file` PCM) and raw stdout streaming."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

needs_portaudio = pytest.mark.skipif(
    ctypes.util.find_library("portaudio") is None, reason="libportaudio2 not found (apt-get install libportaudio2)"
)
BASE = ["--device", "cpu", "--dtype", "float32", "-q"]


@pytest.fixture()
def alsa_home(tmp_path: Path, cli_env: dict):
    """A HOME whose ALSA default device is a FIFO drained at exactly 24 kHz: a sound card for CI."""
    from test_playback_alsa import AlsaCapture

    cap = AlsaCapture(tmp_path)
    yield {**cli_env, "HOME": str(cap.home)}, cap
    cap.close()


def captured(cap) -> np.ndarray:
    return cap.samples()


@needs_portaudio
def test_play_text_through_the_default_device(tiny_dir, alsa_home) -> None:
    env, capture = alsa_home
    r = subprocess.run(
        [
            "csm",
            "play",
            "Hello through the speakers.",
            "-m",
            str(tiny_dir),
            "--max-audio-ms",
            "800",
            "--seed",
            "1",
            *BASE,
        ],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr.decode()
    audio = captured(capture)
    expected = 10 * 1920
    assert expected <= len(audio) <= expected + 24000, len(audio)
    assert np.abs(audio[:expected].astype(np.int32)).max() > 30, "captured only silence"


@needs_portaudio
def test_play_lines_from_a_pipe_each_conditioned_on_the_last(tiny_dir, alsa_home) -> None:
    env, capture = alsa_home
    r = subprocess.run(
        ["csm", "play", "-m", str(tiny_dir), "--max-audio-ms", "400", "--seed", "2", *BASE],
        input=b"First line.\n\nSecond line.\n",
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr.decode()
    audio = captured(capture)
    assert 2 * 5 * 1920 <= len(audio) <= 2 * 5 * 1920 + 2 * 24000
    assert np.abs(audio.astype(np.int32)).max() > 30


@needs_portaudio
def test_list_devices_and_unknown_device(tiny_dir, alsa_home) -> None:
    env, _ = alsa_home
    r = subprocess.run(["csm", "play", "--list-devices"], env=env, capture_output=True, timeout=120)
    assert r.returncode == 0 and b"default" in r.stdout
    r = subprocess.run(
        ["csm", "play", "hi", "-m", str(tiny_dir), "--output-device", "no-such-card", *BASE],
        env=env,
        capture_output=True,
        timeout=120,
    )
    err = r.stderr.decode()
    assert r.returncode == 1 and "no-such-card" in err and "Traceback" not in err, err


def test_raw_stdout_streams_before_generation_ends(tiny_dir, cli_env) -> None:
    """The first PCM bytes arrive long before the last: `csm say -o - --format raw | aplay` starts at once."""
    proc = subprocess.Popen(
        [
            "csm",
            "say",
            "Streaming to a pipe.",
            "-m",
            str(tiny_dir),
            "-o",
            "-",
            "--format",
            "raw",
            "--max-audio-ms",
            "4000",
            "--seed",
            "1",
            *BASE,
        ],
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    first = proc.stdout.read(3840)
    t_first = time.monotonic()
    rest = proc.stdout.read()
    t_last = time.monotonic()
    proc.wait(timeout=60)
    assert proc.returncode == 0, proc.stderr.read().decode()
    assert len(first) + len(rest) == 50 * 1920 * 2
    gap = t_last - t_first
    print(f"first 80 ms of audio arrived {gap:.2f} s before the end of the stream")
    assert gap > 0.5, f"stdout was not streamed: first bytes only {gap:.2f} s before the end"


def test_play_without_portaudio_is_a_one_line_error(tiny_dir, cli_env, tmp_path) -> None:
    """With PortAudio missing, the error names the package to install (no traceback)."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sounddevice.py").write_text("raise OSError('PortAudio library not found')\n")
    env = {**cli_env, "PYTHONPATH": str(shim)}
    r = subprocess.run(
        [sys.executable, "-m", "csmcli", "play", "hi", "-m", str(tiny_dir), *BASE],
        env=env,
        capture_output=True,
        timeout=120,
    )
    err = r.stderr.decode()
    assert r.returncode == 1 and "libportaudio2" in err and "Traceback" not in err, err
