"""Tests for csmcli.audio: PCM conversion, formats, atomic writes, streaming and reading."""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from csmcli import audio, formats
from csmcli.errors import AudioError, OptionsError

SR = audio.SAMPLE_RATE


def tone(seconds: float = 0.5, freq: float = 440.0, amp: float = 0.5, sr: int = SR) -> np.ndarray:
    """A float32 sine."""
    t = np.arange(round(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# --- to_int16 -------------------------------------------------------------------------------------


def test_to_int16_clips_instead_of_wrapping() -> None:
    out = audio.to_int16(np.array([1.5, -1.5, 1.0, -1.0, 0.0, 0.5], dtype=np.float32))
    assert out.dtype == np.int16
    assert out[0] == 32767 and out[2] == 32767
    assert out[1] == -32768 and out[3] == -32768
    assert out[4] == 0
    assert out[5] == 16384


def test_to_int16_handles_huge_and_float64() -> None:
    out = audio.to_int16(np.array([1e9, -1e9], dtype=np.float64))
    assert list(out) == [32767, -32768]


# --- formats.write_file / formats.encode ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["wav", "flac"])
def test_write_pcm16_roundtrip(tmp_path: Path, fmt: str) -> None:
    x = tone()
    x[10] = 1.7  # must clip, not wrap
    out = tmp_path / f"o.{fmt}"
    formats.write_file(out, x, fmt, SR)
    info = sf.info(out)
    assert info.samplerate == SR and info.channels == 1 and info.subtype == "PCM_16"
    assert info.format == fmt.upper()
    y, _ = sf.read(out, dtype="int16")
    assert np.array_equal(y, audio.to_int16(x))
    assert y[10] == 32767


def test_write_ogg_vorbis(tmp_path: Path) -> None:
    x = tone(1.0)
    out = tmp_path / "o.ogg"
    formats.write_file(out, x, "ogg", SR)
    info = sf.info(out)
    assert info.format == "OGG" and info.subtype == "VORBIS" and info.samplerate == SR
    y, _ = sf.read(out, dtype="float32")
    assert abs(len(y) - len(x)) < 100
    assert 0.3 < float(np.sqrt(np.mean(y**2))) < 0.4  # sine of amplitude 0.5: rms 0.354


def test_write_raw_is_headerless_s16le(tmp_path: Path) -> None:
    x = tone(0.1)
    out = tmp_path / "o.raw"
    formats.write_file(out, x, "raw", SR)
    data = out.read_bytes()
    assert len(data) == 2 * len(x)
    assert np.array_equal(np.frombuffer(data, dtype="<i2"), audio.to_int16(x))


def test_write_accepts_column_vector_and_str_path(tmp_path: Path) -> None:
    x = tone(0.1)[:, None]
    out = tmp_path / "o.wav"
    formats.write_file(str(out), x, "wav", SR)
    assert sf.info(out).frames == len(x)


def test_write_leaves_no_temp_files(tmp_path: Path) -> None:
    formats.write_file(tmp_path / "o.wav", tone(0.1), "wav", SR)
    assert [p.name for p in tmp_path.iterdir()] == ["o.wav"]


def test_write_file_mode_follows_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        formats.write_file(tmp_path / "o.wav", tone(0.1), "wav", SR)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "o.wav").stat().st_mode) == 0o644


def test_write_replaces_existing_file_atomically(tmp_path: Path) -> None:
    out = tmp_path / "o.wav"
    formats.write_file(out, tone(0.1), "wav", SR)
    formats.write_file(out, tone(0.2), "wav", SR)
    assert sf.info(out).frames == round(0.2 * SR)
    assert [p.name for p in tmp_path.iterdir()] == ["o.wav"]


def test_write_error_removes_temp_and_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "o.wav"
    out.write_bytes(b"old")

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(formats.Encoder, "feed", boom)
    with pytest.raises(AudioError, match="cannot write .*o.wav: no space left on device"):
        formats.write_file(out, tone(0.1), "wav", SR)
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["o.wav"]


def test_write_interrupt_removes_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt  # after the encoder has written the WAV header to the temp file

    monkeypatch.setattr(formats.Encoder, "feed", interrupted)
    with pytest.raises(KeyboardInterrupt):
        formats.write_file(tmp_path / "o.wav", tone(0.1), "wav", SR)
    assert list(tmp_path.iterdir()) == []


def test_write_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(AudioError) as err:
        formats.write_file(tmp_path / "nope" / "o.wav", tone(0.1), "wav", SR)
    assert str(err.value).startswith("cannot write ") and "no such file or directory" in str(err.value)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_write_unwritable_directory(tmp_path: Path) -> None:
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    try:
        with pytest.raises(AudioError, match="cannot write .*permission denied"):
            formats.write_file(d / "o.wav", tone(0.1), "wav", SR)
    finally:
        d.chmod(0o755)


def test_write_unwritable_directory_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(audio.tempfile, "mkstemp", denied)
    with pytest.raises(AudioError, match=r"^cannot write .*o\.wav: permission denied$"):
        formats.write_file(tmp_path / "o.wav", tone(0.1), "wav", SR)


def test_write_to_directory_path(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="directory"):
        formats.write_file(tmp_path, tone(0.1), "wav", SR)


def test_write_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(OptionsError, match="wav, raw, flac, ogg, mp3, opus, aac"):
        formats.write_file(tmp_path / "o.mp4", tone(0.1), "mp4", SR)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg"])
def test_encode_decodes(fmt: str) -> None:
    x = tone(0.3)
    data = formats.encode(x, fmt, SR)
    y, sr = sf.read(io.BytesIO(data), dtype="float32")
    assert sr == SR and abs(len(y) - len(x)) < 100


def test_encode_raw_and_rate() -> None:
    x = tone(0.1)
    assert formats.encode(x, "raw", SR) == audio.to_int16(x).astype("<i2").tobytes()
    data = formats.encode(tone(0.1, sr=16000), "wav", 16000)
    assert sf.info(io.BytesIO(data)).samplerate == 16000


def test_encode_empty_audio() -> None:
    y, sr = sf.read(io.BytesIO(formats.encode(np.zeros(0, np.float32), "wav", SR)))
    assert len(y) == 0 and sr == SR


# --- streaming ------------------------------------------------------------------------------------


def test_wav_stream_header_layout() -> None:
    h = audio.wav_header()
    assert len(h) == 44
    assert h[:4] == b"RIFF" and h[8:12] == b"WAVE" and h[12:16] == b"fmt " and h[36:40] == b"data"
    assert h[4:8] == b"\xff\xff\xff\xff" and h[40:44] == b"\xff\xff\xff\xff"
    assert int.from_bytes(h[24:28], "little") == SR
    assert int.from_bytes(h[22:24], "little") == 1  # mono
    assert int.from_bytes(h[34:36], "little") == 16


def test_streamed_wav_reads_back_whole_with_soundfile(tmp_path: Path) -> None:
    x = tone(1.0) + 0.0001
    pcm = audio.to_int16(x)
    out = tmp_path / "s.wav"
    out.write_bytes(audio.wav_header() + pcm.astype("<i2").tobytes())
    y, sr = sf.read(out, dtype="int16")
    assert sr == SR and len(y) == len(x)
    assert np.array_equal(y, pcm)


def test_streamed_wav_reads_back_whole_with_scipy(tmp_path: Path) -> None:
    wavfile = pytest.importorskip("scipy.io.wavfile")
    x = tone(1.0)
    pcm = audio.to_int16(x)
    out = tmp_path / "s.wav"
    out.write_bytes(audio.wav_header() + pcm.astype("<i2").tobytes())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", wavfile.WavFileWarning)  # "reached EOF prematurely": expected
        sr, y = wavfile.read(out)
    assert sr == SR and y.dtype == np.int16 and len(y) == len(x)
    assert np.array_equal(y, pcm)


# --- read_audio -----------------------------------------------------------------------------------


def test_read_audio_stereo_44k_downmix_resample(tmp_path: Path) -> None:
    left = tone(1.0, 300, 0.4, sr=44100)
    right = tone(1.0, 300, 0.2, sr=44100)
    p = tmp_path / "in.wav"
    sf.write(p, np.stack([left, right], axis=1), 44100, subtype="FLOAT")
    y = audio.read_audio(p)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - SR) <= 1
    ref = tone(1.0, 300, 0.3)
    mid = slice(1000, SR - 1000)
    assert np.max(np.abs(y[mid] - ref[mid])) < 2e-3


@pytest.mark.parametrize(
    ("fmt", "subtype", "rate"),
    [
        ("FLAC", "PCM_24", 48000),
        ("OGG", "VORBIS", 16000),
        ("WAV", "PCM_16", SR),
        ("MP3", None, 44100),
    ],
)
def test_read_audio_formats(tmp_path: Path, fmt: str, subtype: str | None, rate: int) -> None:
    if fmt not in sf.available_formats():
        pytest.skip(f"libsndfile {sf.__libsndfile_version__} has no {fmt}")
    p = tmp_path / f"in.{fmt.lower()}"
    x = tone(0.5, 440, 0.5, sr=rate)
    try:
        sf.write(p, x, rate, format=fmt, subtype=subtype)
    except sf.LibsndfileError as exc:
        pytest.skip(f"cannot write {fmt} here: {exc}")
    y = audio.read_audio(p)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - SR // 2) < 0.05 * SR  # mp3 pads a little
    assert 0.3 < float(np.sqrt(np.mean(y[2000:-2000] ** 2))) < 0.4


def test_read_audio_raw_is_s16le_24k(tmp_path: Path) -> None:
    x = tone(0.2)
    p = tmp_path / "in.raw"
    formats.write_file(p, x, "raw", SR)
    y = audio.read_audio(p)
    assert len(y) == len(x) and np.max(np.abs(y - x)) < 1e-4


def test_read_audio_roundtrip_is_exact_at_24k(tmp_path: Path) -> None:
    x = tone(0.2)
    p = tmp_path / "o.flac"
    formats.write_file(p, x, "flac", SR)
    y = audio.read_audio(p)
    assert np.array_equal(audio.to_int16(y), audio.to_int16(x))


def test_read_audio_missing(tmp_path: Path) -> None:
    with pytest.raises(AudioError) as err:
        audio.read_audio(tmp_path / "nope.wav")
    assert "\n" not in str(err.value) and "no such file" in str(err.value)


def test_read_audio_directory(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match="directory"):
        audio.read_audio(tmp_path)


def test_read_audio_garbage(tmp_path: Path) -> None:
    p = tmp_path / "bad.wav"
    p.write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(AudioError) as err:
        audio.read_audio(p)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("cannot read audio") and "WAV, FLAC, OGG or MP3" in msg


# --- concat / fade --------------------------------------------------------------------------------


def test_concat_with_pauses() -> None:
    a, b, c = np.ones(10, np.float32), 2 * np.ones(5, np.float32), 3 * np.ones(3, np.float32)
    out = audio.concat_with_pauses([a, b, c], 0.001)  # 24 samples
    assert out.dtype == np.float32
    assert len(out) == 10 + 24 + 5 + 24 + 3
    assert np.all(out[:10] == 1) and np.all(out[10:34] == 0) and np.all(out[34:39] == 2)
    assert np.all(out[39:63] == 0) and np.all(out[63:] == 3)


def test_concat_edge_cases() -> None:
    assert len(audio.concat_with_pauses([], 0.5)) == 0
    one = np.ones(7, np.float32)
    assert np.array_equal(audio.concat_with_pauses([one], 0.5), one)
    assert len(audio.concat_with_pauses([one, one], 0.0)) == 14
    with pytest.raises(OptionsError):
        audio.concat_with_pauses([one], -1.0)
