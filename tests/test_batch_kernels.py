"""int8 weights on fbgemm or the W8A8 kernel in multi-slot engines, and the layout switches around them.

fbgemm quantizes each call's activations to 8 bits, so its products are checked against the
float product of the dequantized weights with a tolerance for that (about 1% of the output's
norm); ``scripts/int8_kernels_fidelity.py`` measures what it does to the codes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from csmcli import cpu, qkernel, quant
from csmcli.quant import Int8Linear

needs_fbgemm = pytest.mark.skipif(not cpu.int8_fbgemm(), reason="this torch has no fbgemm (not x86)")


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


def _dequantized(layer: Int8Linear, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), weight.float() * layer.scales.float()[..., None])


@needs_fbgemm
@pytest.mark.parametrize("rows", [1, 3, 8, quant.DEQUANTIZE_ROWS + 4])
@pytest.mark.parametrize("reduce_range", [False, True])
def test_fbgemm_matches_the_dequantized_product(rows: int, reduce_range: bool) -> None:
    torch.manual_seed(0)
    layer = Int8Linear(torch.randn(320, 256) * 0.02, torch.bfloat16)
    weight = layer.weight.clone()
    x = torch.randn(2, rows, 256, dtype=torch.bfloat16)
    plain = layer(x)
    layer.use_fbgemm(reduce_range)
    got = layer(x)
    assert got.shape == (2, rows, 320) and got.dtype == torch.bfloat16
    want = _dequantized(layer, weight, x)
    # 8-bit activations (7 with reduce_range): about 0.5% (1%) of the norm, plus bf16 output rounding
    assert _relative_error(got, want) < (0.02 if reduce_range else 0.01)
    assert _relative_error(plain, want) < 0.01  # the plain kernels, for scale
    assert _relative_error(got, want) > 0  # it really is another computation


@needs_fbgemm
def test_fbgemm_stack_is_indexed_per_layer() -> None:
    torch.manual_seed(1)
    layer = Int8Linear(torch.randn(3, 96, 64) * 0.02, torch.float32)
    weight = layer.weight.clone()
    layer.use_fbgemm(reduce_range=False)
    x = torch.randn(4, 64)
    for i in range(3):
        want = F.linear(x, weight[i].float() * layer.scales[i][:, None])
        assert _relative_error(layer(x, index=i), want) < 0.01


@needs_fbgemm
def test_the_weights_are_stored_once_in_either_layout() -> None:
    layer = Int8Linear(torch.randn(2, 64, 48), torch.bfloat16)
    weight = layer.weight.clone()
    layer.use_fbgemm(reduce_range=False)
    assert layer.weight is None and [name for name, _ in layer.named_buffers()] == ["scales"]
    assert len(layer.packed) == 2
    layer.use_plain()
    assert layer.packed == () and torch.equal(layer.weight, weight)  # the same int8 values back


def _int8_kernel_path() -> str | None:
    caps = cpu.detect_cpu_caps()
    fast = qkernel.kernel_for(caps.isa, caps.vnni, caps.avx_vnni)
    return fast.path if fast else None


@needs_fbgemm
def test_multi_slot_engine_without_the_w8a8_kernel_runs_int8_on_fbgemm(tiny_dir) -> None:
    """A real engine with two slots and no compiled kernels: every int8 layer on fbgemm, no int8
    weight left in a buffer, and two streams generated together; a one-slot engine on the same
    model moves every layer off fbgemm."""
    from csmcli import GenerationOptions, Synthesizer

    synth = Synthesizer.load(
        str(tiny_dir), device="cpu", dtype="bfloat16", quantize="int8", max_batch_size=2, cpu_kernels="packed"
    )
    assert synth.engine.cpu_kernels == "fbgemm"
    layers = [m for m in synth.model.modules() if isinstance(m, Int8Linear)]
    assert layers and all(m.packed and m.weight is None for m in layers)
    assert not any(b.dtype == torch.int8 for b in synth.model.buffers())
    options = GenerationOptions(temperature=0, max_audio_ms=6 * 80)
    jobs = [synth.job(text, speaker, [], options) for text, speaker in (("Hello there.", 0), ("Good morning.", 1))]
    audios = synth.generate_many(jobs)
    assert [a.stats.frames for a in audios] == [6, 6]
    assert all(len(a.samples) == 6 * 1920 for a in audios)
    assert "fbgemm" not in cpu.prepare_cpu(synth.model, "packed", max_batch=1)
    assert not any(m.packed for m in layers)


@needs_fbgemm
@pytest.mark.parametrize(("isa", "path"), [(None, "avx512_vnni"), ("avx_vnni", "avx_vnni"), ("avx2", "avx2")])
def test_multi_slot_engine_runs_int8_on_the_kernel_and_fused_steps(tiny_dir, isa: str | None, path: str) -> None:
    """The layers the W8A8 kernel takes (a group divides their columns) run there, one row or
    several, on each path, and the backbone steps in one call; the tiny depth decoder's 32-column
    layers, which no group divides, stay on fbgemm."""
    from csmcli import GenerationOptions, Synthesizer

    found = _int8_kernel_path()
    if found is None or (isa is None and found != path) or (isa == "avx_vnni" and not cpu.detect_cpu_caps().avx_vnni):
        pytest.skip(f"needs the {path} kernel path and a C++ compiler")

    synth = Synthesizer.load(
        str(tiny_dir), device="cpu", dtype="float32", quantize="int8", max_batch_size=2, cpu_isa=isa
    )
    assert synth.engine.cpu_kernels == f"int8-{path}+fbgemm"
    backbone, decoder = synth.model.backbone.layers[0].w13, synth.model.decoder.layers[0].w13
    assert backbone.kernel is not None and backbone.weight is None and not backbone.packed
    assert decoder.kernel is None and decoder.packed
    calls = []
    fused = synth.model.backbone.fused_step
    assert fused is not None
    synth.model.backbone.fused_step = lambda *a: calls.append(a[0].shape) or fused(*a)
    options = GenerationOptions(temperature=0, max_audio_ms=4 * 80)
    jobs = [synth.job(text, speaker, [], options) for text, speaker in (("Hello there.", 0), ("Good morning.", 1))]
    assert [a.stats.frames for a in synth.generate_many(jobs)] == [4, 4]
    assert (2, 1, synth.model.backbone_spec.dim) in calls  # both streams' rows in one step


@needs_fbgemm
def test_compiling_returns_int8_to_the_plain_layout_for_good(tiny_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiler cannot read fbgemm's packed weights: before compiling they go back to the plain
    layout with the gemv for single rows, and engines made later on the same model keep it."""
    from csmcli import Synthesizer
    from csmcli.engine import Engine

    monkeypatch.setattr(cpu, "GEMV_MIN_ELEMENTS", 0)
    synth = Synthesizer.load(str(tiny_dir), device="cpu", dtype="float32", quantize="int8", max_batch_size=2)
    w13 = synth.model.decoder.layers[0].w13
    assert w13.packed and not w13.gemv
    cpu.check_model_compilable(synth.model)
    assert not w13.packed and w13.weight.dtype == torch.int8 and w13.traced
    if cpu.gemv_kernels(torch.float32) is not None:
        assert w13.gemv
    other = Engine(synth.model, synth.codec, synth.device, synth.dtype, max_batch=2)
    assert (
        other.cpu_kernels != "fbgemm" and not w13.packed and w13.gemv == (cpu.gemv_kernels(torch.float32) is not None)
    )


def test_without_fbgemm_int8_keeps_the_plain_kernels(tiny_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch whose quantized ops are gone (they are marked deprecated): the probe says so, and a
    multi-slot int8 engine runs its layers on the W8A8 kernel where it takes them (on AVX2 too),
    the rest in the plain layout."""
    from csmcli import Synthesizer

    def gone(*args):
        raise RuntimeError("quantized::linear_prepack is not available")

    monkeypatch.setattr(torch.ops.quantized, "linear_prepack", gone)
    cpu.int8_fbgemm.cache_clear()
    try:
        assert not cpu.int8_fbgemm()
        synth = Synthesizer.load(
            str(tiny_dir), device="cpu", dtype="float32", quantize="int8", max_batch_size=2, cpu_isa="avx2"
        )
        path = _int8_kernel_path() and "avx2"
        assert synth.engine.cpu_kernels.removeprefix(f"int8-{path}+") == "packed"
        layers = [m for m in synth.model.modules() if isinstance(m, Int8Linear)]
        assert not any(m.packed for m in layers)
        assert all((m.weight is None) == (m.kernel is not None) for m in layers)  # one layout each
        if path:
            assert synth.model.backbone.layers[0].w13.kernel.path == "avx2"
    finally:
        cpu.int8_fbgemm.cache_clear()
