"""CPU kernels (packed oneDNN weights, compiled gemv), the narrowed sampler and the small-op rewrites.

Each fast path is checked against the plain torch computation it replaces; the whole model with
every projection on the compiled gemv is checked against transformers in test_equivalence.py.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from csmcli import cpu, qkernel
from csmcli.engine import Engine
from csmcli.errors import OptionsError
from csmcli.gemv import compiled_gemv
from csmcli.model import EAGER_LAYERS, Transformer, TransformerSpec, short_attention
from csmcli.quant import Int8Linear
from csmcli.sampling import SamplingParams, frame_keys, penalize, sample, uniform

GEMV = compiled_gemv()
needs_compiler = pytest.mark.skipif(GEMV is None, reason="torch.compile cannot build CPU kernels here")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3])
def test_packed_linear_matches_f_linear(dtype: torch.dtype, rows: int) -> None:
    torch.manual_seed(0)
    w = torch.randn(96, 64, dtype=dtype)
    x = torch.randn(2, rows, 64, dtype=dtype)
    layer = cpu.CpuLinear(w)
    got = layer(x)
    assert got.shape == (2, rows, 96) and got.dtype == dtype
    assert layer.packed_weights == (dtype == torch.float32 or cpu.cpu_caps().bf16_packed)
    if layer.packed_weights:
        tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.0, "rtol": 0.0}
        torch.testing.assert_close(got, F.linear(x, w), **tol)
    else:  # a CPU without oneDNN's bf16 kernels: the product in float32, rounded once
        torch.testing.assert_close(got, F.linear(x.float(), w.float()).to(dtype), atol=0.0, rtol=0.0)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_linear_matches_f_linear(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    w = torch.randn(300, 200, dtype=dtype)
    layer = cpu.CpuLinear(w, GEMV.gemv)
    one = torch.randn(1, 1, 200, dtype=dtype)
    ref = F.linear(one.float(), w.float())
    tol = 1e-4 if dtype == torch.float32 else 0.1  # bf16 output rounding of values ~ +-30
    torch.testing.assert_close(layer(one).float(), ref, atol=tol, rtol=1e-2)
    several = torch.randn(4, 200, dtype=dtype)  # prefill rows go through F.linear on the same weight
    torch.testing.assert_close(layer(several), F.linear(several, w), atol=0.0, rtol=0.0)


@needs_compiler
def test_int8_gemv_matches_int8pack() -> None:
    torch.manual_seed(2)
    layer = Int8Linear(torch.randn(512, 256) * 0.02, torch.bfloat16)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    packed = layer(x)
    layer.gemv_fn = GEMV.gemv_int8
    gemv = layer(x)
    assert gemv.dtype == torch.bfloat16 and gemv.shape == (1, 512)
    torch.testing.assert_close(gemv.float(), packed.float(), atol=2e-3, rtol=2e-2)
    dequantized = F.linear(x.float(), layer.weight.float() * layer.scales.float()[:, None])
    torch.testing.assert_close(gemv.float(), dequantized, atol=2e-3, rtol=2e-2)


def test_kernel_choice_is_validated() -> None:
    assert cpu.check_cpu_kernels() == "auto"
    assert cpu.check_cpu_kernels("plain") == "plain"
    with pytest.raises(OptionsError, match="CPU kernels must be one of auto, packed, plain"):
        cpu.check_cpu_kernels("fast")


def test_gemv_only_for_wide_single_row_matrices() -> None:
    assert cpu.wants_gemv(16384, 1024) and cpu.wants_gemv(3072, 2048)
    assert not cpu.wants_gemv(1024, 8192)  # long rows: packed / int8 kernels win there
    assert not cpu.wants_gemv(96, 64)  # tiny: call overhead would dominate


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # matmuls / multiply-and-sum
def test_short_attention_matches_sdpa(dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    q = torch.randn(3, 8, 1, 16, dtype=dtype)
    k = torch.randn(3, 2, 11, 16, dtype=dtype)
    v = torch.randn(3, 2, 11, 16, dtype=dtype)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(short_attention(q, k, v).float(), ref, **tol)


def test_rope_tables_match_direct_computation() -> None:
    spec = TransformerSpec(
        dim=32,
        n_layers=1,
        n_heads=2,
        n_kv_heads=1,
        head_dim=16,
        ffn_dim=64,
        norm_eps=1e-5,
        max_len=40,
        rope={"rope_type": "default", "rope_theta": 10000.0},
    )
    net = Transformer(spec)
    cos, sin = net.rope_tables(torch.float32)
    pos = torch.tensor([0, 7, 39])
    freqs = pos.float()[:, None] * net.inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    assert torch.equal(cos[pos], emb.cos()) and torch.equal(sin[pos, 8:], emb.sin()[:, 8:])
    assert torch.equal(sin[pos, :8], -emb.sin()[:, :8])  # rotate-half's sign, folded in
    x = torch.randn(3, 16)
    rotated = torch.cat((-x[:, 8:], x[:, :8]), dim=-1)  # the reference's rotate_half
    torch.testing.assert_close(x * cos[pos] + x.roll(8, dims=-1) * sin[pos], x * emb.cos() + rotated * emb.sin())
    assert net.rope_tables(torch.float32)[0] is cos  # cached
    assert net.rope_tables(torch.bfloat16)[0].dtype == torch.bfloat16
    assert math.isclose(float(cos[0, 0]), 1.0)


def _full_vocabulary_sample(logits, params, codebook, num_codes, recent=None):
    """The sampler before candidates were narrowed: sort all codes, scatter the keep mask back."""
    b = logits.shape[0]
    logits = logits[:, :num_codes].float()
    if recent is not None:
        logits = penalize(logits, recent, params.repetition_penalty[:b])
    greedy = logits.argmax(dim=-1)
    scores = logits / params.temperature[:b, None].clamp(min=1e-5)
    ordered, order = scores.sort(dim=-1, descending=True)
    rank_ok = torch.arange(num_codes)[None] < params.top_k[:b, None]
    probs = ordered.masked_fill(~rank_ok, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    top_p = params.top_p[:b, None]
    keep_sorted = rank_ok & ((mass_before < top_p) | (top_p >= 1))
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    u = uniform(frame_keys(params.seed[:b], params.frame[:b], codebook)[:, 0], params.hashes[:num_codes])
    sampled = (scores - torch.log(-torch.log(u))).masked_fill(~keep, float("-inf")).argmax(dim=-1)
    is_greedy = (params.temperature[:b] == 0) | (params.top_k[:b] == 1)
    return torch.where(is_greedy, greedy, sampled)


def test_narrowed_sampling_draws_the_same_codes() -> None:
    torch.manual_seed(4)
    params = SamplingParams.empty(5, torch.device("cpu"))
    settings = [(0.9, 50, 1.0, 1.0), (1.3, 7, 0.8, 1.0), (0.0, 50, 1.0, 1.0), (0.7, 1, 1.0, 1.0), (1.0, 30, 0.5, 1.2)]
    for row, (temp, k, p, pen) in enumerate(settings):
        params.set_row(row, temp, k, p, pen, 100 + row)
    recent = torch.randint(-1, 2048, (5, 16))
    picked = 0
    for frame in range(20):
        params.frame.fill_(frame)
        logits = torch.randn(5, 2051) * 3
        keys = frame_keys(params.seed, params.frame, torch.arange(32))  # a frame's keys at once, as engines do
        for codebook in (0, 5, 31):
            ref = _full_vocabulary_sample(logits, params, codebook, 2048, recent)
            assert torch.equal(sample(logits, params, codebook, 2048, recent), ref)
            assert torch.equal(sample(logits, params, codebook, 2048, recent, k_max=50), ref)
            assert torch.equal(sample(logits, params, codebook, 2048, recent, k_max=50, keys=keys), ref)
            # rows 0, 2 and 3 keep all their top-k mass and only row 0 is not greedy: skipping a rule
            # changes only the rows that use it
            lean = sample(logits, params, codebook, 2048, recent, k_max=50, keys=keys, top_p=False)
            assert torch.equal(lean[[0, 2, 3]], ref[[0, 2, 3]])
            lean = sample(logits, params, codebook, 2048, recent, k_max=50, keys=keys, top_p=False, greedy=False)
            assert torch.equal(lean[0], ref[0])
            no_penalty = _full_vocabulary_sample(logits, params, codebook, 2048)
            assert torch.equal(sample(logits, params, codebook, 2048, None, k_max=50), no_penalty)
            picked += int((ref != logits[:, :2048].argmax(-1)).sum())
    assert picked > 20, "sampling rows should not all be greedy"


def test_bench_reports_both_engines_on_the_cpu(tiny_dir) -> None:
    from csmcli.bench import BenchSetup, run_bench

    setup = BenchSetup(prompt_rows=16, frames=2, batch_sizes=(1, 2), warmup=1, voice_rows=24)
    r = run_bench(str(tiny_dir), setup, 1, device="cpu", dtype="float32", quantize="int8", cpu_kernels="packed")
    assert r["cpu_kernels"] == "packed" and r["cpu_kernels_batched"] == ("fbgemm" if cpu.int8_fbgemm() else "packed")
    assert r["quantization"] == "int8" and r["threads"] == 1
    assert set(r["batches"]) == {"1", "2"}
    assert r["ms_per_frame"] == r["batches"]["1"]["ms_per_frame"] > 0
    assert r["batches"]["2"]["frames_per_s"] > 0 and r["prefill_ms"] > 0
    assert r["time_to_first_audio_cached_prefix_ms"] > 0


def test_int8_prompt_rows_use_the_float_gemm_with_the_same_result() -> None:
    from csmcli import quant

    torch.manual_seed(5)
    layer = Int8Linear(torch.randn(64, 48) * 0.02, torch.bfloat16)
    rows = torch.randn(quant.DEQUANTIZE_ROWS + 8, 48, dtype=torch.bfloat16)
    expected = torch._weight_int8pack_mm(rows, layer.weight, layer.scales)
    torch.testing.assert_close(layer(rows).float(), expected.float(), atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("weights", ["float32", "int8"])
def test_compiled_engine_matches_the_eager_engine(tiny_dir, monkeypatch: pytest.MonkeyPatch, weights: str) -> None:
    """``Engine.compile()`` on the CPU (every depth-decoder step one graph, inductor's C++ backend)
    gives the eager engine's codes, and compiles everything up front: one graph per shape (one or
    two rows, one or several slots), none per codebook, top_k or repetition penalty.

    ``float32`` runs plain kernels and the stacked ``audio_head`` (the GPU's layout); ``int8`` the
    stacked int8 heads with every single-row product on the int8 gemv (the CPU's fast path), so
    that inductor's own loop for it is checked too."""
    from torch._dynamo.utils import counters

    from csmcli import GenerationOptions, Synthesizer

    if weights == "float32":
        kernels, quantize = "plain", "none"  # packed oneDNN weights cannot be compiled
    else:
        monkeypatch.setattr(cpu, "GEMV_MIN_ELEMENTS", 0)  # the tiny matrices take the gemv too
        kernels, quantize = None, "int8"
    synth = Synthesizer.load(
        str(tiny_dir), device="cpu", dtype="float32", max_batch_size=2, quantize=quantize, cpu_kernels=kernels
    )
    if weights == "int8":  # eager multi-slot int8 runs on fbgemm; the compiler's layout, eager, is the reference
        cpu.check_model_compilable(synth.model)
        assert synth.model.decoder.layers[0].w13.gemv and synth.model.head_layers.weight.dim() == 3
    greedy = GenerationOptions(temperature=0, max_audio_ms=6 * 80)
    texts = [("Hello from CSM.", 0), ("How are you doing today?", 1)]
    settings = [GenerationOptions(seed=1, max_audio_ms=6 * 80), GenerationOptions(seed=2, top_k=200, max_audio_ms=480)]
    penalty = GenerationOptions(seed=3, top_k=1, repetition_penalty=1.3, max_audio_ms=6 * 80)

    def run() -> list[torch.Tensor]:
        solo = synth.generate(*texts[0], options=greedy)
        also = synth.generate(*texts[1], options=penalty)
        jobs = [synth.job(t, s, [], o) for (t, s), o in zip(texts, settings, strict=True)]
        return [solo.codes, also.codes, *(r.codes for r in synth.generate_many(jobs))]

    eager = run()
    synth.engine.compile()
    assert synth.engine.depth_step is not None
    graphs = counters["stats"]["unique_graphs"]
    compiled = run()
    assert counters["stats"]["unique_graphs"] == graphs, "a request compiled something"
    for a, b in zip(eager, compiled, strict=True):
        assert len(a) > 0 and torch.equal(a, b)
    # the compiled functions are this engine's: another engine on the same model stays eager
    other = Engine(synth.model, synth.codec, synth.device, synth.dtype, max_batch=2, cpu_kernels=kernels)
    assert other.layer_fns is EAGER_LAYERS and other.depth_step is None
    job = other.submit(synth.job(*texts[0], [], greedy))
    other.run_until_done(job)
    assert torch.equal(job.all_codes(), synth.generate(*texts[0], [], greedy).codes)  # compiled = eager, above
    assert counters["stats"]["unique_graphs"] == graphs, "the eager engine ran compiled code"


def test_a_compiled_int4_engine_calls_the_kernel_inside_its_graphs(tiny_dir) -> None:
    """With ``--quantize int4`` the W4A8 kernel is a torch operator, so ``Engine.compile()`` traces
    through it (no graph break) and the compiled layers give the eager ones' results.  Codes are
    not compared: inductor's RMSNorm differs from eager's in the last bit, and the kernel's 8-bit
    rounding of activations can turn that into a different code of a tiny random model.

    Both transformers also have the kernel's fused step, which frames use in place of the layers
    (compiled or not); compiling keeps the depth step eager around it, with compiled sampling."""
    from torch._dynamo.utils import counters

    from csmcli import GenerationOptions, Synthesizer
    from csmcli.model import _attn_out_ffn

    caps = cpu.detect_cpu_caps()
    if qkernel.kernel_for(caps.isa, caps.vnni, caps.avx_vnni) is None:
        pytest.skip("no int4 CPU kernel here (no C++ compiler or no AVX2)")
    synth = Synthesizer.load(str(tiny_dir), device="cpu", dtype="float32", max_batch_size=2, quantize="int4")
    block = synth.model.decoder.layers[0]
    assert block.w13.kernel is not None
    torch.manual_seed(0)
    x, attn = torch.randn(2, 1, block.spec.dim), torch.randn(2, block.spec.n_heads, 1, block.spec.head_dim)
    with torch.inference_mode():
        eager = _attn_out_ffn(block, x, attn)
        counters.clear()
        synth.engine.compile()
        compiled = synth.engine.layer_fns.attn_out_ffn(block, x, attn)
        assert not counters["graph_break"] and counters["stats"]["unique_graphs"] > 0
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert synth.engine.depth_step is None
    graphs, calls = counters["stats"]["unique_graphs"], []
    for net in (synth.model.backbone, synth.model.decoder):
        net.fused_step = functools.partial(lambda fused, *a: calls.append(a[0].shape) or fused(*a), net.fused_step)
    codes = synth.generate("Hello from CSM.", 0, options=GenerationOptions(temperature=0, max_audio_ms=4 * 80)).codes
    assert codes.shape == (4, 32) and counters["stats"]["unique_graphs"] == graphs
    assert calls.count((1, 1, synth.model.backbone_spec.dim)) >= 3  # backbone steps (and short prompt rows)
    assert calls.count((1, 1, synth.model.depth_spec.dim)) == 4 * 30  # depth steps 2..31 of each frame


def test_compiling_packed_cpu_weights_is_a_one_line_error(tiny_dir) -> None:
    from csmcli import Synthesizer

    with pytest.raises(OptionsError, match="compiling on the CPU needs quantized weights"):
        Synthesizer.load(str(tiny_dir), device="cpu", dtype="float32", compile=True)
