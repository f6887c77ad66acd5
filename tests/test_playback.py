"""Tests for csmcli.playback: start decision, buffer and controller (fake sounddevice); the real ALSA
path is in test_playback_alsa.py."""

from __future__ import annotations

import _thread
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from csmcli import playback
from csmcli.audio import to_int16
from csmcli.errors import AudioError

SR = 24000
FADE = round(playback.END_FADE_S * SR)
SRC = Path(__file__).resolve().parents[1] / "src"


def signal_wave(seconds: float, amp: float = 0.2, offset: float = 0.3) -> np.ndarray:
    """A sine riding on a DC offset: never zero, so any zero sample in a capture is inserted silence."""
    t = np.arange(round(seconds * SR)) / SR
    return (offset + amp * np.sin(2 * np.pi * 330 * t)).astype(np.float32)


def chunked(
    x: np.ndarray,
    chunk_s: float,
    rate: float | None = None,
    first_delay_s: float = 0.0,
    stall: tuple[int, float] | None = None,
    state: dict[str, Any] | None = None,
):
    """Yield ``x`` in chunks, produced at ``rate`` x real time (None: instantly)."""
    n = round(chunk_s * SR)
    try:
        time.sleep(first_delay_s)
        for i, start in enumerate(range(0, len(x), n)):
            piece = x[start : start + n]
            if rate:
                time.sleep(len(piece) / SR / rate)
            if stall and i == stall[0]:
                time.sleep(stall[1])
            yield piece
    finally:
        if state is not None:
            state["closed"] = True


def zero_runs(a: np.ndarray) -> list[int]:
    """Lengths of the runs of exact zeros in ``a``."""
    z = np.concatenate([[0], (a == 0).astype(np.int8), [0]])
    d = np.diff(z)
    return list(np.flatnonzero(d == -1) - np.flatnonzero(d == 1))


def signal_part(a: np.ndarray) -> np.ndarray:
    """``a`` from its first to its last non-zero sample."""
    nz = np.flatnonzero(a)
    return a[nz[0] : nz[-1] + 1] if len(nz) else a[:0]


def check_gapless(cap: np.ndarray, seconds: float) -> None:
    """From its first non-zero sample, ``cap`` is exactly the signal (up to the end fade), then silence."""
    ref = to_int16(signal_wave(seconds))
    nz = np.flatnonzero(cap)
    assert len(nz), "nothing but silence was played"
    body = cap[nz[0] : nz[0] + len(ref)]
    assert len(body) == len(ref), f"captured {len(body) / SR:.3f} s of signal, expected {seconds} s"
    assert zero_runs(body[:-FADE]) == [], f"gaps of silence inside the signal: {zero_runs(body)[:10]}"
    assert np.array_equal(body[:-FADE], ref[:-FADE]), "the signal was altered"
    assert np.all(np.abs(body[-FADE:].astype(int)) <= np.abs(ref[-FADE:].astype(int))), "no fade-out"
    assert np.all(cap[nz[0] + len(ref) :] == 0), "something after the end"
    assert nz[0] < 0.5 * SR, "too much leading silence"


# --- ready_to_play --------------------------------------------------------------------------------


def test_ready_when_done() -> None:
    assert playback.ready_to_play(0.0, 0.0, None, done=True)
    assert playback.ready_to_play(3.0, 3.0, 0.01, done=True, expected_total_s=100)


def test_not_ready_without_audio_or_rate() -> None:
    assert not playback.ready_to_play(0.0, 0.0, 5.0, done=False)
    assert not playback.ready_to_play(1.0, 1.0, None, done=False, expected_total_s=2)
    assert not playback.ready_to_play(1.0, 1.0, 0.0, done=False, expected_total_s=2)


def test_fast_producer_starts_after_first_chunk() -> None:
    assert playback.ready_to_play(0.08, 0.08, 1.1, done=False)
    assert playback.ready_to_play(0.08, 0.08, 3.0, done=False, expected_total_s=60)


def test_never_starts_below_the_device_fill() -> None:
    assert not playback.ready_to_play(0.08, 0.08, 3.0, done=False, min_buffer_s=0.15)
    assert playback.ready_to_play(0.16, 0.16, 3.0, done=False, min_buffer_s=0.15)
    assert playback.ready_to_play(0.01, 0.01, None, done=True, min_buffer_s=0.15)


def test_slow_producer_without_total_waits_for_the_end() -> None:
    assert not playback.ready_to_play(20.0, 20.0, 0.9, done=False)


def test_slow_producer_threshold() -> None:
    # rate 0.5 derated by 1.1: every remaining second needs 1.1 / 0.5 - 1 = 1.2 s buffered
    kw: dict[str, Any] = dict(done=False, expected_total_s=10.0)
    assert not playback.ready_to_play(4.0, 4.0, 0.5, **kw)  # 6 s remain: need 7.2
    assert not playback.ready_to_play(5.0, 5.0, 0.5, **kw)  # 5 s remain: need 6.0
    assert playback.ready_to_play(5.5, 5.5, 0.5, **kw)  # 4.5 s remain: need 5.4
    assert not playback.ready_to_play(5.5, 5.5, 0.5, margin_s=0.2, **kw)
    # resuming after running dry: only the unplayed part counts as buffered
    assert not playback.ready_to_play(1.0, 9.0, 0.5, **kw)  # 1 s remains: need 1.2
    assert playback.ready_to_play(1.3, 9.0, 0.5, **kw)
    # an expected total that was too small: nothing "remains", so the margin decides
    assert playback.ready_to_play(0.3, 12.0, 0.5, margin_s=0.2, **kw)


@pytest.mark.parametrize("rate", [0.2, 0.5, 0.9, 1.0, 1.05])
def test_threshold_is_enough_for_a_steady_producer(rate: float) -> None:
    """Simulate: start at the first moment ready_to_play allows; the buffer never runs dry."""
    total, chunk, dt = 12.0, 0.08, 0.001
    produced = played = 0.0
    started = False
    t = 0.0
    while played < total - 1e-9:
        t += dt
        new = min(total, np.floor(t * rate / chunk) * chunk)  # whole chunks only
        produced = max(produced, new)
        if not started:
            started = playback.ready_to_play(
                produced, produced, rate, done=produced >= total, expected_total_s=total, margin_s=chunk
            )
            continue
        played = min(total, played + dt)
        assert played <= produced + 1e-9, f"ran dry at t={t:.3f}"


def test_rate_meter_excludes_startup_latency() -> None:
    m = playback.RateMeter(start=0.0)
    assert m.rate() is None
    m.add(0.16, now=5.0)  # 5 s to the first chunk: overall 0.03x, not trusted
    assert m.rate() is None
    m.add(0.64, now=5.4)
    assert m.rate() == pytest.approx(1.6)
    assert m.produced_s == pytest.approx(0.8) and m.max_chunk_s == pytest.approx(0.64)


def test_rate_meter_hint_and_fast_first_chunk() -> None:
    m = playback.RateMeter(rate_hint=0.7, start=0.0)
    assert m.rate() == 0.7
    m.add(0.5, now=1.0)
    assert m.rate() == 0.7
    m.add(0.5, now=1.5)
    assert m.rate() == pytest.approx(1.0)  # measured beats the hint
    fast = playback.RateMeter(start=0.0)
    fast.add(1.0, now=0.5)
    assert fast.rate() == pytest.approx(2.0)


# --- buffer ---------------------------------------------------------------------------------------


def test_buffer_plays_chunks_back_to_back() -> None:
    b = playback._Buffer()
    b.push(np.arange(1, 6, dtype=np.int16))
    b.push(np.arange(6, 9, dtype=np.int16))
    out = np.full(4, -1, np.int16)
    assert b.read_into(out) == 4 and list(out) == [1, 2, 3, 4]
    assert b.read_into(out) == 4 and list(out) == [5, 6, 7, 8]
    assert b.buffered == 0 and b.played == 8 and not b.drained


def test_buffer_underrun_is_silence_until_resumed() -> None:
    b = playback._Buffer()
    b.push(np.array([7, 7, 7], np.int16))
    out = np.full(5, -1, np.int16)
    assert b.read_into(out) == 3 and list(out) == [7, 7, 7, 0, 0]
    assert b.starved and b.underruns == 1
    b.push(np.array([9, 9], np.int16))
    assert b.read_into(out) == 0 and list(out) == [0] * 5  # still starved: silence, data kept
    b.starved = False
    assert b.read_into(out) == 2 and list(out) == [9, 9, 0, 0, 0]


def test_buffer_finish_fades_only_the_tail() -> None:
    b = playback._Buffer()
    b.push(np.full(100, 1000, np.int16))
    b.push(np.full(10, 1000, np.int16))
    out = np.zeros(50, np.int16)
    b.read_into(out)
    b.finish(20)
    rest = np.zeros(60, np.int16)
    assert b.read_into(rest) == 60 and b.drained and not b.starved
    assert np.all(rest[:40] == 1000)
    tail = rest[40:]
    assert np.all(np.diff(tail.astype(int)) < 0) and tail[-1] == 0 and tail[0] > 900


# --- import / errors ------------------------------------------------------------------------------


def test_sounddevice_is_imported_lazily() -> None:
    code = "import sys, csmcli.playback; assert 'sounddevice' not in sys.modules, 'eager import'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(SRC)})


class _RaisingFinder:
    """A meta-path finder making ``import sounddevice`` fail like it does without PortAudio."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "sounddevice":
            raise self.exc


@pytest.mark.parametrize(
    ("exc", "needle"),
    [
        (
            OSError("PortAudio library not found"),
            "PortAudio library not found: install it (e.g. `apt-get install libportaudio2`",
        ),
        (ImportError("No module named 'sounddevice'"), "pip install sounddevice"),
    ],
)
def test_missing_portaudio(monkeypatch: pytest.MonkeyPatch, exc: BaseException, needle: str) -> None:
    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_RaisingFinder(exc), *sys.meta_path])
    with pytest.raises(AudioError) as err:
        playback.list_devices()
    assert needle in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(AudioError):
        playback.play_stream(iter([np.zeros(10, np.float32)]))


# --- controller against a fake sounddevice --------------------------------------------------------


class FakePortAudioError(Exception):
    """Stand-in for sounddevice.PortAudioError."""


class FakeCallbackStop(Exception):
    """Stand-in for sounddevice.CallbackStop."""


class FakeStream:
    """An output 'device' calling the callback from its own thread in 10 ms blocks at real time."""

    def __init__(
        self,
        sd: FakeSD,
        samplerate: float,
        channels: int,
        dtype: str,
        device: Any,
        callback: Any,
        finished_callback: Any,
        latency: Any,
        **_: Any,
    ) -> None:
        if samplerate not in sd.rates:
            raise FakePortAudioError("Invalid sample rate [PaErrorCode -9997]")
        assert channels == 1 and dtype == "int16"
        self.sd, self.samplerate, self.device = sd, int(samplerate), device
        self.callback, self.finished_callback = callback, finished_callback
        self.latency = 0.02
        self.active = False
        self.events: list[str] = []
        self.out: list[np.ndarray] = []
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        sd.streams.append(self)

    def start(self) -> None:
        self.events.append("start")
        self.active = True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        block = self.samplerate // 100
        t0 = time.monotonic()
        k = 0
        while not self._halt.is_set():
            buf = np.full((block, 1), 12345, np.int16)  # garbage unless the callback writes everything
            try:
                self.callback(buf, block, None, None)
            except FakeCallbackStop:
                self.out.append(buf[:, 0].copy())
                break
            self.out.append(buf[:, 0].copy())
            k += 1
            time.sleep(max(0.0, t0 + k * 0.01 - time.monotonic()))
        self.active = False
        if not self._halt.is_set():
            self.finished_callback()

    def stop(self, ignore_errors: bool = True) -> None:
        self.events.append("stop")

    def abort(self, ignore_errors: bool = True) -> None:
        self.events.append("abort")
        self._halt.set()
        if self._thread is not None:
            self._thread.join()

    def close(self, ignore_errors: bool = True) -> None:
        self.events.append("close")
        self._halt.set()

    def samples(self) -> np.ndarray:
        return np.concatenate(self.out) if self.out else np.zeros(0, np.int16)


class FakeSD(SimpleNamespace):
    """The parts of the sounddevice module that playback uses."""

    def __init__(self, rates: tuple[int, ...] = (SR,)) -> None:
        super().__init__(
            PortAudioError=FakePortAudioError, CallbackStop=FakeCallbackStop, default=SimpleNamespace(device=[-1, 2])
        )
        self.rates = rates
        self.streams: list[FakeStream] = []
        self.devices = [
            {"name": "Mic", "max_output_channels": 0, "default_samplerate": 48000.0, "hostapi": 0},
            {
                "name": "HDA Intel PCH: ALC892 Analog (hw:0,0)",
                "max_output_channels": 2,
                "default_samplerate": 48000.0,
                "hostapi": 0,
            },
            {"name": "default", "max_output_channels": 128, "default_samplerate": 48000.0, "hostapi": 0},
            {
                "name": "HDA Intel PCH: HDMI 0 (hw:0,3)",
                "max_output_channels": 8,
                "default_samplerate": 48000.0,
                "hostapi": 0,
            },
        ]

    def OutputStream(self, **kw: Any) -> FakeStream:
        return FakeStream(self, **kw)

    def query_devices(self, device: Any = None, kind: str | None = None) -> Any:
        if device is None and kind is None:
            return self.devices
        return self.devices[2 if device is None else device]

    def query_hostapis(self) -> list[dict[str, Any]]:
        return [{"name": "ALSA"}]


@pytest.fixture()
def fake_sd(monkeypatch: pytest.MonkeyPatch) -> FakeSD:
    sd = FakeSD()
    monkeypatch.setitem(sys.modules, "sounddevice", sd)
    return sd


def test_list_and_resolve_devices(fake_sd: FakeSD) -> None:
    devs = playback.list_devices()
    assert [d["index"] for d in devs] == [1, 2, 3]
    assert [d["default"] for d in devs] == [False, True, False]
    assert devs[0]["max_output_channels"] == 2 and devs[0]["hostapi"] == "ALSA"
    assert playback.resolve_device(None) is None
    assert playback.resolve_device("  ") is None
    assert playback.resolve_device("3") == 3
    assert playback.resolve_device(1) == 1
    assert playback.resolve_device("hdmi") == 3
    assert playback.resolve_device("DEFAULT") == 2
    with pytest.raises(AudioError, match="no output device with index 0: run `csm play --list-devices`"):
        playback.resolve_device("0")  # an input-only device
    with pytest.raises(AudioError, match="no output device matches 'usb'.*list-devices"):
        playback.resolve_device("usb")
    with pytest.raises(AudioError, match="matches several output devices .*pass the index"):
        playback.resolve_device("hda intel")


def test_fast_producer_plays_everything_gaplessly(fake_sd: FakeSD) -> None:
    x = signal_wave(0.5)
    started = []
    played = playback.play_stream(chunked(x, 0.08), on_start=lambda: started.append(1))
    assert played == pytest.approx(len(x) / SR)
    (stream,) = fake_sd.streams
    assert started == [1] and stream.events[0] == "start" and stream.events[-1] == "close"
    assert "abort" not in stream.events
    got = stream.samples()
    assert not np.any(got == 12345)
    assert np.array_equal(got[: len(x) - FADE], to_int16(x)[:-FADE])  # starts at once, bit exact
    check_gapless(got, 0.5)


def test_slow_producer_with_expected_total_never_runs_dry(fake_sd: FakeSD) -> None:
    x = signal_wave(1.2)
    t0 = time.monotonic()
    t_start: list[float] = []
    playback.play_stream(
        chunked(x, 0.1, rate=0.5), expected_total_s=1.2, on_start=lambda: t_start.append(time.monotonic() - t0)
    )
    check_gapless(fake_sd.streams[0].samples(), 1.2)
    assert t_start and 1.2 < t_start[0] < 2.4  # waited, but not for the whole 2.4 s of production


def test_slow_producer_without_total_waits_for_all(fake_sd: FakeSD) -> None:
    x = signal_wave(0.6)
    t0 = time.monotonic()
    t_start: list[float] = []
    playback.play_stream(chunked(x, 0.1, rate=0.6), on_start=lambda: t_start.append(time.monotonic() - t0))
    assert t_start[0] >= 0.95
    check_gapless(fake_sd.streams[0].samples(), 0.6)


def test_underrun_outputs_silence_then_resumes(fake_sd: FakeSD) -> None:
    x = signal_wave(0.6)
    # lie about the rate and stall the 3rd chunk: the buffer must run dry once
    playback.play_stream(chunked(x, 0.1, stall=(3, 0.7)), rate_hint=5.0)
    got = fake_sd.streams[0].samples()
    assert not np.any(got == 12345)
    body = signal_part(got)
    assert max(zero_runs(body), default=0) > 0.1 * SR
    assert np.array_equal(body[body != 0][: len(x) - FADE], to_int16(x)[:-FADE])  # only silence added


def test_keyboard_interrupt_aborts_at_once(fake_sd: FakeSD) -> None:
    x = signal_wave(5.0)
    state: dict[str, Any] = {}
    timer = threading.Timer(0.3, _thread.interrupt_main)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        timer.start()
        playback.play_stream(chunked(x, 0.1, rate=3.0, state=state))
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0
    stream = fake_sd.streams[0]
    assert "abort" in stream.events and stream.events[-1] == "close" and not stream.active
    time.sleep(0.3)
    assert state.get("closed"), "the producer did not stop"
    assert len(stream.samples()) < 1.0 * SR


def test_producer_error_propagates(fake_sd: FakeSD) -> None:
    def broken():
        yield signal_wave(0.1)
        time.sleep(0.05)
        raise RuntimeError("model exploded")

    with pytest.raises(RuntimeError, match="model exploded"):
        playback.play_stream(broken(), rate_hint=5.0)
    assert fake_sd.streams[0].events[-1] == "close"


def test_empty_iterator_plays_nothing(fake_sd: FakeSD) -> None:
    assert playback.play_stream(iter([])) == 0.0
    assert fake_sd.streams[0].events == ["close"]


def test_device_rate_fallback_resamples(monkeypatch: pytest.MonkeyPatch) -> None:
    sd = FakeSD(rates=(48000,))
    monkeypatch.setitem(sys.modules, "sounddevice", sd)
    x = signal_wave(0.3)
    played = playback.play_stream(chunked(x, 0.1))
    assert sd.streams[0].samplerate == 48000
    assert played == pytest.approx(0.3, abs=0.01)
    assert abs(len(signal_part(sd.streams[0].samples())) - 2 * len(x)) < 200


def test_unopenable_device(monkeypatch: pytest.MonkeyPatch) -> None:
    sd = FakeSD(rates=())
    monkeypatch.setitem(sys.modules, "sounddevice", sd)
    with pytest.raises(AudioError, match="cannot open output device 1: .*--device"):
        playback.play_stream(iter([signal_wave(0.1)]), device="1")


def test_no_output_device_at_all(monkeypatch: pytest.MonkeyPatch) -> None:
    sd = FakeSD(rates=())
    sd.devices = [d for d in sd.devices if d["max_output_channels"] == 0]
    monkeypatch.setitem(sys.modules, "sounddevice", sd)
    assert playback.list_devices() == []
    with pytest.raises(AudioError, match="no audio output device found: .*csm say -o"):
        playback.play_stream(iter([signal_wave(0.1)]))
