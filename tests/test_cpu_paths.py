"""The CPU paths of a CPU without AVX-512 (AVX2 + FMA), run on any x86 CPU.

``cpu_isa="avx2"`` (``CSM_CPU_ISA=avx2`` for the CLI) makes the kernels take the choices such a
CPU gets; the ``no_onednn_bf16`` fixture also makes oneDNN's bfloat16 reorder raise as it does
there, so any bf16 packing left on these paths fails the test.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from csmcli import cpu
from csmcli.errors import OptionsError

AVX2 = cpu.cpu_caps("avx2")
EPYC_ERROR = (
    "mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or avx512bw, avx512vl and avx512dq"
)
# the same failure in a subprocess (the CLI): patched before csmcli loads
PATCH = f"""
import torch
_reorder = torch.ops.mkldnn._reorder_linear_weight
def _no_bf16(w, *args):
    if w.dtype == torch.bfloat16:
        raise RuntimeError({EPYC_ERROR!r})
    return _reorder(w, *args)
torch.ops.mkldnn._reorder_linear_weight = _no_bf16
"""


@pytest.fixture()
def no_onednn_bf16(monkeypatch: pytest.MonkeyPatch):
    """oneDNN's bf16 reorder raises, as on an AVX2 CPU; the capabilities are probed afresh."""
    reorder = torch.ops.mkldnn._reorder_linear_weight

    def refuse_bf16(w: torch.Tensor, *args):
        if w.dtype == torch.bfloat16:
            raise RuntimeError(EPYC_ERROR)
        return reorder(w, *args)

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse_bf16)
    cpu.detect_cpu_caps.cache_clear()
    yield
    cpu.detect_cpu_caps.cache_clear()


def test_cpu_caps_are_detected_and_can_only_be_lowered() -> None:
    caps = cpu.cpu_caps()
    assert caps.isa == {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability(), "default")
    assert cpu.CpuCaps("avx2", bf16_packed=False, native_bf16=False, prefetch_rows=caps.prefetch_rows) == AVX2
    assert AVX2.simdlen == 256 and cpu.cpu_caps("default").simdlen == 0
    with pytest.raises(OptionsError, match="CPU ISA must be one of avx512, avx_vnni, avx2, default"):
        cpu.cpu_caps("sse4")
    if caps.isa != "avx512":
        with pytest.raises(OptionsError, match="this CPU offers"):
            cpu.cpu_caps("avx512")
    if caps.avx_vnni:
        want = cpu.CpuCaps("avx2", False, False, avx_vnni=True, prefetch_rows=caps.prefetch_rows)
        assert cpu.cpu_caps("avx_vnni") == want
    else:
        with pytest.raises(OptionsError, match="CPU ISA avx_vnni requested but this CPU lacks AVX-VNNI"):
            cpu.cpu_caps("avx_vnni")


def test_the_probe_finds_no_bf16_packing(no_onednn_bf16) -> None:
    assert not cpu.detect_cpu_caps().bf16_packed


@pytest.mark.parametrize("caps", [None, AVX2], ids=["probed", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3])
def test_linear_without_onednn_bf16(no_onednn_bf16, caps, dtype: torch.dtype, rows: int) -> None:
    """What failed on the AVX2 EPYC (``test_packed_linear_matches_f_linear[*-dtype1]``): bf16
    weights now stay plain and multiply in float32; float32 weights are still packed."""
    torch.manual_seed(0)
    w = torch.randn(96, 64, dtype=dtype)
    x = torch.randn(2, rows, 64, dtype=dtype)
    layer = cpu.CpuLinear(w, caps=caps)
    assert layer.packed_weights == (dtype == torch.float32) and layer.upcast == (dtype == torch.bfloat16)
    got = layer(x)
    assert got.shape == (2, rows, 96) and got.dtype == dtype
    torch.testing.assert_close(
        got.float(), F.linear(x.float(), w.float()), atol=1e-2 if dtype != torch.float32 else 1e-5, rtol=1e-2
    )


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_bfloat16_model_on_the_avx2_path(tiny_dir, no_onednn_bf16, monkeypatch, quantize: str) -> None:
    """The whole model in bfloat16 as an AVX2 CPU runs it: nothing packed in bf16, every product on
    the bf16 kernel or (int8) single rows through the compiled gemv (every matrix, tiny ones
    included here), prompts in float32, and the greedy codes of the float32 model."""
    from csmcli import GenerationOptions, Synthesizer

    monkeypatch.setattr(cpu, "GEMV_MIN_ELEMENTS", 0)
    synth = Synthesizer.load(str(tiny_dir), device="cpu", dtype="bfloat16", quantize=quantize, cpu_isa="avx2")
    assert synth.engine.cpu_caps == AVX2
    layers = [m for m in synth.model.modules() if isinstance(m, cpu.CpuLinear)]
    assert not any(m.packed_weights for m in layers)
    if quantize == "none" and cpu.bf16_kernel(torch.bfloat16, AVX2) is not None:
        assert synth.engine.cpu_kernels == "bf16-avx2"
    elif cpu.gemv_kernels(torch.bfloat16, AVX2) is not None:
        assert "gemv+" in synth.engine.cpu_kernels and synth.model.decoder.layers[0].w13.gemv
    audio = synth.generate("Hello from CSM.", options=GenerationOptions(temperature=0, max_audio_ms=480))
    assert audio.stats.frames == 6 and len(audio.samples) == 6 * 1920


def _csm(args: list[str], env: dict) -> subprocess.CompletedProcess:
    """The real CLI in a fresh interpreter where oneDNN's bf16 reorder raises (as on the EPYC)."""
    code = PATCH + "import sys\nfrom csmcli.cli import main\nsys.argv = ['csm', *sys.argv[1:]]\nmain()\n"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, env=env, timeout=300)


@pytest.mark.parametrize("extra", [[], ["--quantize", "int8"]], ids=["bf16", "int8"])
def test_say_bfloat16_with_the_avx2_override(tiny_dir, cli_env, tmp_path, extra: list[str]) -> None:
    out = tmp_path / "x.wav"
    args = ["say", "Hello there.", "-m", str(tiny_dir), "--device", "cpu", "--dtype", "bfloat16", "-o", str(out)]
    r = _csm([*args, "--max-audio-ms", "480", "-q", *extra], {**cli_env, "CSM_CPU_ISA": "avx2"})
    assert r.returncode == 0, r.stderr.decode()
    assert out.stat().st_size > 6 * 1920


def test_bad_cpu_isa_is_a_one_line_error(tiny_dir, cli_env, tmp_path) -> None:
    args = ["say", "Hi.", "-m", str(tiny_dir), "--device", "cpu", "-o", str(tmp_path / "x.wav"), "-q"]
    r = subprocess.run(["csm", *args], capture_output=True, env={**cli_env, "CSM_CPU_ISA": "sse4"}, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr.decode()
    assert "CPU ISA must be one of avx512, avx_vnni, avx2, default, got 'sse4'" in r.stderr.decode()


def test_bench_reports_the_cpu_path(tiny_dir) -> None:
    from csmcli.bench import BenchSetup, run_bench

    setup = BenchSetup(prompt_rows=16, frames=2, batch_sizes=(1,), warmup=1, voice_rows=24)
    r = run_bench(str(tiny_dir), setup, 1, device="cpu", dtype="bfloat16", cpu_kernels="packed", cpu_isa="avx2")
    assert r["cpu_isa"] == "avx2" and r["cpu_bf16_packed"] is False and r["dtype"] == "bfloat16"
    assert r["cpu_prefetch_rows"] == cpu.detect_cpu_caps().prefetch_rows
    assert r["cpu_kernels"] == "float32" and r["ms_per_frame"] > 0


@pytest.mark.parametrize("rows", [1, 8])
def test_multi_slot_bf16_weights_are_packed_as_float32(no_onednn_bf16, rows: int) -> None:
    """bf16 weights where oneDNN cannot pack bf16, in a multi-slot engine: packed once as float32
    (not converted on every call), bf16 in and out, the float32 product of the bf16 weights."""
    torch.manual_seed(1)
    w = torch.randn(96, 64, dtype=torch.bfloat16)
    x = torch.randn(rows, 64, dtype=torch.bfloat16)
    layer = cpu.CpuLinear(w, caps=AVX2, float32=True)
    assert layer.packed_weights and not layer.upcast and layer.compute_dtype == torch.float32
    got = layer(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, F.linear(x.float(), w.float()).to(torch.bfloat16), atol=1e-2, rtol=1e-2)


def _float32_packed(model) -> bool:
    layers = [m for m in model.modules() if isinstance(m, cpu.CpuLinear)]
    weights = [w for m in layers for w in (m.packed or (m.weight,))]
    return (
        bool(layers)
        and all(m.packed_weights and not m.gemv for m in layers)
        and all(w.dtype == torch.float32 for w in weights)
    )


def test_multi_slot_bf16_engine_on_the_avx2_path(tiny_dir, no_onednn_bf16, monkeypatch) -> None:
    """Two slots, bf16 weights, the AVX2 path without the bf16 kernel (``packed`` kernels, as
    without a compiler): every projection packed as float32 once (no bf16 copy kept), two streams
    generated together; a one-slot model re-prepared for two slots (as ``csm bench`` does) ends
    the same way."""
    from csmcli import GenerationOptions, Synthesizer

    monkeypatch.setattr(cpu, "GEMV_MIN_ELEMENTS", 0)
    settings = {"device": "cpu", "dtype": "bfloat16", "cpu_isa": "avx2", "cpu_kernels": "packed"}
    synth = Synthesizer.load(str(tiny_dir), max_batch_size=2, **settings)
    assert synth.engine.cpu_kernels == "packed-float32" and _float32_packed(synth.model)
    options = GenerationOptions(temperature=0, max_audio_ms=6 * 80)
    jobs = [synth.job(text, 0, [], options) for text in ("Hello from CSM.", "Good morning.")]
    assert [a.stats.frames for a in synth.generate_many(jobs)] == [6, 6]
    one = Synthesizer.load(str(tiny_dir), **settings)
    assert not _float32_packed(one.model)
    assert cpu.prepare_cpu(one.model, "packed", 2, AVX2) == "packed-float32" and _float32_packed(one.model)


def test_gemv_width_is_stated_where_torch_is_limited_to_avx2(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``ATEN_CPU_CAPABILITY=avx2`` (how the AVX2 path is run on a bigger CPU) torch detects
    AVX2 but inductor's own vector width stays AVX-512, and its gemv gave NaNs (so the kernels were
    dropped): below AVX-512 the gemv is built at the detected ISA's width."""
    asked = []
    monkeypatch.setattr(cpu, "detect_cpu_caps", lambda: AVX2)
    monkeypatch.setattr(cpu, "compiled_gemv", lambda dtype, simdlen: asked.append(simdlen))
    cpu.gemv_kernels(torch.bfloat16)
    cpu.gemv_kernels(torch.bfloat16, AVX2)
    assert asked == [256, 256]


def test_compiling_a_multi_slot_bf16_engine_on_the_avx2_path_needs_the_bf16_kernel() -> None:
    """One slot keeps plain bf16 weights, and so do several on the bf16 kernel: both traceable.
    Without the kernel (here: ``packed`` kernels asked for) several slots pack a float32 copy."""
    cpu.check_compilable(False, None, torch.bfloat16, AVX2)
    with pytest.raises(OptionsError, match="compiling on the CPU needs quantized weights"):
        cpu.check_compilable(False, "packed", torch.bfloat16, AVX2, max_batch=2)
    if cpu.bf16_kernel(torch.bfloat16, AVX2) is not None:
        cpu.check_compilable(False, None, torch.bfloat16, AVX2, max_batch=2)
