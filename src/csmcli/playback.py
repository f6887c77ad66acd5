"""Speaker output for ``csm play``: gapless playback of audio that is still being generated.

A producer thread pulls float32 mono chunks from an iterator (the model, possibly slower than real
time) into a thread-safe buffer; a ``sounddevice.OutputStream`` callback plays the buffer back to back.
Playback starts only once, at the measured production rate, the rest of the audio will arrive before
the buffer runs dry (:func:`ready_to_play`). ``sounddevice`` (and so PortAudio) is imported lazily.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from types import ModuleType
from typing import Any

import numpy as np

from .audio import SAMPLE_RATE, to_int16
from .errors import AudioError

log = logging.getLogger(__name__)

#: A producer at least this many times faster than real time starts playing after its first chunk.
FAST_RATE = 1.1
#: Length of the fade-out applied to the very end of the audio (seconds).
END_FADE_S = 0.005
#: How a user lists output devices (named in "unknown device" errors).
LIST_DEVICES_HINT = "run `csm play --list-devices` to see them"
#: Controller polling interval (seconds).
_POLL_S = 0.02


def _sounddevice() -> ModuleType:
    """Import ``sounddevice``, turning a missing PortAudio into a one-line AudioError."""
    try:
        import sounddevice
    except OSError:
        raise AudioError(
            "PortAudio library not found: install it (e.g. `apt-get install libportaudio2`, "
            "`brew install portaudio`) or write to a file with `csm say -o out.wav`"
        ) from None
    except ImportError:
        raise AudioError("the sounddevice package is missing: run `pip install sounddevice`") from None
    return sounddevice


# --- devices --------------------------------------------------------------------------------------


def _default_output_index(sd: ModuleType) -> int | None:
    """Index of the default output device, or None when there is none."""
    with_default = sd.default.device
    try:
        idx = with_default[1]
    except (TypeError, IndexError):
        idx = with_default
    if isinstance(idx, int) and idx >= 0:
        return idx
    try:
        info = sd.query_devices(kind="output")
    except Exception:  # PortAudioError when no default output exists
        return None
    idx = info.get("index") if isinstance(info, dict) else None
    return idx if isinstance(idx, int) else None


def list_devices() -> list[dict[str, Any]]:
    """Output devices: ``index``, ``name``, ``max_output_channels``, ``default_samplerate``,
    ``hostapi`` and ``default`` (True for the default output)."""
    sd = _sounddevice()
    try:
        devices = sd.query_devices()
        hostapis = sd.query_hostapis()
    except sd.PortAudioError as exc:
        raise AudioError(f"cannot list audio devices: {exc}; check that a sound server/card is available") from None
    default = _default_output_index(sd)
    out = []
    for i, dev in enumerate(devices):
        if dev["max_output_channels"] <= 0:
            continue
        api = dev.get("hostapi")
        out.append(
            {
                "index": i,
                "name": dev["name"],
                "max_output_channels": int(dev["max_output_channels"]),
                "default_samplerate": float(dev.get("default_samplerate") or 0.0),
                "hostapi": hostapis[api]["name"] if isinstance(api, int) and api < len(hostapis) else "",
                "default": i == default,
            }
        )
    return out


def resolve_device(spec: str | int | None) -> int | None:
    """Output device index for ``spec``: None (system default), an index, or a case-insensitive
    (substring of a) device name. An exact name match wins over substring matches."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    devices = list_devices()
    text = str(spec).strip()
    if isinstance(spec, int) or text.lstrip("-").isdigit():
        idx = int(text)
        if any(d["index"] == idx for d in devices):
            return idx
        raise AudioError(f"no output device with index {idx}: {LIST_DEVICES_HINT}")
    want = text.lower()
    exact = [d for d in devices if d["name"].lower() == want]
    if exact:
        return exact[0]["index"]
    found = [d for d in devices if want in d["name"].lower()]
    if len(found) == 1:
        return found[0]["index"]
    if not found:
        raise AudioError(f"no output device matches '{text}': {LIST_DEVICES_HINT}")
    names = ", ".join(f"{d['index']}: {d['name']}" for d in found[:6])
    raise AudioError(f"'{text}' matches several output devices ({names}): pass the index instead")


# --- start decision -------------------------------------------------------------------------------


def ready_to_play(
    buffered_s: float,
    produced_s: float,
    rate: float | None,
    *,
    done: bool,
    expected_total_s: float | None = None,
    margin_s: float = 0.0,
    min_buffer_s: float = 0.0,
    fast_rate: float = FAST_RATE,
) -> bool:
    """Whether playback can start (or resume after running dry) without the buffer running dry again.

    ``buffered_s``: audio waiting to be played; ``produced_s``: audio produced so far; ``rate``: audio
    seconds produced per wall second (None: not known yet). Nothing starts with less than
    ``min_buffer_s`` buffered (what the device pulls in at once when it starts); beyond that a
    producer at ``fast_rate`` or more starts at once. A slower one needs
    ``remaining * (fast_rate / rate - 1)`` seconds buffered (the rate is derated by ``fast_rate`` as
    a safety factor) plus ``margin_s`` (chunk size, device latency); with no ``expected_total_s``
    the remaining length is unknown, so it waits for the end.
    """
    if done:
        return True
    if buffered_s <= 0.0 or buffered_s < min_buffer_s or rate is None or rate <= 0.0:
        return False
    if rate >= fast_rate:
        return True
    if expected_total_s is None:
        return False
    remaining = max(expected_total_s - produced_s, 0.0)
    return buffered_s >= remaining * (fast_rate / rate - 1.0) + margin_s


class RateMeter:
    """Production rate (audio seconds per wall second) measured from chunk arrival times.

    Startup latency (time to the first chunk) is excluded once a second chunk has arrived: the rate
    is then the audio after the first chunk over the time since it. Before that ``rate_hint`` is
    used, or the rate since ``start`` if that alone already shows a fast producer.
    """

    def __init__(self, rate_hint: float | None = None, start: float | None = None) -> None:
        """Start measuring now (or at ``start``, a ``time.monotonic()`` value)."""
        self.rate_hint = rate_hint
        self.start = time.monotonic() if start is None else start
        self.produced_s = 0.0
        self.chunks = 0
        self.max_chunk_s = 0.0
        self._first_t = 0.0
        self._first_s = 0.0
        self._last_t = 0.0

    def add(self, seconds: float, now: float | None = None) -> None:
        """Record a chunk of ``seconds`` of audio arriving at ``now``."""
        now = time.monotonic() if now is None else now
        if self.chunks == 0:
            self._first_t, self._first_s = now, seconds
        self.chunks += 1
        self.produced_s += seconds
        self.max_chunk_s = max(self.max_chunk_s, seconds)
        self._last_t = now

    def rate(self) -> float | None:
        """The current estimate, or None when there is nothing to go on yet."""
        if self.chunks >= 2 and self._last_t > self._first_t:
            return (self.produced_s - self._first_s) / (self._last_t - self._first_t)
        if self.rate_hint is not None:
            return self.rate_hint
        if self.chunks == 1:
            overall = self.produced_s / max(self._first_t - self.start, 1e-6)
            if overall >= FAST_RATE:  # a lower bound (it includes startup), so only trust it when fast
                return overall
        return None


# --- buffer ---------------------------------------------------------------------------------------


class _Buffer:
    """Thread-safe FIFO of int16 chunks between the producer thread and the audio callback."""

    def __init__(self) -> None:
        """Empty, not playing."""
        self.cond = threading.Condition()
        self._chunks: deque[np.ndarray] = deque()
        self._offset = 0
        self.buffered = 0  # samples not yet played
        self.played = 0  # real (non-silence) samples handed to the device
        self.done = False
        self.starved = False  # ran dry before the end; silence until the controller resumes it
        self.underruns = 0

    def push(self, samples: np.ndarray) -> None:
        """Append int16 ``samples``."""
        if len(samples) == 0:
            return
        with self.cond:
            self._chunks.append(samples)
            self.buffered += len(samples)
            self.cond.notify_all()

    def finish(self, fade_samples: int) -> None:
        """Mark the end of the audio; fade out its last ``fade_samples`` (of what is still unplayed)."""
        with self.cond:
            left = min(fade_samples, self.buffered)
            if left > 0:
                ramp = np.linspace(1.0, 0.0, left + 1, dtype=np.float32)[1:]
                pos = left
                for i in range(len(self._chunks) - 1, -1, -1):
                    chunk = self._chunks[i]
                    usable = len(chunk) - (self._offset if i == 0 else 0)
                    take = min(usable, pos)
                    seg = chunk[len(chunk) - take :].astype(np.float32)
                    chunk[len(chunk) - take :] = np.round(seg * ramp[pos - take : pos]).astype(np.int16)
                    pos -= take
                    if pos == 0:
                        break
            self.done = True
            self.cond.notify_all()

    def read_into(self, out: np.ndarray) -> int:
        """Fill ``out`` (int16) with the next samples, silence past the end; returns real samples."""
        with self.cond:
            n = 0
            if not self.starved:
                want = len(out)
                while n < want and self._chunks:
                    chunk = self._chunks[0]
                    take = min(want - n, len(chunk) - self._offset)
                    out[n : n + take] = chunk[self._offset : self._offset + take]
                    n += take
                    self._offset += take
                    if self._offset == len(chunk):
                        self._chunks.popleft()
                        self._offset = 0
                self.buffered -= n
                self.played += n
                if n < want and not self.done:
                    self.starved = True
                    self.underruns += 1
            out[n:] = 0
            return n

    @property
    def drained(self) -> bool:
        """All audio produced and played."""
        return self.done and self.buffered == 0


# --- playback -------------------------------------------------------------------------------------


def _as_mono(chunk: Any) -> np.ndarray:
    """A chunk (array, or object with ``.samples``) as 1-D float32."""
    data = getattr(chunk, "samples", chunk)
    if hasattr(data, "detach"):  # a torch tensor
        data = data.detach().float().cpu().numpy()
    a = np.asarray(data, dtype=np.float32)
    if a.ndim == 2:
        a = a.mean(axis=1) if a.shape[1] <= 8 else a.mean(axis=0)
    return a.reshape(-1)


def _open_stream(
    sd: ModuleType,
    device: int | None,
    sample_rate: int,
    callback: Callable[..., None],
    finished: Callable[[], None],
    latency: float | str | None,
) -> tuple[Any, int]:
    """Open a mono int16 output stream at ``sample_rate``, else at the device's own rate."""
    kwargs = dict(
        channels=1,
        dtype="int16",
        device=device,
        callback=callback,
        finished_callback=finished,
        latency=latency if latency is not None else "high",
    )
    try:
        return sd.OutputStream(samplerate=sample_rate, **kwargs), sample_rate
    except sd.PortAudioError as first:
        try:
            rate = int(sd.query_devices(device, kind="output")["default_samplerate"])
        except Exception:
            rate = 0
        if rate and rate != sample_rate:
            try:
                return sd.OutputStream(samplerate=rate, **kwargs), rate
            except sd.PortAudioError:
                pass
        try:
            none = not list_devices()
        except AudioError:
            none = True
        if none:
            raise AudioError(
                "no audio output device found: enable a sound card or sound server, "
                "or write to a file with `csm say -o out.wav`"
            ) from None
        name = "the default output device" if device is None else f"output device {device}"
        raise AudioError(f"cannot open {name}: {first}; pick another with --device ({LIST_DEVICES_HINT})") from None


def play_stream(
    chunks: Iterable[Any],
    *,
    device: str | int | None = None,
    sample_rate: int = SAMPLE_RATE,
    rate_hint: float | None = None,
    expected_total_s: float | None = None,
    on_start: Callable[[], None] | None = None,
    latency: float | str | None = None,
) -> float:
    """Play float32 mono ``chunks`` as they are produced; returns the seconds of audio played.

    Chunks are contiguous audio, played back to back (only a 5 ms fade-out at the very end). Start is
    held back until, at the measured production rate, the rest will arrive in time (see
    :func:`ready_to_play`; ``rate_hint`` and ``expected_total_s`` let it decide earlier). Should the
    buffer still run dry, silence plays until enough is buffered again. Returns after the last
    sample has been played. KeyboardInterrupt aborts the stream at once, stops the producer and
    propagates. ``on_start`` is called when sound starts.
    """
    sd = _sounddevice()
    dev = resolve_device(device) if isinstance(device, str) else device
    buf = _Buffer()
    finished = threading.Event()
    stop = threading.Event()
    failure: list[BaseException] = []

    def callback(outdata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        buf.read_into(outdata[:, 0])
        if buf.drained:
            raise sd.CallbackStop

    stream, out_rate = _open_stream(sd, dev, sample_rate, callback, finished.set, latency)
    meter = RateMeter(rate_hint)
    resampler = None
    if out_rate != sample_rate:
        import soxr

        resampler = soxr.ResampleStream(sample_rate, out_rate, 1, dtype="float32", quality="HQ")

    def produce() -> None:
        iterator: Iterator[Any] = iter(chunks)
        try:
            for chunk in iterator:
                mono = _as_mono(chunk)
                meter.add(len(mono) / sample_rate)
                if resampler is not None:
                    mono = resampler.resample_chunk(mono)
                buf.push(to_int16(mono))
                if stop.is_set():
                    break
            else:
                if resampler is not None:
                    buf.push(to_int16(resampler.resample_chunk(np.zeros(0, np.float32), last=True)))
        except BaseException as exc:
            failure.append(exc)
        finally:
            close = getattr(iterator, "close", None)
            if stop.is_set() and close is not None:
                try:
                    close()
                except Exception:
                    log.debug("closing the chunk iterator failed", exc_info=True)
            buf.finish(round(END_FADE_S * out_rate))

    def ready() -> bool:
        # On start (and after running dry) the device pulls in about its whole buffer at once:
        # PortAudio/ALSA 'high' latency fills ~1.5x the reported latency in back-to-back callbacks.
        lat = float(getattr(stream, "latency", 0.0) or 0.0)
        fill = 2.0 * lat + 0.02
        return ready_to_play(
            buf.buffered / out_rate,
            meter.produced_s,
            meter.rate(),
            done=buf.done,
            expected_total_s=expected_total_s,
            margin_s=meter.max_chunk_s + fill,
            min_buffer_s=fill,
        )

    def check_failure() -> None:
        if failure:
            raise failure[0]

    producer = threading.Thread(target=produce, name="csm-playback-producer", daemon=True)
    try:
        producer.start()
        with buf.cond:
            while not ready():
                buf.cond.wait(_POLL_S)
                check_failure()
        check_failure()
        if buf.played == 0 and buf.drained:
            return 0.0
        stream.start()
        if on_start is not None:
            on_start()
        underruns = 0
        deadline = None
        while not finished.wait(_POLL_S):
            check_failure()
            with buf.cond:
                if buf.starved and ready():
                    buf.starved = False
                if buf.underruns != underruns:
                    underruns = buf.underruns
                    log.debug("playback ran dry (%d times); buffering", underruns)
                if buf.drained and deadline is None:
                    deadline = time.monotonic() + 2.0 + float(stream.latency or 0.0)
            if deadline is not None and (time.monotonic() > deadline or not stream.active):
                break
        check_failure()
        stream.stop(ignore_errors=True)
        return buf.played / out_rate
    except BaseException:
        stop.set()
        stream.abort(ignore_errors=True)
        raise
    finally:
        stop.set()
        stream.close(ignore_errors=True)
        producer.join(timeout=0.5)
