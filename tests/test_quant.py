"""int4 quantization: the canonical form, the layer's backends, and quantizing a model (in process, fast)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from csmcli import quant
from csmcli.quant import Int4Linear, Int8Linear, dequantize_int4, quantize_int4_weight, unpack_int4


def test_int4_round_trip_within_half_a_step() -> None:
    torch.manual_seed(0)
    w = torch.randn(48, 256) * 0.02
    for group in quant.INT4_GROUPS:
        qweight, scales, mins = quantize_int4_weight(w, group)
        assert qweight.dtype == torch.uint8 and qweight.shape == (48, 128)
        assert scales.shape == mins.shape == (48, 256 // group) and scales.dtype == torch.float32
        err = (dequantize_int4(qweight, scales, mins) - w).abs().reshape(48, -1, group)
        assert bool((err <= scales[..., None] / 2 + 1e-7).all())
        codes = unpack_int4(qweight).reshape(48, -1, group)
        assert codes.amin(-1).eq(0).all() and codes.amax(-1).eq(15).all()  # each group spans 0..15


def test_nibble_order_is_low_then_high() -> None:
    w = (torch.arange(64) % 16).float()[None].repeat(2, 1)  # each group of 32: 0..15 twice, scale 1
    qweight, scales, mins = quantize_int4_weight(w, 32)
    assert qweight[0, :3].tolist() == [0 | 1 << 4, 2 | 3 << 4, 4 | 5 << 4]
    assert scales.eq(1).all() and mins.eq(0).all()
    assert torch.equal(dequantize_int4(qweight, scales, mins), w)


def test_constant_groups_and_bad_groups() -> None:
    qweight, scales, mins = quantize_int4_weight(torch.full((4, 64), 0.5), 64)
    assert torch.equal(dequantize_int4(qweight, scales, mins), torch.full((4, 64), 0.5))
    with pytest.raises(ValueError, match="do not divide"):
        quantize_int4_weight(torch.zeros(4, 96), 64)
    with pytest.raises(ValueError, match="do not divide"):
        quantize_int4_weight(torch.zeros(4, 96), 48)
    assert quant.int4_group(96, 64) == 32 and quant.int4_group(1024) == quant.INT4_GROUP
    assert quant.int4_group(48, 64) is None


def reference(layer_parts: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), dequantize_int4(*layer_parts))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_int4_kernel_matches_the_canonical_form(dtype: torch.dtype) -> None:
    """torch's CPU layout (w = (q - 8) * scale + zero, zero = min + 8 * scale) gives the canonical
    form's products, up to its bfloat16 scales and output; output rows padded to a multiple of 16."""
    torch.manual_seed(1)
    layer = Int4Linear.from_weight(torch.randn(40, 128) * 0.02, 64)
    parts = tuple(t.clone() for t in layer.canonical())
    x = torch.randn(5, 128).to(dtype)
    tight = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 3e-3, "rtol": 1e-2}
    torch.testing.assert_close(layer(x).float(), reference(parts, x), **tight)
    layer.pack_for_cpu()
    assert layer.canonical() is None and layer.qweight is None  # only torch's layout is kept
    assert layer.packed[0].numel() == 48 * 64 and layer.scales_zeros.shape == (2, 48, 2)
    for rows in (x, torch.randn(quant.DEQUANTIZE_ROWS + 3, 128).to(dtype)):
        y = layer(rows)
        assert y.dtype == dtype and y.shape == (rows.shape[0], 40)
        torch.testing.assert_close(y.float(), reference(parts, rows.bfloat16()), atol=2e-3, rtol=1e-2)


def test_stacked_int4_layers_by_index() -> None:
    torch.manual_seed(2)
    w = torch.randn(3, 24, 64) * 0.02
    layer = Int4Linear.from_weight(w, 32)
    parts = tuple(t.clone() for t in layer.canonical())
    x = torch.randn(1, 2, 64)
    eager = [layer(x, i) for i in range(3)]
    layer.pack_for_cpu()
    for i in range(3):
        want = reference(tuple(p[i] for p in parts), x)
        torch.testing.assert_close(eager[i], want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer(x, i), want, atol=2e-3, rtol=1e-2)
    assert (layer.out_features, layer.in_features, layer.group) == (24, 64, 32)


def test_a_kernel_takes_every_product_on_its_own_packed_copy() -> None:
    layer = Int4Linear.from_weight(torch.randn(2, 16, 64), 64)
    calls = []

    class Kernel:
        def matmul(self, rows: torch.Tensor, packed: torch.Tensor, out_features: int, group: int) -> torch.Tensor:
            calls.append((rows.shape[0], tuple(packed.shape), out_features, group))
            return torch.zeros(rows.shape[0], out_features)

    layer.use_kernel(Kernel())
    assert layer.canonical() is None and layer.kernel_weights.shape == (2, 1, 64 + 8 * 64)
    assert layer(torch.randn(1, 3, 64), 1).abs().sum() == 0 and calls == [(3, (1, 576), 16, 64)]
    assert layer(torch.randn(quant.DEQUANTIZE_ROWS, 64), 0).shape == (quant.DEQUANTIZE_ROWS, 16)


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    from csmcli import checkpoint
    from csmcli.loader import build_model

    ckpt = checkpoint.inspect(tiny_dir)
    state, _ = checkpoint.read_tensors(ckpt)
    return build_model(ckpt.config, state, torch.device("cpu"), torch.float32)


def test_quantize_int4_keeps_the_chosen_parts_at_int8(tiny_model) -> None:
    model = quant.quantize(copy.deepcopy(tiny_model), "int4")
    assert isinstance(model.backbone.layers[0].w13, Int4Linear) and model.backbone.layers[0].w13.group == 64
    assert isinstance(model.decoder.layers[0].wqkv, Int4Linear) and model.decoder.layers[0].wqkv.group == 32
    kept = {"codebook0_head": model.codebook0_head, "heads": model.head_layers, "projection": model.projection}
    for part, layer in kept.items():
        assert isinstance(layer, Int8Linear) == (part in quant.INT4_KEEP_INT8), part
    assert model.audio_head is None
    everything = quant.quantize(copy.deepcopy(tiny_model), "int4", keep_int8=())
    assert isinstance(everything.head_layers, Int4Linear) and everything.head_layers.qweight.dim() == 3
    with pytest.raises(ValueError, match="before preparing"):
        quant.quantize(model, "int8")


def test_saved_quantized_layers_load_back_identically(tiny_model) -> None:
    model = quant.quantize(copy.deepcopy(tiny_model), "int4")
    saved = quant.quantized_tensors(model)
    assert saved["decoder.0.w13.qweight"].dtype == torch.uint8 and saved["heads.weight"].dtype == torch.int8
    again = quant.load_quantized(copy.deepcopy(tiny_model), saved)
    for name, t in quant.quantized_tensors(again).items():
        assert torch.equal(t, saved[name]), name
    x, wide = torch.randn(1, 1, 64), torch.randn(3, 128)
    assert torch.equal(model.codebook0_head(x), again.codebook0_head(x))
    assert torch.equal(model.backbone.layers[1].w2(wide), again.backbone.layers[1].w2(wide))


def test_quantized_tensors_that_do_not_fit_change_nothing(tiny_model) -> None:
    saved = quant.quantized_tensors(quant.quantize(copy.deepcopy(tiny_model), "int4"))
    model = copy.deepcopy(tiny_model)
    for broken in (
        {k: v for k, v in saved.items() if k != "decoder.1.wo.mins"},
        {**saved, "backbone.0.wqkv.qweight": saved["backbone.0.wqkv.qweight"][:-1]},
        {**saved, "heads.scales": saved["heads.scales"].double()},
        {**saved, "decoder.0.w2.scales": saved["decoder.0.w2.scales"][:-1]},
    ):
        with pytest.raises(ValueError, match="quantized weights"):
            quant.load_quantized(model, broken)
        assert isinstance(model.backbone.layers[0].wqkv, torch.nn.Linear) and model.audio_head is not None
