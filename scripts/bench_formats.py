"""Encode cost and streaming behaviour of every output format, and of libsndfile's own mp3/opus encoders.

Feeds 10 s of a speech-like signal (a sine with noise) to :class:`csmcli.formats.Encoder` in 80 ms chunks
(1920 samples at 24 kHz, one Mimi frame) and prints, per format: milliseconds of CPU per second of audio
(best of three), how many chunks went in before the first bytes came out, and kbit/s of the result.
The libsndfile rows encode the same audio with soundfile's MP3 and OPUS subtypes (the candidate not
chosen for those codecs) for comparison.
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import soundfile as sf

from csmcli import formats

SR = 24000
CHUNK = 1920


def signal(seconds: float) -> np.ndarray:
    """A 220 Hz sine with white noise: roughly the bitrate speech needs."""
    t = np.arange(round(seconds * SR)) / SR
    noise = np.random.default_rng(0).standard_normal(len(t)) * 0.05
    return (0.3 * np.sin(2 * np.pi * 220 * t) + noise).astype(np.float32)


def run_ours(x: np.ndarray, fmt: str) -> tuple[float, int | None, int]:
    """(seconds, chunks before the first bytes, total bytes) for one streamed encode."""
    start = time.perf_counter()
    enc = formats.Encoder(fmt, SR)
    first, total = None, 0
    for n, i in enumerate(range(0, len(x), CHUNK), 1):
        data = enc.feed(x[i : i + CHUNK])
        if data and first is None:
            first = n
        total += len(data)
    total += len(enc.finish())
    return time.perf_counter() - start, first, total


class _Sink(io.RawIOBase):
    """A growing in-memory file that libsndfile may seek in; counts bytes for the first-bytes figure."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.buf[self.pos : self.pos + len(b)] = b
        self.pos += len(b)
        return len(b)

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else len(self.buf) + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, size: int = -1) -> bytes:
        return b""

    def seekable(self) -> bool:
        return True


def run_libsndfile(x: np.ndarray, container: str, subtype: str) -> tuple[float, int | None, int]:
    """The same figures for soundfile's own encoder (first bytes: beyond the headers written at open)."""
    start = time.perf_counter()
    sink = _Sink()
    first = None
    with sf.SoundFile(sink, "w", samplerate=SR, channels=1, format=container, subtype=subtype) as f:
        opened = len(sink.buf)
        for n, i in enumerate(range(0, len(x), CHUNK), 1):
            f.write(x[i : i + CHUNK])
            if first is None and len(sink.buf) > opened:
                first = n
    return time.perf_counter() - start, first, len(sink.buf)


def main() -> None:
    """Print one row per format."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="audio length to encode")
    args = parser.parse_args()
    x = signal(args.seconds)
    rows = [(f"{name} ({fmt.encoder})", lambda name=name: run_ours(x, name)) for name, fmt in formats.FORMATS.items()]
    rows += [
        ("mp3 (libsndfile)", lambda: run_libsndfile(x, "MP3", "MPEG_LAYER_III")),
        ("opus (libsndfile)", lambda: run_libsndfile(x, "OGG", "OPUS")),
    ]
    print(f"{'format':20} {'ms per s audio':>14} {'first bytes after':>18} {'kbit/s':>8}")
    for label, fn in rows:
        results = [fn() for _ in range(3)]
        best = min(r[0] for r in results)
        _, first, size = results[0]
        after = f"{first} chunk(s)" if first else "the end"
        print(f"{label:20} {1000 * best / args.seconds:14.2f} {after:>18} {size * 8 / args.seconds / 1000:8.1f}")


if __name__ == "__main__":
    main()
