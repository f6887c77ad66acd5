"""Codec (Mimi) tests: streaming decode equals transformers' whole decode (random tiny and full-size Mimi)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import MimiConfig, MimiModel

from csmcli.codec import Codec, remap_mimi_key

TOL = 1e-4
TINY_WINDOW = 8  # decoder-transformer positions (25 Hz): 4 frames, far fewer than the 40 decoded


def tiny_config(**overrides: object) -> MimiConfig:
    """Real rates, ratios, 32 x 2048 codebooks; tiny channels, transformer and codebook dim."""
    fields = dict(
        sampling_rate=24000,
        upsampling_ratios=[8, 6, 5, 4],
        hidden_size=32,
        num_filters=4,
        codebook_dim=16,
        vector_quantization_hidden_dimension=16,
        upsample_groups=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=TINY_WINDOW,
        num_quantizers=32,
        codebook_size=2048,
    )
    fields.update(overrides)
    return MimiConfig(**fields)


def randomize(model: MimiModel, seed: int, transformer_gain: float = 1.0) -> MimiModel:
    """Random centroids (transformers starts every codebook at zero) and audible transformer layers."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if hasattr(mod, "embed_sum") and hasattr(mod, "_embed"):
                mod.embed_sum.copy_(torch.randn(mod.embed_sum.shape, generator=gen))
                mod.cluster_usage.fill_(1.0)
                mod._embed = None
        for name, param in model.named_parameters():
            if name.startswith("decoder.") and name.endswith("layer_scale.scale"):
                param.copy_(0.5 + torch.rand(param.shape, generator=gen))
        for layer in model.decoder.decoder_transformer.layers:
            layer.self_attn.v_proj.weight.mul_(transformer_gain)
            layer.self_attn.o_proj.weight.mul_(transformer_gain)
    return model


def scale_output(model: MimiModel, codes: torch.Tensor, peak: float = 0.9) -> None:
    """Scale the decoder's last convolution so decoded audio peaks at ``peak`` (no hidden clipping)."""
    with torch.no_grad():
        top = reference(model, codes).__abs__().max()
        last = model.decoder.decoder_seanet.layers[-1].conv
        last.weight.mul_(peak / top)
        last.bias.mul_(peak / top)


def reference(model: MimiModel, codes: torch.Tensor) -> np.ndarray:
    """transformers' whole decode of ``codes`` ``[frames, K]``."""
    with torch.no_grad():
        return model.decode(codes.T[None]).audio_values[0, 0].numpy()


def streamed(codec: Codec, codes: torch.Tensor, chunks: Sequence[int]) -> np.ndarray:
    """Concatenated pushes of ``codes`` split into ``chunks`` frames each."""
    assert sum(chunks) == codes.shape[0]
    stream, parts, start = codec.stream(), [], 0
    for n in chunks:
        out = stream.push(codes[start : start + n])
        assert out.dtype == np.float32 and out.shape == (n * codec.frame_size,)
        parts.append(out)
        start += n
    return np.concatenate(parts)


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a - b).max())


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny() -> tuple[MimiModel, torch.Tensor, np.ndarray]:
    torch.manual_seed(0)
    model = randomize(MimiModel(tiny_config()).eval(), seed=1, transformer_gain=4.0)
    codes = torch.randint(0, 2048, (40, 32))
    scale_output(model, codes)
    return model, codes, reference(model, codes)


@pytest.fixture(scope="module")
def tiny_codec(tiny) -> Codec:
    return Codec(tiny[0])


@pytest.fixture(scope="module")
def full() -> tuple[MimiModel, torch.Tensor, np.ndarray]:
    torch.manual_seed(0)
    model = randomize(MimiModel(MimiConfig()).eval(), seed=2)
    codes = torch.randint(0, 2048, (12, 32))
    scale_output(model, codes)
    return model, codes, reference(model, codes)


# ------------------------------------------------------------------------------- decode vs transformers

TINY_CHUNKINGS = [
    [1] * 40,
    [2] * 20,
    [3] * 13 + [1],
    [7] * 5 + [5],
    [1, 2, 5, 3, 9, 4, 1, 1, 6, 8],
    [40],
]


@pytest.mark.parametrize("chunks", TINY_CHUNKINGS, ids=lambda c: "-".join(map(str, c[:6])))
def test_tiny_stream_equals_whole_decode(tiny, tiny_codec, chunks):
    _, codes, ref = tiny
    assert max_diff(streamed(tiny_codec, codes, chunks), ref) <= TOL


def test_tiny_decode_equals_transformers(tiny, tiny_codec):
    _, codes, ref = tiny
    assert max_diff(tiny_codec.decode(codes), ref) <= TOL
    assert max_diff(tiny_codec.decode(codes, chunk_frames=7), ref) <= TOL
    assert max_diff(tiny_codec.decode(codes[:9]), reference(tiny[0], codes[:9])) <= TOL


def test_fixture_is_not_vacuous(tiny, tiny_codec):
    model, codes, ref = tiny
    assert 0.5 < np.abs(ref).max() <= 1.0
    for book in (0, 1, 31):  # semantic, first and last acoustic codebooks all change the audio
        other = codes.clone()
        other[:, book] = (other[:, book] + 1 + torch.arange(40) * 37) % 2048
        assert max_diff(tiny_codec.decode(other), ref) > 1e-3, book


def test_sliding_window_is_exercised(tiny, tiny_codec):
    """transformers masks the decoder transformer to its window on long inputs, and so must we."""
    model, codes, ref = tiny
    cfg = model.decoder.decoder_transformer.config
    assert codes.shape[0] * 2 > 4 * cfg.sliding_window
    cfg.sliding_window = 10_000
    try:
        unwindowed = reference(model, codes)
    finally:
        cfg.sliding_window = TINY_WINDOW
    assert max_diff(unwindowed, ref) > 100 * TOL
    assert max_diff(streamed(tiny_codec, codes, [1] * 40), unwindowed) > 100 * TOL


def test_replicate_padding_streams_exactly():
    torch.manual_seed(3)
    model = randomize(MimiModel(tiny_config(pad_mode="replicate")).eval(), seed=3, transformer_gain=4.0)
    codes = torch.randint(0, 2048, (24, 32))
    scale_output(model, codes)
    ref = reference(model, codes)
    assert max_diff(streamed(Codec(model), codes, [1, 2, 5, 3, 9, 4]), ref) <= TOL


@pytest.mark.parametrize("chunks", [[12], [1] * 12, [5, 7], [3, 1, 4, 4]], ids=str)
def test_full_size_stream_equals_whole_decode(full, chunks):
    model, codes, ref = full
    assert 0.5 < np.abs(ref).max() <= 1.0
    assert max_diff(streamed(Codec(model), codes, chunks), ref) <= TOL


# ------------------------------------------------------------------------------------- shapes, encode


def test_decode_length_and_empty(tiny_codec):
    codes = torch.randint(0, 2048, (5, 32))
    audio = tiny_codec.decode(codes)
    assert audio.dtype == np.float32 and audio.shape == (5 * 1920,)
    assert tiny_codec.decode(codes[:0]).shape == (0,)
    assert tiny_codec.stream().push(codes[:0]).shape == (0,)
    assert (tiny_codec.sample_rate, tiny_codec.frame_size, tiny_codec.num_codebooks) == (24000, 1920, 32)


def test_bad_codes_are_rejected(tiny_codec):
    with pytest.raises(ValueError):
        tiny_codec.decode(torch.full((2, 32), 2048))
    with pytest.raises(ValueError):
        tiny_codec.stream().push(torch.zeros(2, 31, dtype=torch.long))
    with pytest.raises(ValueError):
        tiny_codec.decode(torch.zeros(2, 32))


def test_encode_one_second(tiny, tiny_codec):
    model = tiny[0]
    audio = (0.5 * np.sin(np.arange(24000) * 2 * np.pi * 220 / 24000)).astype(np.float32)
    codes = tiny_codec.encode(audio)
    assert codes.shape == (13, 32) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 2048
    assert len(torch.unique(codes)) > 13  # random centroids: not every code is the same
    with torch.no_grad():
        theirs = model.encode(torch.from_numpy(audio)[None, None], num_quantizers=32).audio_codes[0].T
    assert torch.equal(codes, theirs)
    assert torch.equal(tiny_codec.encode(torch.from_numpy(audio)), codes)


@pytest.mark.parametrize(("samples", "frames"), [(1, 1), (1920, 1), (1921, 2), (24960, 13), (24961, 14)])
def test_encode_frame_count(tiny_codec, samples, frames):
    audio = np.random.default_rng(samples).uniform(-0.5, 0.5, samples).astype(np.float32)
    assert tiny_codec.encode(audio).shape == (frames, 32)


def test_encode_full_size_shape(full):
    codec = Codec(full[0])
    audio = np.random.default_rng(0).uniform(-0.3, 0.3, 24000).astype(np.float32)
    assert codec.encode(audio).shape == (13, 32)


# ------------------------------------------------------------------------------------------ loading

_NESTED_TO_FLAT = (
    ("encoder.encoder_seanet.layers.", "encoder.layers."),
    ("encoder.encoder_transformer.", "encoder_transformer."),
    ("encoder.downsample.", "downsample."),
    ("decoder.upsample.", "upsample."),
    ("decoder.decoder_transformer.", "decoder_transformer."),
    ("decoder.decoder_seanet.layers.", "decoder.layers."),
)


def flat_state(model: MimiModel) -> dict[str, torch.Tensor]:
    """The model's weights under the checkpoint's flat (kyutai/mimi, ``codec_model.*``) names."""
    out = {}
    for key, value in model.state_dict().items():
        for new, old in _NESTED_TO_FLAT:
            if key.startswith(new):
                key = old + key[len(new) :]
                break
        out[key] = value
    return out


def test_remap_mimi_key():
    seanet = "decoder.decoder_seanet.layers.0.conv."
    assert remap_mimi_key("codec_model.decoder.layers.0.conv.weight") == seanet + "weight"
    assert remap_mimi_key("upsample.conv.weight") == "decoder.upsample.conv.weight"
    assert remap_mimi_key(seanet + "bias") == seanet + "bias"
    assert remap_mimi_key("encoder.layers.3.conv.bias") == "encoder.encoder_seanet.layers.3.conv.bias"
    quantizer = "quantizer.semantic_residual_vector_quantizer.input_proj.weight"
    assert remap_mimi_key(quantizer) == quantizer


def test_from_state_dict_flat_and_prefixed(tiny):
    model, codes, ref = tiny
    state = {f"codec_model.{k}": v for k, v in flat_state(model).items()}
    state = {k: v for k, v in state.items() if not k.endswith("codebook.initialized")}
    codec = Codec.from_state_dict(model.config.to_dict(), state, "cpu")
    tensors = [*codec.model.parameters(), *codec.model.buffers()]
    assert not any(t.is_meta for t in tensors) and not codec.model.training
    assert max_diff(streamed(codec, codes, [3, 1, 36]), ref) <= TOL
    audio = np.random.default_rng(1).uniform(-0.5, 0.5, 5000).astype(np.float32)
    assert torch.equal(codec.encode(audio), Codec(model).encode(audio))


def test_from_state_dict_decoder_only(tiny):
    model, codes, ref = tiny
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    codec = Codec.from_state_dict(model.config, state, "cpu")
    assert codec.model.encoder is None
    assert max_diff(codec.decode(codes), ref) <= TOL
    with pytest.raises(ValueError):
        codec.encode(np.zeros(1920, dtype=np.float32))


def test_from_state_dict_rejects_wrong_weights(tiny):
    model = tiny[0]
    state = dict(model.state_dict())
    del state["decoder.decoder_seanet.layers.0.conv.weight"]
    with pytest.raises(ValueError):
        Codec.from_state_dict(model.config, state, "cpu")


def test_from_pretrained_directory(tiny, tmp_path):
    model, codes, ref = tiny
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    save_file({k: v.contiguous() for k, v in flat_state(model).items()}, str(tmp_path / "model.safetensors"))
    codec = Codec.from_pretrained(tmp_path)
    assert max_diff(codec.decode(codes), ref) <= TOL
