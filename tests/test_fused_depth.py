"""A frame's depth-decoder steps in one C++ call (csmcli.qkernel.FusedDepth) and its sampler."""

from __future__ import annotations

import dataclasses
from unittest import mock

import pytest
import torch
from tiny_checkpoint import _config_json, tiny_config

from csmcli import cpu, qkernel
from csmcli.model import CSMModel
from csmcli.quant import quantize
from csmcli.sampling import FrameSampler, SamplingParams, frame_keys, sample

needs_kernels = pytest.mark.skipif(qkernel.kernel("avx2") is None, reason="no C++ compiler or no AVX2 on this CPU")

CODES = 2048


def _params(rows: int, top_k: int) -> SamplingParams:
    """Rows with every mix of settings: greedy (temperature 0 or top-k 1), top-k up to ``top_k``,
    top-p and the repetition penalty."""
    p = SamplingParams.empty(rows, torch.device("cpu"))
    for r in range(rows):
        temperature = (0.0, 0.5, 0.9, 1.3)[r % 4]
        k = min(top_k, (1, 5, 50, 64, CODES)[r % 5])
        p.set_row(r, temperature, k, (1.0, 0.9, 0.5)[r % 3], (1.0, 1.2)[r % 2], 1000 + r)
    p.frame[:] = torch.arange(rows) * 7 % 100
    return p


@pytest.fixture(scope="module")
def depth() -> qkernel.FusedDepth:
    return _model("int4").fused_depth


@needs_kernels
@pytest.mark.parametrize("k_max", [16, 50, 64, None])
@pytest.mark.parametrize("logit_dtype", [torch.bfloat16, torch.float32])
def test_the_c_sampler_picks_the_codes_sample_picks(depth, k_max: int | None, logit_dtype: torch.dtype) -> None:
    """Every rule (penalty, top-k by both of torch's selection algorithms, top-p, greedy rows) on
    logits with many ties (bfloat16 values) gives torch's codes, row for row."""
    torch.manual_seed(3)
    rows, codebooks = 40, 32
    params = _params(rows, k_max or CODES)
    keys = frame_keys(params.seed, params.frame, torch.arange(codebooks))
    recent = torch.randint(-1, CODES, (rows, 16, codebooks))
    for codebook in (1, 17, 31):
        logits = (torch.randn(rows, 2051) * 3).to(logit_dtype)
        for penalty in (True, False):
            for rules in ((True, True), (False, True), (True, False)):
                sampler = FrameSampler(sample, params, keys, recent if penalty else None, k_max, *rules, CODES)
                want = sampler(logits, codebook)
                torch.testing.assert_close(depth.sample(logits, sampler, codebook), want, rtol=0, atol=0)


@needs_kernels
def test_the_c_sampler_refuses_what_it_cannot_read(depth) -> None:
    params = _params(4, 50)
    keys = frame_keys(params.seed, params.frame, torch.arange(32))
    sampler = FrameSampler(sample, params, keys, None, 50, True, True, CODES)
    with pytest.raises(ValueError, match="every code"):
        depth.sample(torch.zeros(4, CODES - 1), sampler, 1)
    with pytest.raises(ValueError, match="cover 5 rows"):
        depth.sample(torch.zeros(5, 2051), sampler, 1)
    with pytest.raises(ValueError, match="cover 33 codebooks"):
        depth.sample(torch.zeros(4, 2051), sampler, 32)
    params.top_k = params.top_k.int()
    with pytest.raises(ValueError, match="usual dtypes"):
        depth.sample(torch.zeros(4, 2051), sampler, 1)


def _model(kind: str, prepare: bool = True) -> CSMModel:
    """A small CSM with a 64-wide depth decoder (the kernels' groups divide it), weights drawn so
    that logits spread over a few units, quantized (``int4``, ``int8``) or bfloat16 (``bf16``) and
    (``prepare``) prepared for three CPU slots."""
    config = _config_json(tiny_config())
    config["depth_decoder_config"].update(hidden_size=64, head_dim=16, intermediate_size=128)
    torch.manual_seed(5)
    model = CSMModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "embeddings" in name:
                p.normal_()
            else:  # [out, in], and the heads' [codebooks - 1, in, out]
                fan_in = p.shape[1] if name == "audio_head" else p.shape[-1]
                p.normal_(std=(3 if "head" in name else 1) / fan_in**0.5)
    model.init_buffers(torch.device("cpu"))
    model.eval()
    if kind == "bf16":
        model = model.to(torch.bfloat16)
    else:
        quantize(model, kind)
    if prepare:
        cpu.prepare_cpu(model, "auto", 3, cpu.cpu_caps("avx2") if kind == "bf16" else cpu.cpu_caps())
    return model


@needs_kernels
@pytest.mark.parametrize("kind", ["int4", "int8", "bf16"])
@torch.inference_mode()
def test_a_fused_depth_frame_gives_the_eager_steps_codes(kind: str) -> None:
    """The 31 steps in one call pick the codes the eager steps (each on the same fused step, head,
    projection and torch's sampling) pick, for rows with different settings, and leave the depth
    decoder's cache as they do; without a FrameSampler, or with a step given, the eager steps run."""
    model = _model(kind)
    assert model.fused_depth is not None and model.decoder.fused_step is not None
    dtype = model.audio_embeddings.weight.dtype
    rows = 3
    h = torch.randn(rows, model.backbone_spec.dim).to(dtype)
    for top_k in (1, 50, CODES):
        params = _params(rows, top_k)
        keys = frame_keys(params.seed, params.frame, torch.arange(model.num_codebooks))
        recent = torch.randint(-1, CODES, (rows, 16, model.num_codebooks))
        sampler = FrameSampler(sample, params, keys, recent, top_k, True, True, CODES)
        caches = [model.decoder.new_cache(rows, model.num_codebooks + 1, dtype, torch.device("cpu")) for _ in "ab"]
        got = model.decode_frame(h, sampler, caches[0])
        fused, model.fused_depth = model.fused_depth, None
        try:
            want = model.decode_frame(h, sampler, caches[1])
        finally:
            model.fused_depth = fused
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert len(set(got[:, 1:].flatten().tolist())) > 10  # lively codes, not one repeated
        torch.testing.assert_close(caches[0], caches[1], rtol=0, atol=0)
    model.fused_depth = mock.Mock(wraps=fused)
    model.decode_frame(h, lambda logits, codebook: logits.argmax(-1), caches[0])
    assert not model.fused_depth.mock_calls


@needs_kernels
@torch.inference_mode()
def test_engine_frames_run_their_depth_steps_in_one_call() -> None:
    """An engine's frames hand the fused depth decoder their rows and the frame's sampler; rows it
    cannot read are an error before any C++ runs."""
    from csmcli.engine import Engine

    model = _model("int4", prepare=False)
    engine = Engine(model, None, torch.device("cpu"), torch.float32, max_batch=2)
    fused = model.fused_depth
    model.fused_depth = mock.Mock(wraps=fused)
    for slot in range(2):
        engine.params.set_row(slot, 0.9, 50, 1.0, 1.1, slot)
    engine.hidden.normal_()
    codes = engine._frame(2, 1)
    assert codes.shape == (2, 32) and model.fused_depth.call_count == 1
    x, _, first, sampler = model.fused_depth.call_args.args
    assert x.shape == (2, 2, 64) and isinstance(sampler, FrameSampler)
    assert model.fused_depth.sample.call_count == 1 and torch.equal(codes[:, 0], first)
    cache = model.decoder.new_cache(2, 33, torch.float32, torch.device("cpu"))
    with pytest.raises(IndexError, match="do not fit"):
        fused(torch.zeros(3, 2, 64), cache, torch.zeros(3, dtype=torch.long), engine._sampler())
    sampler = engine._sampler()
    sampler.num_codes = 2052
    with pytest.raises(IndexError, match="2051 logits, not 2052"):
        fused(torch.zeros(2, 2, 64), cache, torch.zeros(2, dtype=torch.long), sampler)


def test_kernels_prefetch_every_row_on_intel_and_from_four_rows_elsewhere() -> None:
    assert cpu.prefetch_rows("GenuineIntel") == 1
    assert cpu.prefetch_rows("AuthenticAMD") == cpu.prefetch_rows("") == 4
    caps = cpu.detect_cpu_caps()
    assert caps.prefetch_rows == cpu.prefetch_rows(cpu._cpu_info("vendor_id"))
    assert cpu.cpu_caps("default").prefetch_rows == caps.prefetch_rows  # a lesser ISA, the same memory


@needs_kernels
@pytest.mark.parametrize("kind", ["int4", "int8", "bf16"])
@torch.inference_mode()
def test_prefetching_changes_no_float_and_prepare_cpu_sets_it(kind: str) -> None:
    """A frame gives the same codes whether the kernels prefetch from one row or from four (each
    setting runs its own loop), and prepare_cpu tells every kernel library the model uses the
    caps' setting."""
    model = _model(kind, prepare=False)
    caps = cpu.cpu_caps("avx2") if kind == "bf16" else cpu.cpu_caps()
    cpu.prepare_cpu(model, "auto", 3, dataclasses.replace(caps, prefetch_rows=3))
    libs = cpu.kernel_libraries(model)
    assert libs and all(lib.csm_prefetch_from(3) == 3 for lib in libs)
    dtype = model.audio_embeddings.weight.dtype
    h = torch.randn(3, model.backbone_spec.dim).to(dtype)
    params = _params(3, 50)
    keys = frame_keys(params.seed, params.frame, torch.arange(model.num_codebooks))
    sampler = FrameSampler(sample, params, keys, None, 50, True, True, CODES)
    codes = []
    for rows in (1, 4):
        for lib in libs:
            lib.csm_prefetch_from(rows)
        cache = model.decoder.new_cache(3, model.num_codebooks + 1, dtype, torch.device("cpu"))
        codes.append(model.decode_frame(h, sampler, cache))
    torch.testing.assert_close(codes[0], codes[1], rtol=0, atol=0)
