"""The tiny random checkpoint: real repository layout, real ids and RoPE scaling, and no fixture traps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf
import tiny_checkpoint as tiny
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_check import verify_tiny_checkpoint
from tokenizers import Tokenizer
from transformers import AutoTokenizer, CsmConfig
from transformers.models.csm.modeling_csm import CsmRotaryEmbedding

from csmcli.convert import detect_format

SHARDS = ("transformers-00001-of-00002.safetensors", "transformers-00002-of-00002.safetensors")
INDEX = "transformers.safetensors.index.json"
SIDE_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "chat_template.jinja",
    "prompts/conversational_a.wav",
    "prompts/conversational_b.wav",
    "prompts/read_speech_a.wav",
)


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _shard_state(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for shard in SHARDS:
        state.update(load_file(str(folder / shard)))
    return state


def test_layout(tiny_dir: Path) -> None:
    assert _files(tiny_dir) == {*SIDE_FILES, *SHARDS, INDEX, "model.safetensors"}
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "csm"
    assert config["transformers_weights"] == INDEX
    assert config["codec_config"]["model_type"] == "mimi"
    index = json.loads((tiny_dir / INDEX).read_text())
    assert set(index) == {"metadata", "weight_map"}
    assert set(index["weight_map"].values()) == set(SHARDS)
    assert set(index["weight_map"]) == set(_shard_state(tiny_dir))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _shard_state(tiny_dir).values())
    assert any(key.startswith("codec_model.") for key in index["weight_map"])


def test_sizes_keep_the_real_vocabularies(tiny_dir: Path) -> None:
    config = json.loads((tiny_dir / "config.json").read_text())
    assert (config["num_codebooks"], config["vocab_size"], config["text_vocab_size"]) == (32, 2051, 128256)
    assert config["max_position_embeddings"] == 2048
    assert config["depth_decoder_config"]["max_position_embeddings"] == 33
    assert config["depth_decoder_config"]["backbone_hidden_size"] == config["hidden_size"]
    codec = config["codec_config"]
    assert (codec["sampling_rate"], codec["num_quantizers"], codec["codebook_size"]) == (24000, 32, 2048)
    assert codec["upsampling_ratios"] == [8, 6, 5, 4]
    state = _shard_state(tiny_dir)
    assert state["embed_text_tokens.weight"].shape[0] == 128256
    assert state["backbone_model.embed_tokens.embed_audio_tokens.weight"].shape[0] == 32 * 2051
    assert state["depth_decoder.codebooks_head.weight"].shape[::2] == (31, 2051)
    assert all(t.dtype == torch.float32 for t in state.values() if t.is_floating_point())


def test_weight_files_are_told_apart_by_key_names(tiny_dir: Path) -> None:
    with safe_open(str(tiny_dir / "model.safetensors"), framework="pt") as handle:
        original_keys = list(handle.keys())
    assert detect_format(original_keys) == "original"
    assert not any(key.startswith("codec_model.") for key in original_keys)
    for shard in SHARDS:
        with safe_open(str(tiny_dir / shard), framework="pt") as handle:
            assert detect_format(handle.keys()) == "transformers"


def test_original_and_transformers_weights_agree(tiny_dir: Path) -> None:
    from csmcli.convert import original_to_transformers

    config = json.loads((tiny_dir / "config.json").read_text())
    converted = original_to_transformers(load_file(str(tiny_dir / "model.safetensors")), config)
    state = _shard_state(tiny_dir)
    assert set(converted) == {key for key in state if not key.startswith("codec_model.")}
    for key, tensor in converted.items():
        assert torch.equal(tensor, state[key]), key


def test_special_token_ids(tiny_dir: Path) -> None:
    tokenizer = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    expected = {
        "<|begin_of_text|>": 128000,
        "<|end_of_text|>": 128001,
        "<|AUDIO|>": 128002,
        "<|audio_eos|>": 128003,
    }
    assert {token: tokenizer.token_to_id(token) for token in expected} == expected
    ids = tokenizer.encode("[0]Hello there.", add_special_tokens=False).ids
    assert ids and all(0 <= i < 128000 for i in ids)
    assert tokenizer.decode(ids) == "[0]Hello there."
    assert tokenizer.encode("Hi").ids[0] == 128000  # Llama-3's post-processor: bos only
    assert 256 < max(tokenizer.get_vocab()[t] for t in tokenizer.get_vocab() if not t.startswith("<|")) < 1000
    hf = AutoTokenizer.from_pretrained(tiny_dir)
    assert hf.bos_token_id == 128000
    assert hf.eos_token_id == 128001
    assert hf.convert_tokens_to_ids(["<|AUDIO|>", "<|audio_eos|>"]) == [128002, 128003]
    assert max(hf("[1]Non-ASCII too: héllo, 日本.", add_special_tokens=False).input_ids) < 128000


def test_rope_scaling_is_the_real_llama3_form(tiny_dir: Path) -> None:
    config = CsmConfig.from_pretrained(tiny_dir)
    assert config.rope_parameters == {**tiny.BACKBONE_ROPE}
    assert config.depth_decoder_config.rope_parameters == {**tiny.DEPTH_ROPE}
    for sub in (config, config.depth_decoder_config):
        scaled = CsmRotaryEmbedding(sub).inv_freq
        dim = scaled.numel() * 2
        plain = 1.0 / 500000.0 ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
        assert not torch.allclose(scaled, plain)


def test_mimi_centroids_are_random(tiny_dir: Path) -> None:
    state = _shard_state(tiny_dir)
    sums = {k: v for k, v in state.items() if k.endswith("codebook.embed_sum")}
    assert len(sums) == 32
    for key, embed_sum in sums.items():
        usage = state[key.replace("embed_sum", "cluster_usage")]
        centroids = embed_sum / usage.clamp(min=1e-5)[:, None]
        assert centroids.abs().min(dim=1).values.gt(0).all(), key
        assert torch.unique(centroids, dim=0).shape[0] == 2048, key


def test_reserved_codes_never_win_argmax(tiny_dir: Path) -> None:
    state = _shard_state(tiny_dir)
    gen = torch.Generator().manual_seed(0)
    lm_head = state["lm_head.weight"]  # (2051, hidden)
    assert lm_head[2048:].abs().max() == 0
    hidden = 30 * torch.randn(2000, lm_head.shape[1], generator=gen)
    assert (hidden @ lm_head.T).argmax(-1).max() < 2048
    heads = state["depth_decoder.codebooks_head.weight"]  # (31, hidden, 2051)
    assert heads[..., 2048:].abs().max() == 0
    hidden = 30 * torch.randn(200, heads.shape[1], generator=gen)
    assert torch.einsum("nh,chv->cnv", hidden, heads).argmax(-1).max() < 2048


def test_prompts_are_short_distinct_24khz_wavs(tiny_dir: Path) -> None:
    signals = []
    for name in ("conversational_a", "conversational_b", "read_speech_a"):
        info = sf.info(str(tiny_dir / "prompts" / f"{name}.wav"))
        assert (info.samplerate, info.channels, info.subtype, info.format) == (24000, 1, "PCM_16", "WAV")
        assert 1.0 <= info.duration <= 2.0
        audio, _ = sf.read(str(tiny_dir / "prompts" / f"{name}.wav"), dtype="float32")
        assert 0.05 < abs(audio).max() < 1.0
        signals.append(audio)
    assert len({a.size for a in signals}) == 3


def test_self_check_passes(tiny_dir: Path) -> None:
    """Loads with from_pretrained cleanly; Mimi shapes and codes; greedy 30 frames are lively and valid."""
    stats = verify_tiny_checkpoint(tiny_dir)
    assert stats["distinct_frames"] >= 15


def test_same_seed_same_bytes(tiny_dir: Path, tmp_path: Path) -> None:
    again = tiny.make_tiny_checkpoint(tmp_path / "again", seed=0)
    assert _files(again) == _files(tiny_dir)
    for name in _files(tiny_dir):
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    other = tiny.make_tiny_checkpoint(tmp_path / "other", seed=1, formats="original")
    assert (other / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()


def test_original_format_only(tmp_path: Path) -> None:
    out = tiny.make_tiny_checkpoint(tmp_path / "orig", formats="original")
    assert _files(out) == {*SIDE_FILES, "model.safetensors"}
    assert "transformers_weights" not in json.loads((out / "config.json").read_text())


def test_transformers_format_without_codec_via_cli(tmp_path: Path) -> None:
    out = tmp_path / "no-codec"
    assert tiny.main([str(out), "--format", "transformers", "--no-codec", "--seed", "3"]) == 0
    assert _files(out) == {*SIDE_FILES, *SHARDS, INDEX}
    weight_map = json.loads((out / INDEX).read_text())["weight_map"]
    assert not any(key.startswith("codec_model.") for key in weight_map)
    assert "codec_config" in json.loads((out / "config.json").read_text())


def test_unknown_format_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="formats"):
        tiny.make_tiny_checkpoint(tmp_path / "x", formats="gguf")
