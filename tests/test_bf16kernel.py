"""The hand-written bf16 CPU kernel: its packed layout, its products against float64 for one to a
batch's rows and shapes that are no multiple of its blocks, the engine paths that use it (AVX2, and
AVX-512 without AMX), the compiled operator, and the fallback when it cannot be built."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from csmcli import cpu
from csmcli.bf16kernel import BLOCK_ROWS, PATHS, kernel, pack

AVX2 = cpu.cpu_caps("avx2")
KERNEL = kernel("avx2")
#: the paths this CPU runs: AVX2, and AVX-512 where it has AVX-512F
KERNELS = list({k.path: k for k in (KERNEL, kernel("avx512")) if k is not None}.values())
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="no C++ compiler or no AVX2 on this CPU")


def test_the_kernel_builds_on_a_machine_with_a_compiler() -> None:
    assert KERNEL is not None or not torch.backends.cpu.get_cpu_capability().startswith("AVX")


def test_pack_interleaves_blocks_of_sixteen_rows_column_by_column() -> None:
    n, k = 20, 3
    w = torch.arange(n * k, dtype=torch.float32).reshape(n, k).to(torch.bfloat16)
    blob = pack(w)
    assert blob.shape == (2, k, BLOCK_ROWS) and blob.dtype == torch.bfloat16
    for row in (0, 7, 8, 15, 16, 19):
        block, r = divmod(row, BLOCK_ROWS)
        slot = 2 * (r % 8) + r // 8  # rows j and 8 + j share 32-bit lane j
        for col in range(k):
            assert blob[block, col, slot] == w[row, col]
    padded = [2 * j + h for h in range(2) for j in range(8) if 8 * h + j >= n - BLOCK_ROWS]
    assert not blob[1][:, padded].any()  # rows 20..31 are zeros
    stack = pack(torch.stack((w, -w)))
    assert torch.equal(stack[0], blob) and torch.equal(stack[1], -blob)


def test_pack_refuses_other_dtypes() -> None:
    with pytest.raises(ValueError, match="packs bfloat16 weights, got torch.float32"):
        pack(torch.zeros(16, 16))


@needs_kernel
@pytest.mark.parametrize("n, k", [(16, 16), (37, 19), (2051, 300), (5, 1), (48, 1031)])
@pytest.mark.parametrize("path", [k.path for k in KERNELS])
def test_each_path_matches_float64(n: int, k: int, path: str) -> None:
    """Any input width (no multiple of 8 or 16 needed), output rows padded to blocks of 16, and one
    to more than a pass of rows."""
    torch.manual_seed(n * k)
    w = torch.randn(n, k).to(torch.bfloat16)
    blob = pack(w)
    kern = kernel(path)
    assert kern.path == path and kern.name == f"bf16-{path}"
    for rows in (*range(1, 10), 13, 17):
        x = torch.randn(rows, k)
        y = kern.matmul(x, blob, n)
        assert y.shape == (rows, n) and y.dtype == torch.float32
        torch.testing.assert_close(y.double(), x.double() @ w.double().T, atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(len(KERNELS) < 2, reason="this CPU lacks AVX-512F (or no C++ compiler)")
def test_both_paths_give_the_same_floats() -> None:
    """The AVX-512 path adds each row's products in the AVX2 path's order, whatever the rows: the
    same model gives the same floats (and codes) on either kind of CPU."""
    torch.manual_seed(5)
    n, k = 2051, 600  # more than one chunk of columns, a partial last block
    blob = pack(torch.randn(n, k).to(torch.bfloat16))
    avx2, avx512 = kernel("avx2"), kernel("avx512")
    for rows in (*range(1, 10), 12, 13, 17):
        x = torch.randn(rows, k)
        assert torch.equal(avx512.matmul(x, blob, n), avx2.matmul(x, blob, n)), rows


@needs_kernel
def test_the_kernel_refuses_a_weight_of_another_shape() -> None:
    blob = pack(torch.zeros(32, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="does not fit 48 inputs and 32 outputs"):
        KERNEL.matmul(torch.zeros(1, 48), blob, 32)
    with pytest.raises(ValueError, match="does not fit 64 inputs and 33 outputs"):
        KERNEL.matmul(torch.zeros(1, 64), blob, 33)


def test_no_kernel_below_avx2() -> None:
    assert kernel("default") is None
    assert cpu.bf16_kernel(torch.bfloat16, cpu.cpu_caps("default")) is None
    assert cpu.bf16_kernel(torch.float32, AVX2) is None  # float32 weights: oneDNN's packed kernels
    assert cpu.bf16_kernel(torch.bfloat16, AVX2, "packed") is None  # no compiled kernels asked for


def test_without_a_compiler_a_bf16_engine_falls_back_with_one_warning(tiny_dir, tmp_path) -> None:
    """No C++ compiler on PATH: no kernel (one warning for the process), and a two-slot bf16 engine on
    the AVX2 path packs its weights once as float32, as before the kernel."""
    script = tmp_path / "fallback.py"
    script.write_text(
        "import logging\nfrom pathlib import Path\nfrom csmcli import Synthesizer, bf16kernel\n"
        f"logging.basicConfig()\nprint(bf16kernel.kernel('avx2', Path({str(tmp_path)!r})))\n"
        f"synth = Synthesizer.load({str(tiny_dir)!r}, device='cpu', dtype='bfloat16', cpu_isa='avx2',"
        " max_batch_size=2)\nprint(synth.engine.cpu_kernels)\n"
    )
    env = {**os.environ, "PATH": str(tmp_path)}  # no compiler on it
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.stdout.split() == ["None", "packed-float32"], done.stderr
    assert done.stderr.count("CPU kernel bf16kernel unavailable (no C++ compiler found)") == 1


@needs_kernel
def test_cpu_linear_on_the_kernel_keeps_one_bf16_copy_and_serves_any_rows() -> None:
    torch.manual_seed(2)
    w = torch.randn(3, 40, 72, dtype=torch.bfloat16)  # a stack, as the depth decoder's heads
    layer = cpu.CpuLinear(w, caps=AVX2, kernel=KERNEL)
    assert not layer.packed_weights and not layer.upcast and not layer.gemv
    assert layer.weight.shape == (3, 3, 72, BLOCK_ROWS) and layer.weight.dtype == torch.bfloat16
    for rows in (1, 8, 64):
        x = torch.randn(rows, 72, dtype=torch.bfloat16)
        got = layer(x, 2)
        assert got.shape == (rows, 40) and got.dtype == torch.bfloat16
        torch.testing.assert_close(got, F.linear(x.float(), w[2].float()).to(torch.bfloat16), atol=1e-2, rtol=1e-2)


@needs_kernel
@pytest.mark.parametrize("path", [k.path for k in KERNELS])
def test_compiled_code_calls_the_kernel_as_an_operator(path: str) -> None:
    torch.manual_seed(4)
    w = torch.randn(40, 72, dtype=torch.bfloat16)
    kern = kernel(path)
    layer = cpu.CpuLinear(w, caps=AVX2, kernel=kern)
    x = torch.randn(2, 72, dtype=torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), layer(x), atol=0, rtol=0)
    torch.testing.assert_close(
        torch.ops.csmcli.bf16_mm(x.float(), layer.weight, 40, PATHS[path]), kern.matmul(x, layer.weight, 40)
    )


def _codes(synth, texts: list[str]) -> list[torch.Tensor]:
    from csmcli import GenerationOptions

    options = GenerationOptions(temperature=0, max_audio_ms=6 * 80)
    if len(texts) == 1:
        return [synth.generate(texts[0], options=options).codes]
    return [a.codes for a in synth.generate_many([synth.job(t, 0, [], options) for t in texts])]


@needs_kernel
@pytest.mark.parametrize("slots", [1, 2])
def test_the_avx2_engine_runs_bf16_on_the_kernel_with_the_codes_of_the_float32_products(tiny_dir, slots: int) -> None:
    """bf16 weights on the AVX2 path, one slot or two: every projection on the kernel (one bf16 copy,
    nothing packed by oneDNN), and with the layers run one by one the greedy codes of the path it
    replaces (bf16 weights multiplied in float32: ``cpu_kernels="packed"``), which differs from it
    only in the order of the sums.  Frames run both transformers' fused steps by default (a float32
    residual stream, so other codes on this random model): every backbone step goes through one, and
    each frame's 31 depth-decoder steps through the fused depth decoder, slots together."""
    from csmcli import Synthesizer

    texts = ["Hello from CSM.", "Good morning."][:slots]
    settings = {"device": "cpu", "dtype": "bfloat16", "cpu_isa": "avx2", "max_batch_size": slots}
    synth = Synthesizer.load(str(tiny_dir), **settings)
    assert synth.engine.cpu_kernels == "bf16-avx2"
    layers = [m for m in synth.model.modules() if isinstance(m, cpu.CpuLinear)]
    assert layers and all(m.kernel is KERNEL and not m.packed_weights and not m.gemv for m in layers)
    assert all(m.weight.dtype == torch.bfloat16 and m.weight.shape[-1] == BLOCK_ROWS for m in layers)
    cpu.check_model_compilable(synth.model)  # the operator is traceable: nothing packed by oneDNN
    model = synth.model
    nets = (model.backbone, model.decoder)
    assert all(net.fused_step is not None for net in nets) and model.fused_depth is not None
    calls, backbone = [], model.backbone.fused_step
    model.backbone.fused_step = lambda *a: calls.append(a[0].shape) or backbone(*a)
    model.fused_depth = mock.Mock(wraps=model.fused_depth)
    codes = _codes(synth, texts)
    assert [c.shape for c in codes] == [(6, 32)] * slots and all(int(c.max()) < 2048 for c in codes)
    assert calls.count((slots, 1, model.backbone_spec.dim)) == 6  # each frame's backbone step, slots together
    assert [c.args[0].shape for c in model.fused_depth.call_args_list] == [(slots, 2, model.depth_spec.dim)] * 6
    for net in nets:
        net.fused_step = None
    model.fused_depth = None
    before = Synthesizer.load(str(tiny_dir), cpu_kernels="packed", **settings)
    assert before.engine.cpu_kernels == ("float32" if slots == 1 else "packed-float32")
    for got, want in zip(_codes(synth, texts), _codes(before, texts), strict=True):
        assert got.shape == want.shape == (6, 32)
        assert torch.equal(got, want)


@pytest.mark.skipif(
    len(KERNELS) < 2 or cpu.cpu_caps().isa != "avx512", reason="torch or this CPU lacks AVX-512 (or no C++ compiler)"
)
@pytest.mark.parametrize("slots", [1, 2])
def test_the_avx512_path_gives_the_avx2_paths_codes(tiny_dir, slots: int) -> None:
    """bf16 weights where the CPU reports AVX-512 run on the kernel's AVX-512 path, fused steps and
    the fused depth decoder included, with the AVX2 path's floats: the greedy codes are its codes."""
    from csmcli import Synthesizer

    texts = ["Hello from CSM.", "Good morning."][:slots]
    settings = {"device": "cpu", "dtype": "bfloat16", "max_batch_size": slots}
    synth = Synthesizer.load(str(tiny_dir), cpu_isa="avx512", **settings)
    assert synth.engine.cpu_kernels == "bf16-avx512"
    fast = kernel("avx512")
    layers = [m for m in synth.model.modules() if isinstance(m, cpu.CpuLinear)]
    assert layers and all(m.kernel is fast for m in layers)
    assert synth.model.decoder.fused_step.product == fast.product and synth.model.fused_depth is not None
    avx2 = Synthesizer.load(str(tiny_dir), cpu_isa="avx2", **settings)
    assert avx2.engine.cpu_kernels == "bf16-avx2"
    for got, want in zip(_codes(synth, texts), _codes(avx2, texts), strict=True):
        assert got.shape == want.shape == (6, 32)
        assert torch.equal(got, want)


@needs_kernel
def test_int4_weights_keep_the_int4_fused_step_where_bf16_is_the_dtype(tiny_dir) -> None:
    """int4 with bf16 as the model's dtype on the AVX2 path (what ``auto`` picks there): both
    transformers step on the int4 kernel's products, not on no fused step at all."""
    from csmcli import Synthesizer, qkernel

    settings = {"device": "cpu", "dtype": "bfloat16", "cpu_isa": "avx2", "quantize": "int4"}
    synth = Synthesizer.load(str(tiny_dir), **settings)
    int4 = qkernel.kernel("avx2")
    for net in (synth.model.backbone, synth.model.decoder):
        assert net.fused_step is not None and net.fused_step.product == int4.product


@needs_kernel
def test_a_compiled_two_slot_avx2_bf16_engine_runs_the_kernel_inside_its_graphs(tiny_dir) -> None:
    """``csm serve --compile --dtype bfloat16`` on an AVX2-only CPU: the loader lets it through (the
    bf16 kernel leaves nothing packed), compiling breaks no graph and requests compile nothing (their
    frames run in the fused steps and the fused depth decoder).  Codes are not compared with eager
    ones: inductor rounds bf16 between fused operations differently."""
    from torch._dynamo.utils import counters

    from csmcli import Synthesizer

    counters.clear()
    settings = {"device": "cpu", "dtype": "bfloat16", "cpu_isa": "avx2", "max_batch_size": 2}
    synth = Synthesizer.load(str(tiny_dir), compile=True, **settings)
    assert synth.engine.compiled and synth.engine.cpu_kernels == "bf16-avx2"
    assert not counters["graph_break"] and synth.model.fused_depth is not None
    graphs = counters["stats"]["unique_graphs"]
    codes = _codes(synth, ["Hello from CSM.", "Good morning."])
    assert [c.shape for c in codes] == [(6, 32), (6, 32)]
    assert all(int(c.min()) >= 0 and int(c.max()) < 2048 for c in codes)
    assert counters["stats"]["unique_graphs"] == graphs, "a request compiled something"


@needs_kernel
def test_auto_dtype_is_bf16_where_the_kernel_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the AVX2 path bf16 weights on the kernel beat float32 (half the bytes): ``auto`` picks them,
    unless other CPU kernels are asked for or the kernel cannot run (no compiler, below AVX2)."""
    from csmcli.loader import pick_dtype

    host = torch.device("cpu")
    assert pick_dtype("auto", host, AVX2) == torch.bfloat16
    assert pick_dtype("auto", host, AVX2, "packed") == torch.float32
    assert pick_dtype("auto", host, cpu.cpu_caps("default")) == torch.float32
    monkeypatch.setattr(cpu, "bf16_kernel", lambda *args: None)
    assert pick_dtype("auto", host, AVX2) == torch.float32


@needs_kernel
def test_bf16_weights_take_the_kernel_on_avx512_cpus_without_amx(tiny_dir) -> None:
    """Where oneDNN multiplies bf16 (AVX-512) the kernel was faster for one stream, a batch and
    prompts alike on a CPU with AVX512-BF16 but no AMX; with AMX, oneDNN's tiles keep the weights."""
    from csmcli import Synthesizer
    from csmcli.loader import pick_dtype

    avx512 = cpu.CpuCaps("avx512", bf16_packed=True, native_bf16=True, vnni=True)
    fast = kernel("avx512")  # its AVX-512 path, or AVX2 where this CPU lacks AVX-512F
    assert fast.path == ("avx512" if len(KERNELS) == 2 else "avx2")
    assert cpu.bf16_kernel(torch.bfloat16, avx512) is fast
    assert cpu.bf16_kernel(torch.bfloat16, dataclasses.replace(avx512, amx=True)) is None
    assert cpu.bf16_kernel(torch.float32, avx512) is None
    assert pick_dtype("auto", torch.device("cpu"), dataclasses.replace(avx512, native_bf16=False)) == torch.bfloat16
    synth = Synthesizer.load(str(tiny_dir), device="cpu", dtype="bfloat16", cpu_kernels="plain")
    assert cpu.prepare_cpu(synth.model, "auto", 2, caps=avx512) == fast.name
    layers = [m for m in synth.model.modules() if isinstance(m, cpu.CpuLinear)]
    assert layers and all(m.kernel is fast and not m.packed_weights for m in layers)
    assert synth.model.backbone.fused_step is not None and synth.model.decoder.fused_step is not None


@needs_kernel
def test_a_one_slot_model_re_prepared_for_a_batch_stays_on_the_kernel(tiny_dir) -> None:
    from csmcli import Synthesizer

    one = Synthesizer.load(str(tiny_dir), device="cpu", dtype="bfloat16", cpu_isa="avx2")
    weights = [m.weight for m in one.model.modules() if isinstance(m, cpu.CpuLinear)]
    assert cpu.prepare_cpu(one.model, max_batch=8, caps=AVX2) == "bf16-avx2"
    after = [m.weight for m in one.model.modules() if isinstance(m, cpu.CpuLinear)]
    assert len(after) == len(weights) and all(a is b for a, b in zip(after, weights, strict=True))
