"""Checkpoint discovery: the hub cache (offline), both weight formats and files, and clear errors."""

from __future__ import annotations

import shutil
import subprocess
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from csmcli import GenerationOptions, Synthesizer, checkpoint
from csmcli.errors import CheckpointError

REAL_REPO_FILES = [
    ".gitattributes",
    "README.md",
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "transformers.safetensors.index.json",
    "transformers-00001-of-00002.safetensors",
    "transformers-00002-of-00002.safetensors",
    "model.safetensors",
    "ckpt.pt",
    "prompts/conversational_a.wav",
    "prompts/conversational_b.wav",
    "prompts/read_speech_a.wav",
    "prompts/read_speech_b.wav",
    "prompts/read_speech_c.wav",
    "prompts/read_speech_d.wav",
]
GREEDY = GenerationOptions(temperature=0, max_audio_ms=400)


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache for this test (huggingface_hub reads HF_HUB_CACHE once, at import)."""
    from huggingface_hub import constants

    root = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    return root


def fake_hub_cache(root: Path, repo_id: str, source: Path) -> Path:
    """Lay ``source`` out the way huggingface_hub caches a snapshot of ``repo_id``."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    return snapshot


def test_download_selects_only_what_is_needed() -> None:
    chosen = {f for f in REAL_REPO_FILES if any(fnmatch(f, p) for p in checkpoint.DOWNLOAD_PATTERNS)}
    assert "model.safetensors" not in chosen and "ckpt.pt" not in chosen
    assert {
        "config.json",
        "tokenizer.json",
        "transformers.safetensors.index.json",
        "transformers-00001-of-00002.safetensors",
        "transformers-00002-of-00002.safetensors",
        "prompts/conversational_a.wav",
        "prompts/conversational_b.wav",
    } <= chosen


def test_hub_id_loads_from_the_cache_offline(tiny_dir, hub_cache, monkeypatch, synth) -> None:
    fake_hub_cache(hub_cache, "sesame/csm-1b", tiny_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = Synthesizer.load("sesame/csm-1b", device="cpu", dtype="float32")
    a = loaded.generate("From the cache.", 0, options=GREEDY)
    b = synth.generate("From the cache.", 0, options=GREEDY)
    assert torch.equal(a.codes, b.codes)


def test_uncached_hub_id_offline_is_a_clear_error(hub_cache, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="not in the local hub cache"):
        checkpoint.resolve("sesame/csm-1b")
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):
        checkpoint.download("sesame/csm-1b")


def test_gated_and_missing_repos_name_the_fix(hub_cache, monkeypatch) -> None:
    import huggingface_hub
    from huggingface_hub import errors

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def fake(exc: Exception):
        def snapshot_download(repo_id: str, local_files_only: bool = False, **kw):
            if local_files_only:
                raise errors.LocalEntryNotFoundError("not cached")
            raise exc

        return snapshot_download

    response = type("R", (), {"headers": {}, "status_code": 403, "request": None})()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake(errors.GatedRepoError("gated", response=response)))
    with pytest.raises(CheckpointError, match="gated: log in .* accept the licence"):
        checkpoint.resolve("sesame/csm-1b")
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", fake(errors.RepositoryNotFoundError("missing", response=response))
    )
    with pytest.raises(CheckpointError, match="no model repository"):
        checkpoint.resolve("someone/nothing")


def test_ckpt_pt_in_original_format_loads(tiny_dir, tiny_original_dir, tmp_path, monkeypatch, synth) -> None:
    only_pt = tmp_path / "pt"
    shutil.copytree(tiny_original_dir, only_pt)
    state = load_file(str(only_pt / "model.safetensors"))
    (only_pt / "model.safetensors").unlink()
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in state.items()}}, only_pt / "ckpt.pt")
    mimi = tmp_path / "mimi"
    synth.codec.model.save_pretrained(mimi)
    loaded = Synthesizer.load(str(only_pt), device="cpu", dtype="float32", mimi=str(mimi))
    assert torch.equal(
        loaded.generate("Pickled.", 1, options=GREEDY).codes, synth.generate("Pickled.", 1, options=GREEDY).codes
    )


def test_directory_without_csm_weights(tmp_path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(CheckpointError, match="not a CSM checkpoint"):
        checkpoint.inspect(tmp_path)
    with pytest.raises(CheckpointError, match="model directory not found"):
        checkpoint.resolve(str(tmp_path / "nope"))


def test_download_command_offline_is_one_line(cli_env) -> None:
    r = subprocess.run(["csm", "download"], capture_output=True, env=cli_env, timeout=120)
    err = r.stderr.decode()
    assert r.returncode == 1 and "HF_HUB_OFFLINE" in err and "Traceback" not in err, err


def test_loaded_model_reports_its_source(synth, tiny_dir) -> None:
    assert Path(synth.source) == tiny_dir
    assert np.isfinite(synth.generate("x", 0, options=GREEDY).samples).all()
