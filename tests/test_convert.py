"""Key-format conversion between Sesame's original CSM checkpoints and transformers' layout.

The attention test is independent of the converter's own reasoning: it runs an interleaved-RoPE
attention (torchtune's layout, as in the original model) on the original weights and a rotate-half
attention (transformers' layout) on the converted weights, and requires equal outputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import CsmConfig, CsmForConditionalGeneration, MimiConfig

from csmcli.convert import detect_format, original_to_transformers, transformers_to_original
from csmcli.errors import CheckpointError

BACKBONE = {"hidden": 64, "heads": 4, "kv_heads": 2, "head_dim": 16, "layers": 2, "ffn": 96}
DECODER = {"hidden": 32, "heads": 4, "kv_heads": 2, "head_dim": 8, "layers": 3, "ffn": 48}
CODEBOOKS, VOCAB, TEXT_VOCAB = 4, 11, 50


def _cfg() -> dict:
    """A CsmConfig-shaped dict (config.json content) for the small stacks above."""
    return {
        "hidden_size": BACKBONE["hidden"],
        "num_attention_heads": BACKBONE["heads"],
        "num_key_value_heads": BACKBONE["kv_heads"],
        "head_dim": BACKBONE["head_dim"],
        "num_hidden_layers": BACKBONE["layers"],
        "depth_decoder_config": {
            "hidden_size": DECODER["hidden"],
            "num_attention_heads": DECODER["heads"],
            "num_key_value_heads": DECODER["kv_heads"],
            "head_dim": DECODER["head_dim"],
            "num_hidden_layers": DECODER["layers"],
        },
    }


def _original_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights under Sesame's original names."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:  # std 1/sqrt(fan_in): O(1) activations, as in a real model
        return (torch.randn(*shape, generator=gen) / math.sqrt(shape[-1])).to(dtype)

    sd = {
        "text_embeddings.weight": rand(TEXT_VOCAB, BACKBONE["hidden"]),
        "audio_embeddings.weight": rand(CODEBOOKS * VOCAB, BACKBONE["hidden"]),
        "projection.weight": rand(DECODER["hidden"], BACKBONE["hidden"]),
        "codebook0_head.weight": rand(VOCAB, BACKBONE["hidden"]),
        "audio_head": rand(CODEBOOKS - 1, DECODER["hidden"], VOCAB),
    }
    for stack, dims in (("backbone", BACKBONE), ("decoder", DECODER)):
        hidden, head_dim = dims["hidden"], dims["head_dim"]
        for i in range(dims["layers"]):
            prefix = f"{stack}.layers.{i}"
            sd[f"{prefix}.attn.q_proj.weight"] = rand(dims["heads"] * head_dim, hidden)
            sd[f"{prefix}.attn.k_proj.weight"] = rand(dims["kv_heads"] * head_dim, hidden)
            sd[f"{prefix}.attn.v_proj.weight"] = rand(dims["kv_heads"] * head_dim, hidden)
            sd[f"{prefix}.attn.output_proj.weight"] = rand(hidden, dims["heads"] * head_dim)
            sd[f"{prefix}.mlp.w1.weight"] = rand(dims["ffn"], hidden)
            sd[f"{prefix}.mlp.w3.weight"] = rand(dims["ffn"], hidden)
            sd[f"{prefix}.mlp.w2.weight"] = rand(hidden, dims["ffn"])
            sd[f"{prefix}.sa_norm.scale"] = rand(hidden)
            sd[f"{prefix}.mlp_norm.scale"] = rand(hidden)
        sd[f"{stack}.norm.scale"] = rand(hidden)
    return sd


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------------------------
# An independent reference: attention with each RoPE layout, written from the definitions.


def _angles(positions: torch.Tensor, head_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    inv_freq[-1] /= 32.0  # a scaled low frequency, as Llama-3 scaling produces
    return (positions.double()[:, None] * inv_freq[None]).float()  # (T, head_dim/2)


def _rope_interleaved(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x[2i], x[2i+1]) by angle_i (torchtune / original CSM)."""
    angle = _angles(positions, x.shape[-1])[:, None, :]
    cos, sin = angle.cos(), angle.sin()
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


def _rope_halves(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x[i], x[i + d/2]) by angle_i (transformers' rotate_half)."""
    angle = _angles(positions, x.shape[-1])[:, None, :]
    cos, sin = angle.cos(), angle.sin()
    first, second = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)


def _attention(x, wq, wk, wv, wo, dims, positions, rope):
    """Causal GQA attention of one sequence x (T, hidden) with the given RoPE."""
    steps, head_dim = x.shape[0], dims["head_dim"]
    q = rope((x @ wq.T).view(steps, dims["heads"], head_dim), positions)
    k = rope((x @ wk.T).view(steps, dims["kv_heads"], head_dim), positions)
    v = (x @ wv.T).view(steps, dims["kv_heads"], head_dim)
    group = dims["heads"] // dims["kv_heads"]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(head_dim)
    scores = scores.masked_fill(~torch.ones(steps, steps, dtype=torch.bool).tril(), float("-inf"))
    out = torch.einsum("hts,shd->thd", scores.softmax(dim=-1), v)
    return out.reshape(steps, -1) @ wo.T


@pytest.mark.parametrize(
    ("stack", "new_stack", "dims"),
    [
        ("backbone", "backbone_model", BACKBONE),
        ("decoder", "depth_decoder.model", DECODER),
    ],
)
def test_converted_attention_matches_interleaved_rope(stack: str, new_stack: str, dims: dict) -> None:
    original = _original_state_dict(seed=1)
    converted = original_to_transformers(original, _cfg())
    gen = torch.Generator().manual_seed(2)
    for layer in range(dims["layers"]):
        old, new = f"{stack}.layers.{layer}.attn", f"{new_stack}.layers.{layer}.self_attn"
        x = torch.randn(9, dims["hidden"], generator=gen)
        positions = torch.sort(torch.randint(0, 2048, (9,), generator=gen)).values
        expected = _attention(
            x,
            original[f"{old}.q_proj.weight"],
            original[f"{old}.k_proj.weight"],
            original[f"{old}.v_proj.weight"],
            original[f"{old}.output_proj.weight"],
            dims,
            positions,
            _rope_interleaved,
        )
        weights = [converted[f"{new}.{name}_proj.weight"] for name in "qkvo"]
        got = _attention(x, *weights, dims, positions, _rope_halves)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        # Control: without the permutation the two layouts disagree, so the test can catch a swap.
        unpermuted = _attention(
            x,
            original[f"{old}.q_proj.weight"],
            original[f"{old}.k_proj.weight"],
            original[f"{old}.v_proj.weight"],
            original[f"{old}.output_proj.weight"],
            dims,
            positions,
            _rope_halves,
        )
        assert not torch.allclose(unpermuted, expected, atol=1e-3)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_exact(dtype: torch.dtype) -> None:
    original = _original_state_dict(dtype=dtype)
    converted = original_to_transformers(original, _cfg())
    _assert_same(transformers_to_original(converted, _cfg()), original)
    _assert_same(original_to_transformers(transformers_to_original(converted, _cfg()), _cfg()), converted)


def test_renames_and_tied_audio_embeddings() -> None:
    original = _original_state_dict()
    converted = original_to_transformers(original, _cfg())
    assert torch.equal(converted["lm_head.weight"], original["codebook0_head.weight"])
    assert torch.equal(
        converted["backbone_model.layers.1.mlp.gate_proj.weight"], original["backbone.layers.1.mlp.w1.weight"]
    )
    assert torch.equal(
        converted["backbone_model.layers.1.mlp.up_proj.weight"], original["backbone.layers.1.mlp.w3.weight"]
    )
    assert torch.equal(
        converted["depth_decoder.model.layers.2.mlp.down_proj.weight"],
        original["decoder.layers.2.mlp.w2.weight"],
    )
    assert torch.equal(
        converted["depth_decoder.model.layers.0.input_layernorm.weight"],
        original["decoder.layers.0.sa_norm.scale"],
    )
    assert torch.equal(
        converted["depth_decoder.model.layers.0.post_attention_layernorm.weight"],
        original["decoder.layers.0.mlp_norm.scale"],
    )
    assert torch.equal(converted["depth_decoder.codebooks_head.weight"], original["audio_head"])
    assert torch.equal(converted["depth_decoder.model.embed_tokens.weight"], original["audio_embeddings.weight"])
    # v and o are not rotated, q and k are.
    assert torch.equal(
        converted["backbone_model.layers.0.self_attn.v_proj.weight"],
        original["backbone.layers.0.attn.v_proj.weight"],
    )
    assert not torch.equal(
        converted["backbone_model.layers.0.self_attn.q_proj.weight"],
        original["backbone.layers.0.attn.q_proj.weight"],
    )


def test_names_match_transformers_model() -> None:
    """Conversion produces exactly the non-codec keys of CsmForConditionalGeneration's state dict."""
    codec = MimiConfig(
        hidden_size=16,
        num_filters=2,
        codebook_dim=8,
        vector_quantization_hidden_dimension=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=16,
        upsample_groups=16,
        num_quantizers=CODEBOOKS,
    )
    config = CsmConfig(
        num_codebooks=CODEBOOKS,
        vocab_size=VOCAB,
        text_vocab_size=TEXT_VOCAB,
        hidden_size=BACKBONE["hidden"],
        intermediate_size=BACKBONE["ffn"],
        num_hidden_layers=BACKBONE["layers"],
        num_attention_heads=BACKBONE["heads"],
        num_key_value_heads=BACKBONE["kv_heads"],
        codec_config=codec.to_dict(),
        depth_decoder_config={
            "num_codebooks": CODEBOOKS,
            "vocab_size": VOCAB,
            "backbone_hidden_size": BACKBONE["hidden"],
            "hidden_size": DECODER["hidden"],
            "intermediate_size": DECODER["ffn"],
            "num_hidden_layers": DECODER["layers"],
            "num_attention_heads": DECODER["heads"],
            "num_key_value_heads": DECODER["kv_heads"],
        },
    )
    model_keys = {k for k in CsmForConditionalGeneration(config).state_dict() if not k.startswith("codec_model.")}
    assert "depth_decoder.model.embed_tokens.weight" in model_keys
    converted = original_to_transformers(_original_state_dict(), config.to_dict())
    assert set(converted) == model_keys
    result = CsmForConditionalGeneration(config).load_state_dict(converted, strict=False)
    assert not result.unexpected_keys
    assert all(key.startswith("codec_model.") for key in result.missing_keys)


def test_config_object_is_accepted() -> None:
    original = _original_state_dict()
    assert sorted(original_to_transformers(original, _cfg())) == sorted(
        original_to_transformers(original, _StubConfig(_cfg()))
    )


class _StubConfig:
    """Anything with ``to_dict`` (a transformers config) works as ``cfg``."""

    def __init__(self, data: dict) -> None:
        self.data = data

    def to_dict(self) -> dict:
        return self.data


@pytest.mark.parametrize("prefix", ["_orig_mod.", "model.", "model._orig_mod.", "module."])
def test_wrapper_prefixes_are_stripped(prefix: str) -> None:
    original = _original_state_dict()
    wrapped = {prefix + key: value for key, value in original.items()}
    _assert_same(original_to_transformers(wrapped, _cfg()), original_to_transformers(original, _cfg()))
    assert detect_format(wrapped) == "original"


def test_inner_orig_mod_segments_are_stripped() -> None:
    original = _original_state_dict()
    wrapped = {key.replace("backbone.", "backbone._orig_mod."): value for key, value in original.items()}
    _assert_same(original_to_transformers(wrapped, _cfg()), original_to_transformers(original, _cfg()))


def test_missing_key_raises_one_line_error() -> None:
    original = _original_state_dict()
    del original["decoder.layers.1.mlp.w3.weight"]
    with pytest.raises(CheckpointError, match=r"missing key decoder\.layers\.1\.mlp\.w3\.weight") as info:
        original_to_transformers(original, _cfg())
    assert "\n" not in str(info.value)


def test_missing_layer_raises() -> None:
    original = {k: v for k, v in _original_state_dict().items() if not k.startswith("decoder.layers.2.")}
    with pytest.raises(CheckpointError, match=r"missing key decoder\.layers\.2\."):
        original_to_transformers(original, _cfg())


@pytest.mark.parametrize("extra", ["backbone.layers.0.attn.q_proj.bias", "backbone.layers.2.mlp.w1.weight", "foo"])
def test_unexpected_key_raises(extra: str) -> None:
    original = _original_state_dict()
    original[extra] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="unexpected key"):
        original_to_transformers(original, _cfg())


def test_transformers_side_checks_keys() -> None:
    converted = original_to_transformers(_original_state_dict(), _cfg())
    broken = dict(converted)
    del broken["backbone_model.norm.weight"]
    with pytest.raises(CheckpointError, match=r"missing key backbone_model\.norm\.weight"):
        transformers_to_original(broken, _cfg())
    broken = dict(converted, **{"backbone_model.extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unexpected key backbone_model\.extra\.weight"):
        transformers_to_original(broken, _cfg())


def test_transformers_to_original_drops_codec_and_accepts_either_tied_copy() -> None:
    original = _original_state_dict()
    converted = original_to_transformers(original, _cfg())
    with_codec = dict(converted, **{"codec_model.decoder.layers.0.conv.weight": torch.zeros(2)})
    _assert_same(transformers_to_original(with_codec, _cfg()), original)
    only_depth_copy = dict(converted)
    del only_depth_copy["backbone_model.embed_tokens.embed_audio_tokens.weight"]
    _assert_same(transformers_to_original(only_depth_copy, _cfg()), original)
    only_backbone_copy = dict(converted)
    del only_backbone_copy["depth_decoder.model.embed_tokens.weight"]
    _assert_same(transformers_to_original(only_backbone_copy, _cfg()), original)


def test_wrong_head_count_raises() -> None:
    cfg = _cfg()
    cfg["num_attention_heads"] = 8
    with pytest.raises(CheckpointError, match="q_proj"):
        original_to_transformers(_original_state_dict(), cfg)


def test_config_without_heads_raises() -> None:
    cfg = _cfg()
    del cfg["depth_decoder_config"]
    with pytest.raises(CheckpointError, match="depth_decoder_config"):
        original_to_transformers(_original_state_dict(), cfg)


def test_detect_format() -> None:
    original = _original_state_dict()
    assert detect_format(original) == "original"
    assert detect_format(original_to_transformers(original, _cfg())) == "transformers"
    assert detect_format(["backbone_model.norm.weight", "codec_model.decoder.layers.0.conv.weight"]) == "transformers"


@pytest.mark.parametrize(
    "keys",
    [
        [],
        [
            "encoder.layers.0.conv.weight",
            "decoder.layers.0.conv.weight",
            "quantizer.semantic.weight",
        ],  # Mimi alone
        ["model.layers.0.self_attn.q_proj.weight", "lm_head.weight"],  # a Llama
    ],
)
def test_detect_format_rejects_other_checkpoints(keys: list[str]) -> None:
    with pytest.raises(CheckpointError, match="not a CSM checkpoint"):
        detect_format(keys)


def test_detect_format_rejects_mixed_names() -> None:
    with pytest.raises(CheckpointError, match="mixes"):
        detect_format(["backbone.layers.0.attn.q_proj.weight", "backbone_model.layers.0.self_attn.q_proj.weight"])
