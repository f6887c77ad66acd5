"""The quantized-weight cache and ``--quantize int4`` end to end on the tiny checkpoint."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from csmcli import quant, quantcache
from csmcli.loader import load_parts, quantize_cached
from csmcli.options import GenerationOptions


def cache_files(cache: Path) -> list[Path]:
    return sorted((cache / "quantized").glob("*.safetensors"))


def load(tiny_dir: Path, cache: Path | None, quantize: str = "int4"):
    return load_parts(str(tiny_dir), device="cpu", dtype="float32", quantize=quantize, cache_dir=cache)


def same_layers(a, b) -> None:
    ta, tb = quant.quantized_tensors(a.model), quant.quantized_tensors(b.model)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("quantize", ["int4", "int8"])
def test_second_load_reads_the_cache(tiny_dir, tmp_path, quantize, caplog) -> None:
    cache = tmp_path / "cache"
    first = load(tiny_dir, cache, quantize)
    assert first.quant_cache == "written" and len(cache_files(cache)) == 1
    assert cache_files(cache)[0].name.startswith(f"{tiny_dir.name}-{quantize}-")
    with caplog.at_level(logging.INFO, logger="csmcli"):
        second = load(tiny_dir, cache, quantize)
    assert second.quant_cache == "read" and "quantized weights read from" in caplog.text
    same_layers(first, second)
    assert not list((cache / "quantized").glob(".*.tmp"))  # written through a temporary name


def test_cached_weights_give_the_same_audio(tiny_dir, tmp_path) -> None:
    from csmcli import Synthesizer

    cache, options = tmp_path / "cache", GenerationOptions(temperature=0, max_audio_ms=320)
    audio = []
    for _ in range(2):
        synth = Synthesizer.load(str(tiny_dir), device="cpu", dtype="float32", quantize="int4", cache_dir=cache)
        audio.append(synth.generate("Hello there.", options=options))
    assert synth.engine.cpu_kernels.startswith("int4")
    assert audio[0].samples.size > 0 and np.array_equal(audio[0].samples, audio[1].samples)
    assert torch.equal(audio[0].codes, audio[1].codes)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "other key"])
def test_a_damaged_cache_file_is_ignored_once_and_rewritten(tiny_dir, tmp_path, damage, caplog) -> None:
    cache = tmp_path / "cache"
    good = load(tiny_dir, cache)
    (file,) = cache_files(cache)
    data = file.read_bytes()
    if damage == "truncate":
        file.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        file.write_bytes(b"\0" * 64)
    else:  # a valid file written for other settings under this name
        tensors = quant.quantized_tensors(good.model)
        quantcache.write(file, "some other key", tensors)
    with caplog.at_level(logging.WARNING, logger="csmcli"):
        again = load(tiny_dir, cache)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert again.quant_cache == "written" and len(warnings) == 1 and "quantizing again" in warnings[0].message
    same_layers(good, again)
    assert load(tiny_dir, cache).quant_cache == "read"


def test_tensors_that_do_not_fit_are_ignored(tiny_dir, tmp_path, caplog) -> None:
    cache = tmp_path / "cache"
    good = load(tiny_dir, cache)
    (file,) = cache_files(cache)
    _, key = quantcache.cache_file(cache, good_files(tiny_dir), settings("int4"))
    tensors = quant.quantized_tensors(good.model)
    del tensors["backbone.0.wo.mins"]
    assert quantcache.write(file, key, tensors)
    with caplog.at_level(logging.WARNING, logger="csmcli"):
        assert load(tiny_dir, cache).quant_cache == "written"
    assert "does not fit" in caplog.text


def good_files(tiny_dir: Path) -> list[Path]:
    from csmcli import checkpoint

    return checkpoint.inspect(tiny_dir).weight_files


def settings(name: str) -> dict:
    return quantcache.settings_of(name, quant.INT4_GROUP, quant.INT4_KEEP_INT8, torch.float32)


def test_the_key_follows_the_checkpoint_and_the_settings(tiny_dir, tmp_path) -> None:
    files = good_files(tiny_dir)
    file, key = quantcache.cache_file(tmp_path, files, settings("int4"))
    assert file.parent == tmp_path / "quantized" and file.name.startswith("model-int4-")
    assert quantcache.cache_file(tmp_path, files, settings("int4")) == (file, key)
    assert quantcache.cache_file(tmp_path, files, settings("int4"), "csm-1b")[0].name.startswith("csm-1b-int4-")
    assert quantcache.cache_file(tmp_path, files, settings("int4"), "a b/..")[0].name.startswith("a-b-int4-")
    assert quantcache.cache_file(tmp_path, files, settings("int8"))[0] != file
    other = quantcache.settings_of("int4", 32, quant.INT4_KEEP_INT8, torch.float32)
    assert quantcache.cache_file(tmp_path, files, other)[0] != file
    stat = files[0].stat()
    os.utime(files[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    try:
        assert quantcache.cache_file(tmp_path, files, settings("int4"))[0] != file  # the checkpoint changed
    finally:
        os.utime(files[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_no_cache_without_a_directory_or_a_checkpoint(tiny_dir, tmp_path, synth) -> None:
    assert load(tiny_dir, None).quant_cache == "off"
    model = load(tiny_dir, None, "none").model
    assert quantize_cached(model, "int8", None, tmp_path, torch.float32) == "off"  # random weights: no files
    assert not (tmp_path / "quantized").exists()


def test_an_unwritable_cache_only_warns(tiny_dir, tmp_path, caplog) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="csmcli"):
        parts = load(tiny_dir, blocker)
    assert parts.quant_cache == "off" and "cannot write the quantized-weight cache" in caplog.text


def test_csm_say_int4_caches_and_bad_quantize_is_one_line(tiny_dir, cli_env, tmp_path) -> None:
    base = ["-m", str(tiny_dir), "--device", "cpu", "--dtype", "float32", "--max-audio-ms", "320", "-q"]
    outs = []
    for i in range(2):
        out = tmp_path / f"int4-{i}.wav"
        r = subprocess.run(
            ["csm", "say", "Hello there.", "-o", str(out), "--quantize", "int4", "--temperature", "0", *base],
            capture_output=True,
            env=cli_env,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr.decode()
        outs.append(out.read_bytes())
    assert len(outs[0]) > 1000 and outs[0] == outs[1]
    assert len(cache_files(Path(cli_env["CSM_HOME"]) / "cache")) == 1
    r = subprocess.run(
        ["csm", "say", "hi", "-o", str(tmp_path / "x.wav"), "--quantize", "int3", *base],
        capture_output=True,
        env=cli_env,
        timeout=300,
    )
    err = r.stderr.decode().strip()
    assert r.returncode != 0 and "quantize must be one of none, int8, int4, got 'int3'" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
