"""`csm say` end to end through the real command (subprocess) on the tiny checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

BASE = ["--device", "cpu", "--dtype", "float32", "--max-audio-ms", "480", "-q"]


def csm(args: list[str], env: dict, stdin: bytes | None = None, module: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "csmcli"] if module else ["csm"]
    return subprocess.run(cmd + args, input=stdin, capture_output=True, env=env, timeout=300)


def read(path: Path) -> np.ndarray:
    data, rate = sf.read(str(path), dtype="float32")
    assert rate == 24000 and data.ndim == 1
    return data


@pytest.mark.parametrize("ext", ["wav", "flac", "ogg"])
def test_formats_from_extension(tiny_dir, cli_env, tmp_path, ext) -> None:
    out = tmp_path / f"hello.{ext}"
    r = csm(["say", "Hello from CSM.", "-m", str(tiny_dir), "-o", str(out), "--seed", "3", *BASE], cli_env)
    assert r.returncode == 0, r.stderr.decode()
    audio = read(out)
    assert len(audio) == 6 * 1920
    assert np.abs(audio).max() > 1e-3


def test_raw_to_stdout_stdin_text_and_python_m(tiny_dir, cli_env, tmp_path) -> None:
    r = csm(
        ["say", "-m", str(tiny_dir), "-o", "-", "--format", "raw", "--seed", "3", *BASE],
        cli_env,
        stdin=b"Hello from CSM.\n",
        module=True,
    )
    assert r.returncode == 0, r.stderr.decode()
    assert b"16-bit" in r.stderr
    pcm = np.frombuffer(r.stdout, dtype="<i2")
    assert len(pcm) == 6 * 1920
    wav = tmp_path / "same.wav"
    r2 = csm(["say", "Hello from CSM.", "-m", str(tiny_dir), "-o", str(wav), "--seed", "3", *BASE], cli_env)
    assert r2.returncode == 0
    expected = sf.read(str(wav), dtype="int16")[0]
    assert np.array_equal(pcm, expected), "stdin + raw stdout differs from the same request to a file"


def test_wav_to_stdout_reads_whole(tiny_dir, cli_env, tmp_path) -> None:
    r = csm(["say", "Hi there.", "-m", str(tiny_dir), "-o", "-", *BASE], cli_env)
    assert r.returncode == 0, r.stderr.decode()
    path = tmp_path / "piped.wav"
    path.write_bytes(r.stdout)
    assert len(read(path)) == 6 * 1920


def test_text_file_seed_reproducible_and_speakers_differ(tiny_dir, cli_env, tmp_path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("The same words, twice.\n")
    outs = []
    for i, extra in enumerate((["--seed", "7"], ["--seed", "7"], ["--seed", "7", "--speaker", "1"], ["--seed", "8"])):
        out = tmp_path / f"{i}.wav"
        r = csm(["say", "-f", str(text), "-m", str(tiny_dir), "-o", str(out), *BASE, *extra], cli_env)
        assert r.returncode == 0, r.stderr.decode()
        outs.append(read(out))
    assert np.array_equal(outs[0], outs[1]), "same seed, different audio"
    assert not np.array_equal(outs[0], outs[2]), "speaker 0 and 1 gave the same audio"
    assert not np.array_equal(outs[0], outs[3]), "different seeds gave the same audio"


def test_greedy_is_deterministic_without_seed(tiny_dir, cli_env, tmp_path) -> None:
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    for out in (a, b):
        r = csm(["say", "Greedy.", "-m", str(tiny_dir), "-o", str(out), "--temperature", "0", *BASE], cli_env)
        assert r.returncode == 0, r.stderr.decode()
    assert np.array_equal(read(a), read(b))


BAD = [
    (["say", "", "-o", "{out}"], "text is empty"),
    (["say", "   ", "-o", "{out}"], "text is empty"),
    (["say", "hi", "--speaker", "2", "-o", "{out}"], "speaker must be 0 or 1"),
    (["say", "hi", "--temperature", "-1", "-o", "{out}"], "temperature must be"),
    (["say", "hi", "--top-p", "0", "-o", "{out}"], "top_p must be in (0, 1]"),
    (["say", "hi", "--top_p", "1.5", "-o", "{out}"], "top_p must be in (0, 1]"),
    (["say", "hi", "--top-k", "0", "-o", "{out}"], "top_k must be between 1 and 2051"),
    (["say", "hi", "--format", "mp4", "-o", "{out}"], "format"),
    (["say", "hi", "-o", "{tmp}/missing/dir/x.wav"], "does not exist"),
    (["say", "hi", "-o", "{tmp}", "--format", "wav"], "is a directory"),
    (["say", "hi", "-m", "{tmp}/no-such-model", "-o", "{out}"], "model directory not found"),
    (["say", "hi", "-m", "{tmp}", "-o", "{out}"], "not a CSM checkpoint"),
    (["say", "hi", "-m", "someone/not-cached", "-o", "{out}"], "not in the local hub cache"),
    (["say", "hi", "--voice", "nobody", "-o", "{out}"], "unknown voice"),
    (["say", "hi", "--device", "tpu", "-o", "{out}"], "device must be one of"),
    (["say", "hi", "--quantize", "int3", "-o", "{out}"], "quantize must be one of none, int8, int4"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[b[1][:24] for b in BAD])
def test_bad_input_is_one_line_error(tiny_dir, cli_env, tmp_path, args, message) -> None:
    out = tmp_path / "out.wav"
    filled = [a.format(out=out, tmp=tmp_path) for a in args]
    if "-m" not in filled:
        filled += ["-m", str(tiny_dir)]
    r = csm([*filled, "--device", "cpu", "-q"] if "--device" not in filled else [*filled, "-q"], cli_env)
    err = r.stderr.decode()
    assert r.returncode != 0
    assert message in err, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    assert not list(tmp_path.glob("*.tmp*")) and not list(tmp_path.glob(".*out*")), "half-written file left"


def test_corrupt_weights_are_a_one_line_error(tiny_dir, cli_env, tmp_path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in tiny_dir.iterdir():
        if item.is_file():
            (broken / item.name).write_bytes(item.read_bytes())
    shard = broken / "transformers-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])
    r = csm(["say", "hi", "-m", str(broken), "-o", str(tmp_path / "o.wav"), *BASE], cli_env)
    err = r.stderr.decode()
    assert r.returncode == 1 and "corrupt" in err and "Traceback" not in err, err


def test_no_text_on_a_terminal_like_stdin_is_an_error(tiny_dir, cli_env, tmp_path) -> None:
    r = csm(["say", "-m", str(tiny_dir), "-o", str(tmp_path / "o.wav"), *BASE], cli_env, stdin=b"")
    assert r.returncode == 1 and "text is empty" in r.stderr.decode()


def test_int8_weights_speak_and_stay_close(tiny_dir, cli_env, tmp_path) -> None:
    """--quantize int8 gives audio of the same length, close to (not equal to) the float model's."""
    outs = {}
    for q in ("none", "int8"):
        outs[q] = tmp_path / f"{q}.wav"
        args = ["say", "Hello from CSM.", "-m", str(tiny_dir), "-o", str(outs[q]), "--seed", "3", "--quantize", q]
        r = csm([*args, *BASE], cli_env)
        assert r.returncode == 0, r.stderr.decode()
    a, b = read(outs["none"]), read(outs["int8"])
    assert len(a) == len(b) == 6 * 1920
    assert np.abs(b).max() > 1e-3


@pytest.mark.parametrize("command", [["bench", "--frames", "2"], ["say", "hi", "-o", "{tmp}/x.wav"]])
def test_compile_with_float_cpu_weights_is_a_one_line_error(tiny_dir, cli_env, tmp_path, command) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    r = csm([*args, "-m", str(tiny_dir), "--device", "cpu", "--dtype", "float32", "--compile"], cli_env)
    err = r.stderr.decode()
    assert r.returncode == 1 and "compiling on the CPU needs quantized weights (--quantize int8 or int4)" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
