"""Tests for csmcli.formats: the format table, bitrates, the streaming encoder and ``csm say`` in every format.

Encoded audio is read back by a decoder other than the encoder's: libsndfile (soundfile) for everything it
reads, Debian's ``ffmpeg`` for AAC (skipped where it is not installed).
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from csmcli import formats
from csmcli.errors import OptionsError

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


# --- the table ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [("wav", "wav"), ("WAV", "wav"), (".flac", "flac"), ("pcm", "raw"), ("vorbis", "ogg"), ("adts", "aac")],
)
def test_lookup_names_and_aliases(name: str, expected: str) -> None:
    assert formats.lookup(name).name == expected


def test_lookup_unknown_is_one_line_listing_the_choices() -> None:
    with pytest.raises(OptionsError) as err:
        formats.lookup("mp4")
    assert str(err.value) == "unknown audio format 'mp4': use one of wav, raw, flac, ogg, mp3, opus, aac"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("a.wav", "wav"),
        ("A.WAV", "wav"),
        ("x/y.flac", "flac"),
        ("b.oga", "ogg"),
        ("d.pcm", "raw"),
        ("e.mp3", "mp3"),
        ("f.OPUS", "opus"),
        ("g.aac", "aac"),
        ("-", "wav"),
        (None, "wav"),
    ],
)
def test_for_path_extension(path: str | None, expected: str) -> None:
    assert formats.for_path(path, None) == expected


def test_for_path_explicit_wins_and_unknown_extension() -> None:
    assert formats.for_path("out.wav", "mp3") == "mp3"
    assert formats.for_path("-", "pcm") == "raw"
    for path in ("out.mp4", "out", "out.wav.bak"):
        with pytest.raises(OptionsError) as err:
            formats.for_path(path, None)
        msg = str(err.value)
        assert "\n" not in msg and ".wav, .raw, .flac, .ogg, .mp3, .opus or .aac" in msg and "--format" in msg


def test_extension_mime_and_help_come_from_the_table() -> None:
    assert [formats.extension(f) for f in ("wav", "pcm", "opus", "aac")] == [".wav", ".raw", ".opus", ".aac"]
    assert formats.mime("raw", 16000) == "audio/pcm;rate=16000;channels=1;encoding=s16le"
    assert formats.mime("mp3", SR) == "audio/mpeg" and formats.mime("opus", SR).startswith("audio/ogg")
    assert formats.choices_help().startswith("wav|raw|flac|ogg|mp3|opus|aac ")
    assert "flac is written whole" in formats.choices_help()
    assert "mp3 128k default, opus 64k default, aac 128k default" in formats.bitrate_help()


# --- bitrates -------------------------------------------------------------------------------------


def test_bitrate_defaults_and_parsing() -> None:
    assert [formats.check_bitrate(f, None) for f in ("mp3", "opus", "aac", "wav", "ogg")] == [
        128_000,
        64_000,
        128_000,
        None,
        None,
    ]
    assert formats.check_bitrate("mp3", "96k") == 96_000
    assert formats.check_bitrate("opus", "24000") == 24_000
    assert formats.check_bitrate("aac", 144_000) == 144_000


@pytest.mark.parametrize(
    ("fmt", "value", "message"),
    [
        ("mp3", "97k", "bad mp3 bitrate '97k': use one of 8k, 16k, 24k,"),
        ("mp3", "192k", "144k, 160k (bits/s, e.g. 128k)"),
        ("opus", "5k", "bad opus bitrate '5k': use 6k to 256k"),
        ("aac", "fast", "bad aac bitrate 'fast': use 16k to 144k"),
        ("flac", "96k", "bitrate does not apply to flac: only mp3, opus, aac take a bitrate"),
        ("raw", "96k", "bitrate does not apply to raw"),
    ],
)
def test_bad_bitrate_is_one_line(fmt: str, value: str, message: str) -> None:
    with pytest.raises(OptionsError) as err:
        formats.Encoder(fmt, SR, value)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("fmt", "low", "high"), [("mp3", "8k", "160k"), ("opus", "6k", "256k"), ("aac", "16k", "144k")]
)
def test_bitrate_ends_encode_and_set_the_size(fmt: str, low: str, high: str) -> None:
    x = tone(2.0)
    small, big = formats.encode(x, fmt, SR, low), formats.encode(x, fmt, SR, high)
    for data in (small, big):
        check_decodes(data, fmt, len(x), SLACK[fmt])
    assert len(big) > 3 * len(small)


def test_mp3_bitrate_is_what_was_asked() -> None:
    x = tone(4.0)
    data = formats.encode(x, "mp3", SR, "96k")
    assert abs(len(data) * 8 / 4.0 - 96_000) < 96_000 * 0.05


# --- the encoder ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(formats.FORMATS))
def test_every_format_streams_and_decodes_back(fmt: str) -> None:
    x = tone(noise=0.05)
    parts = stream(x, fmt)
    whole = formats.encode(x, fmt, SR)
    n_whole = check_decodes(whole, fmt, len(x), SLACK[fmt])
    n_streamed = check_decodes(b"".join(parts), fmt, len(x), STREAMED_SLACK[fmt])
    if STREAMED_SLACK[fmt] == SLACK[fmt]:
        assert n_streamed == n_whole
    if formats.lookup(fmt).streamable:
        first = next(i for i, p in enumerate(parts) if p)
        assert first < FIRST_BYTES_AFTER.get(fmt, 1), f"{fmt}: first bytes only after chunk {first + 1}"
        sent = sum(1 for p in parts[:-1] if p)
        assert sent >= (2 if fmt in PAGED else len(parts) // 2), f"{fmt}: bytes must leave while the audio is fed"
    else:
        assert not any(parts[:-1]) and parts[-1] == whole


def test_streamed_wav_has_one_header_of_unknown_length_and_whole_wav_exact_sizes() -> None:
    x = tone(0.5)
    streamed = b"".join(stream(x, "wav"))
    whole = formats.encode(x, "wav", SR)
    assert streamed.count(b"RIFF") == 1 and streamed[4:8] == b"\xff\xff\xff\xff"
    assert int.from_bytes(whole[4:8], "little") == len(whole) - 8
    assert int.from_bytes(whole[40:44], "little") == 2 * len(x)
    assert streamed[44:] == whole[44:]


def test_ogg_streams_are_one_logical_stream() -> None:
    for fmt in ("ogg", "opus"):
        data = b"".join(stream(tone(), fmt))
        pages = data.split(b"OggS")[1:]
        # Header type byte (offset 1 after the capture pattern's version byte): 0x02 marks a stream's first page.
        assert sum(1 for p in pages if p[1] & 0x02) == 1, fmt


def test_loud_input_is_clipped_not_wrapped() -> None:
    x = tone(0.5, amp=3.0)
    for fmt in ("wav", "flac", "mp3"):
        y, _, _ = decode(formats.encode(x, fmt, SR), fmt)
        assert float(np.abs(y).max()) <= 1.1 and float(np.mean(np.abs(y))) > 0.5, fmt


def test_encoder_to_a_file_fixes_the_header(tmp_path: Path) -> None:
    x = tone()
    for fmt in ("wav", "mp3"):
        path = tmp_path / f"o.{fmt}"
        with open(path, "wb") as f:
            enc = formats.Encoder(fmt, SR, out=f)
            assert [enc.feed(x[i : i + CHUNK]) for i in range(0, len(x), CHUNK)] == [b""] * 16
            assert enc.finish() == b""
        y, rate = sf.read(path)
        assert rate == SR and len(y) == len(x), fmt  # mp3: the LAME header carries the delay and padding


def test_empty_input_is_a_valid_empty_file() -> None:
    for fmt in ("wav", "ogg"):
        y, rate, _ = decode(formats.encode(np.zeros(0, np.float32), fmt, SR), fmt)
        assert len(y) == 0 and rate == SR, fmt


def test_write_file_writes_every_format(tmp_path: Path) -> None:
    x = tone(0.5)
    for name, fmt in formats.FORMATS.items():
        path = tmp_path / f"o{fmt.extensions[0]}"
        formats.write_file(path, x, formats.for_path(path, None), SR)
        check_decodes(path.read_bytes(), name, len(x), SLACK[name])
    assert len(list(tmp_path.iterdir())) == len(formats.FORMATS)


# --- csm say --------------------------------------------------------------------------------------

BASE = ["--device", "cpu", "--dtype", "float32", "--max-audio-ms", "400", "--seed", "3", "-q"]
N = 5 * CHUNK  # 400 ms


@pytest.fixture()
def say(tiny_dir, cli_env, monkeypatch, capsysbinary):
    """Run ``csm say TEXT ARGS`` in this process (as ``main`` does): (exit code, stdout bytes, stderr text)."""
    from csmcli.cli import main

    for key, value in cli_env.items():
        monkeypatch.setenv(key, value)

    def run(*args: str) -> tuple[int, bytes, str]:
        capsysbinary.readouterr()
        with pytest.raises(SystemExit) as done:
            main(["say", "Hello there.", "-m", str(tiny_dir), *BASE, *args])
        out, err = capsysbinary.readouterr()
        return done.value.code, out, err.decode()

    return run


@pytest.mark.parametrize("fmt", list(formats.FORMATS))
def test_say_every_format_to_file_and_stdout(say, tmp_path, fmt) -> None:
    out = tmp_path / f"hello{formats.extension(fmt)}"
    code, _, err = say("-o", str(out))
    assert code == 0, err
    check_decodes(out.read_bytes(), fmt, N, SLACK[fmt])
    code, data, err = say("-o", "-", "--format", fmt)
    assert code == 0, err
    check_decodes(data, fmt, N, STREAMED_SLACK[fmt])
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_say_bitrate_sets_the_mp3_size(say, tmp_path) -> None:
    sizes = []
    for rate in ("32k", "160k"):
        out = tmp_path / f"{rate}.mp3"
        code, _, err = say("-o", str(out), "--bitrate", rate)
        assert code == 0, err
        sizes.append(out.stat().st_size)
    assert sizes[1] > 3 * sizes[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "mp4"], "unknown audio format 'mp4': use one of wav, raw, flac, ogg, mp3, opus, aac"),
        (["--bitrate", "97k", "--format", "mp3"], "bad mp3 bitrate '97k': use one of 8k,"),
        (["--bitrate", "96k", "--format", "wav"], "bitrate does not apply to wav: only mp3, opus, aac"),
        (["--bitrate", "96k"], "bitrate does not apply to wav"),
    ],
)
def test_say_bad_format_or_bitrate_is_one_line(say, tmp_path, args, message) -> None:
    out = tmp_path / "x.wav"
    code, data, err = say("-o", str(out), *args)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and data == b""


def test_say_streams_opus_through_a_pipe(tiny_dir, cli_env) -> None:
    """The real command with stdout a pipe: the Ogg Opus bytes it streams are one file."""
    proc = subprocess.run(
        [sys.executable, "-m", "csmcli", "say", "Hello there.", "-m", str(tiny_dir), "-o", "-", "--format", "opus"]
        + ["--bitrate", "32k", *BASE],
        capture_output=True,
        env=cli_env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    check_decodes(proc.stdout, "opus", N, STREAMED_SLACK["opus"])


def test_batch_out_names_take_every_format_extension() -> None:
    from csmcli.dialog import check_out_name

    for fmt in formats.FORMATS.values():
        check_out_name(f"part/one{fmt.extensions[0]}")
    with pytest.raises(ValueError) as err:
        check_out_name("one.mp4")
    assert (
        str(err.value) == "'out' needs an audio extension (.wav, .raw, .flac, .ogg, .mp3, .opus or .aac), got 'one.mp4'"
    )
