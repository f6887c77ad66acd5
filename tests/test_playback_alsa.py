"""Tests for csmcli.playback's real audio path: PortAudio -> ALSA -> a ``file`` PCM.

The tests play through PortAudio -> ALSA into a ``file`` PCM that writes s16le to a FIFO, configured
by an ``.asoundrc`` in a temporary HOME. A reader thread drains the FIFO at exactly real time, which
paces the "device" like a sound card would (ALSA's null PCM alone consumes instantly). They need
``libportaudio2`` (and libasound2, which it pulls in) and are skipped without it.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_playback import FADE, SR, SRC, check_gapless, signal_part, signal_wave, zero_runs

from csmcli.audio import to_int16

# --- the real audio path: PortAudio -> ALSA -> file PCM ------------------------------------------

HAVE_PORTAUDIO = sys.platform.startswith("linux") and ctypes.util.find_library("portaudio") is not None
needs_alsa = pytest.mark.skipif(not HAVE_PORTAUDIO, reason="libportaudio2 not found (apt-get install libportaudio2)")

PLAYER = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from csmcli import playback

    cfg = json.loads(sys.argv[1])
    SR = 24000
    n = round(cfg["seconds"] * SR)
    t = np.arange(n) / SR
    x = (0.3 + 0.2 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)

    def gen():
        step = round(cfg["chunk_s"] * SR)
        time.sleep(cfg.get("first_delay_s", 0.0))
        for i, s in enumerate(range(0, n, step)):
            piece = x[s:s + step]
            if cfg.get("rate"):
                time.sleep(len(piece) / SR / cfg["rate"])
            if i == cfg.get("stall_at", -1):
                time.sleep(cfg["stall_s"])
            yield piece

    t0 = time.monotonic()
    starts = []
    def on_start():
        starts.append(time.monotonic() - t0)
        print("started", flush=True)
    if cfg.get("list"):
        print(json.dumps({"devices": playback.list_devices(), "default": playback.resolve_device("default")}))
        sys.exit(0)
    try:
        played = playback.play_stream(gen(), device=cfg.get("device"), rate_hint=cfg.get("rate_hint"),
                                      expected_total_s=cfg.get("expected_total_s"), on_start=on_start)
    except KeyboardInterrupt:
        print(json.dumps({"interrupted": time.monotonic() - t0}), flush=True)
        sys.exit(130)
    print(json.dumps({"played": played, "elapsed": time.monotonic() - t0, "start": starts[0]}), flush=True)
""")


class AlsaCapture:
    """A temporary HOME whose ALSA default device writes s16le/24 kHz/mono into a FIFO read at real time."""

    def __init__(self, root: Path) -> None:
        self.home = root / "home"
        self.home.mkdir()
        self.fifo = root / "capture.fifo"
        os.mkfifo(self.fifo)
        (self.home / ".asoundrc").write_text(
            textwrap.dedent(f"""
            pcm.!default {{
                type plug
                slave {{ pcm "capture" format S16_LE rate {SR} channels 1 }}
            }}
            pcm.capture {{
                type file
                slave.pcm "null"
                file "{self.fifo}"
                format "raw"
            }}
        """)
        )
        self.script = root / "player.py"
        self.script.write_text(PLAYER)
        # O_RDWR: the writer's open never blocks and we never see EOF between ALSA's opens.
        self.fd = os.open(self.fifo, os.O_RDWR | os.O_NONBLOCK)
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.fd, 1031, 4096)  # F_SETPIPE_SZ: as little slack as a real device has
        self.data = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        """Take 2 bytes per sample at 24 kHz from the first byte on, like a DAC would."""
        t0 = None
        while not self._stop.is_set():
            now = time.monotonic()
            allowed = 2 if t0 is None else int((now - t0) * SR) * 2 - len(self.data)
            if allowed > 0:
                try:
                    got = os.read(self.fd, min(allowed, 1 << 16))
                except BlockingIOError:
                    got = b""
                if got:
                    if t0 is None:
                        t0 = now
                    self.data += got
            time.sleep(0.002)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(HOME=str(self.home), PYTHONPATH=str(SRC), PYTHONUNBUFFERED="1")
        env.pop("ALSA_CONFIG_PATH", None)
        return env

    def start(self, **cfg: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, str(self.script), json.dumps(cfg)],
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run(self, timeout: float = 30.0, **cfg: Any) -> dict[str, Any]:
        proc = self.start(**cfg)
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"player failed ({proc.returncode}): {err[-2000:]}"
        return json.loads(out.strip().splitlines()[-1])

    def samples(self) -> np.ndarray:
        """Stop reading, drain what is left in the pipe, return the capture."""
        self._stop.set()
        self._thread.join()
        while True:
            try:
                got = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                break
            if not got:
                break
            self.data += got
        return np.frombuffer(bytes(self.data[: len(self.data) // 2 * 2]), dtype="<i2")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        os.close(self.fd)


@pytest.fixture()
def alsa(tmp_path: Path):
    cap = AlsaCapture(tmp_path)
    yield cap
    cap.close()


def check_capture(cap: np.ndarray, seconds: float) -> None:
    """The whole signal, gapless and bit exact, plus at most a little device padding."""
    check_gapless(cap, seconds)
    assert len(cap) < (seconds + 0.5) * SR


@needs_alsa
def test_alsa_lists_default_device(alsa: AlsaCapture) -> None:
    res = alsa.run(list=True, seconds=0, chunk_s=0.1)
    names = {d["name"]: d for d in res["devices"]}
    assert "default" in names and names["default"]["default"]
    assert res["default"] == names["default"]["index"]


@needs_alsa
def test_alsa_fast_producer(alsa: AlsaCapture) -> None:
    res = alsa.run(seconds=1.5, chunk_s=0.08)
    assert res["played"] == pytest.approx(1.5)
    assert res["start"] < 0.5
    assert res["elapsed"] >= 1.5 - 0.15  # waited for (nearly) the last sample: the FIFO holds ~85 ms
    check_capture(alsa.samples(), 1.5)


@needs_alsa
def test_alsa_slow_producer_half_real_time(alsa: AlsaCapture) -> None:
    res = alsa.run(seconds=2.0, chunk_s=0.16, rate=0.5, first_delay_s=0.3, expected_total_s=2.0)
    assert res["played"] == pytest.approx(2.0)
    assert 1.3 < res["start"] < 4.3
    check_capture(alsa.samples(), 2.0)


@needs_alsa
def test_alsa_slow_producer_rate_hint_only(alsa: AlsaCapture) -> None:
    # no expected total: it has to wait for the end, and must still play everything gaplessly
    alsa.run(seconds=1.0, chunk_s=0.2, rate=0.7, rate_hint=0.7)
    check_capture(alsa.samples(), 1.0)


@needs_alsa
def test_alsa_underrun_is_silence_not_garbage(alsa: AlsaCapture) -> None:
    alsa.run(seconds=1.2, chunk_s=0.1, stall_at=4, stall_s=0.8, rate_hint=5.0)
    body = signal_part(alsa.samples())
    ref = to_int16(signal_wave(1.2))
    runs = zero_runs(body)
    assert max(runs, default=0) > 0.1 * SR  # the stall shows as silence ...
    assert np.array_equal(body[body != 0][: len(ref) - FADE], ref[:-FADE])  # ... and nothing else changed


@needs_alsa
def test_alsa_ctrl_c_stops_at_once(alsa: AlsaCapture) -> None:
    proc = alsa.start(seconds=20.0, chunk_s=0.1, rate=2.0)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "started", proc.stderr.read() if proc.stderr else ""
        time.sleep(0.5)
        t_sig = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        stopped_after = time.monotonic() - t_sig
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in out
    assert stopped_after < 1.5
    cap = alsa.samples()
    assert 0.3 * SR < len(signal_part(cap)) < 3.0 * SR
