"""``csm bench``'s figures: the floor (bytes of weights one frame reads, counted from the loaded
tensors, over measured bandwidth) and transformers in each CPU dtype."""

from __future__ import annotations

import pytest

from csmcli.bench import frame_weight_bytes, memory_read_gb_s
from csmcli.loader import load_parts, make_engine
from csmcli.model import TransformerSpec


def _matrix_elements(spec: TransformerSpec) -> tuple[int, int]:
    """(weight-matrix elements, output channels) of all layers of one transformer, from its shape alone."""
    q, kv = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    shapes = [(q + 2 * kv, spec.dim), (spec.dim, q), (2 * spec.ffn_dim, spec.dim), (spec.dim, spec.ffn_dim)]
    return spec.n_layers * sum(o * i for o, i in shapes), spec.n_layers * sum(o for o, _ in shapes)


def _expected(parts, weight_size: int, scale_size: int) -> int:
    """A frame's bytes from the config: matrices at ``weight_size`` bytes per element plus one scale of
    ``scale_size`` bytes per output channel (int8), norms in the model's dtype."""
    model, float_size = parts.model, parts.dtype.itemsize
    back, depth = model.backbone_spec, model.depth_spec
    codebooks, vocab = model.num_codebooks, model.vocab

    def matrix(elements: int, channels: int) -> int:
        return elements * weight_size + channels * scale_size

    def transformer(spec: TransformerSpec) -> int:
        norms = (2 * spec.n_layers + 1) * spec.dim * float_size
        return matrix(*_matrix_elements(spec)) + norms

    return (
        transformer(back)
        + matrix(vocab * back.dim, vocab)  # codebook 0 head
        + codebooks * matrix(depth.dim * back.dim, depth.dim)  # the projection, once per codebook
        + (codebooks - 1) * transformer(depth)
        + matrix((codebooks - 1) * vocab * depth.dim, (codebooks - 1) * vocab)  # one depth head per codebook
    )


@pytest.mark.parametrize(
    "dtype, quantize, weight_size, scale_size",
    [("float32", "none", 4, 0), ("bfloat16", "none", 2, 0), ("float32", "int8", 1, 4), ("bfloat16", "int8", 1, 2)],
)
def test_frame_weight_bytes_count_the_stored_weights(tiny_dir, dtype, quantize, weight_size, scale_size) -> None:
    parts = load_parts(str(tiny_dir), device="cpu", dtype=dtype, quantize=quantize)
    expected = _expected(parts, weight_size, scale_size)
    assert frame_weight_bytes(parts.model) == expected
    # the CPU kernels' packed layouts hold the same weights; bf16 weights a CPU cannot multiply in bf16
    # (AVX2 only) are packed as a float32 copy, which is what its frames then read
    engine = make_engine(parts.model, parts.codec, parts.device, parts.dtype, 2, cpu_kernels="packed")
    upcast = dtype == "bfloat16" and quantize == "none" and not parts.cpu_caps.bf16_packed
    assert frame_weight_bytes(engine.model) == (_expected(parts, 4, scale_size) if upcast else expected)


def test_memory_read_bandwidth_is_measured() -> None:
    assert 0.1 < memory_read_gb_s(2**24, repeats=2) < 10_000


def test_the_cpu_baseline_is_transformers_best_dtype(tiny_dir) -> None:
    from csmcli.bench import BenchSetup, run_bench

    setup = BenchSetup(prompt_rows=8, frames=4, batch_sizes=(1,), warmup=1, voice_rows=16, baseline="transformers")
    r = run_bench(str(tiny_dir), setup, 1, device="cpu", dtype="bfloat16")
    runs = r["baseline"]["dtypes"]
    # each is a difference of two timed runs, which a loaded machine can even make negative: no sign check
    assert set(runs) == {"float32", "bfloat16"} and all(isinstance(run["ms_per_frame"], float) for run in runs.values())
    best = min(runs.values(), key=lambda run: run["ms_per_frame"])
    assert r["baseline"]["ms_per_frame"] == best["ms_per_frame"] == runs[r["baseline"]["dtype"]]["ms_per_frame"]
    assert r["speedup_vs_baseline"] == best["ms_per_frame"] / r["ms_per_frame"]
    assert r["floor_ms_per_frame"] == pytest.approx(r["frame_weight_mb"] / r["memory_read_gb_s"])


def test_frame_weight_bytes_count_the_int4_kernels_packed_copy(tiny_dir) -> None:
    parts = load_parts(str(tiny_dir), device="cpu", dtype="float32", quantize="int4")
    canonical = frame_weight_bytes(parts.model)  # codes plus float32 scales and minimums
    engine = make_engine(parts.model, parts.codec, parts.device, parts.dtype, 1)
    if not engine.cpu_kernels.startswith("int4-"):
        pytest.skip(f"the int4 kernel does not run here ({engine.cpu_kernels})")
    packed = frame_weight_bytes(engine.model)  # the same codes with fp16 scales and minimums
    assert 0.7 * canonical < packed < canonical


def test_alternating_steps_give_each_variant_its_turns(synth) -> None:
    """Each variant is set up once a round and timed over three steps of the batch's streams; the
    streams are cancelled at the end, so the engine is idle again."""
    from csmcli.bench import alternating_steps

    used: list[str] = []
    times = alternating_steps(synth.engine, 2, {"a": lambda: used.append("a"), "b": lambda: used.append("b")}, 2)
    assert used == ["a", "b", "a", "b"]
    assert set(times) == {"a", "b"} and all(ms > 0 for ms in times.values())
    assert not synth.engine.busy
