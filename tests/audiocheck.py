"""Checks shared by the format tests: independent decoders, durations, the streaming encoder's output.

Encoded audio is read back by a decoder other than the encoder's: libsndfile (soundfile) for everything it
reads, Debian's ``ffmpeg``/``ffprobe`` for AAC (the test is skipped where they are not installed).
"""

from __future__ import annotations

import io
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from csmcli import formats

SR = 24000
CHUNK = 1920  # one 80 ms Mimi frame

#: Samples a decoder may return beyond the input: one codec frame, plus the encoder's priming where the
#: stream carries no gapless header (ADTS never does; a streamed mp3 has no LAME header).
SLACK = {"wav": 0, "raw": 0, "flac": 0, "ogg": 0, "opus": 480, "mp3": 576, "aac": 1024 + 1024}
STREAMED_SLACK = {**SLACK, "mp3": 1105 + 576}
#: Chunks fed before the first bytes leave: AAC's encoder looks 1024 samples ahead.
FIRST_BYTES_AFTER = {"aac": 2}
#: libsndfile writes Vorbis in whole Ogg pages (about 4 KB), so an Ogg Vorbis stream leaves in steps of ~0.5 s.
PAGED = {"ogg"}


def tone(seconds: float = 1.23, freq: float = 330.0, amp: float = 0.4, noise: float = 0.0) -> np.ndarray:
    """A float32 sine at 24 kHz, with white ``noise`` of that rms added (speech-like bitrates)."""
    t = np.arange(round(seconds * SR)) / SR
    hiss = np.random.default_rng(0).standard_normal(len(t)) * noise
    return (amp * np.sin(2 * np.pi * freq * t) + hiss).astype(np.float32)


def decode(data: bytes, fmt: str) -> tuple[np.ndarray, int, int]:
    """``data`` decoded by an independent decoder: (float samples of channel 0, sample rate, channels)."""
    if fmt == "raw":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768, SR, 1
    if fmt == "aac":
        if shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None:
            pytest.skip("Debian's ffmpeg (ffprobe) is not installed")
        probe = subprocess.run(
            [
                "ffprobe",
                "-v",
                "error",
                "-show_entries",
                "stream=sample_rate,channels,codec_name",
                "-of",
                "csv=p=0",
                "-",
            ],
            input=data,
            capture_output=True,
            check=True,
        )
        codec, rate, channels = probe.stdout.decode().strip().split(",")
        assert codec == "aac"
        pcm = subprocess.run(
            ["ffmpeg", "-v", "error", "-i", "-", "-f", "s16le", "-"], input=data, capture_output=True, check=True
        )
        return np.frombuffer(pcm.stdout, dtype="<i2").astype(np.float32) / 32768, int(rate), int(channels)
    y, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return y[:, 0], rate, y.shape[1]


def check_decodes(data: bytes, fmt: str, n: int, slack: int) -> int:
    """``data`` decodes as mono 24 kHz, not silent, ``n`` to ``n + slack`` samples long; the length."""
    y, rate, channels = decode(data, fmt)
    assert (rate, channels) == (SR, 1)
    assert n <= len(y) <= n + slack, (fmt, len(y), n)
    assert float(np.sqrt(np.mean(y**2))) > 0.01
    return len(y)


def stream(x: np.ndarray, fmt: str, bitrate: str | None = None) -> list[bytes]:
    """What the streaming encoder hands back after each 80 ms chunk, then at finish."""
    enc = formats.Encoder(fmt, SR, bitrate)
    parts = [enc.feed(x[i : i + CHUNK]) for i in range(0, len(x), CHUNK)]
    return [*parts, enc.finish()]
