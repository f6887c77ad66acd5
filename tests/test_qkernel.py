"""The hand-written CPU kernels for quantized weights (W4A8 and W8A8): the int4 packed layout, each
instruction-set path against a reference computed in float64 from the same activation quantization,
and the fallback when they cannot be built."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from csmcli import qkernel
from csmcli.qkernel import BLOCK_ROWS, HEADER_BYTES, kernel, pack, pack_int8, packed_bytes, unpack_int8


def _quantize(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Canonical int4 form, written out here so the test does not depend on the code it checks."""
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scales = ((hi - lo) / 15).clamp(min=1e-8)
    codes = ((g - lo[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.uint8).reshape(n, k)
    return codes[:, 0::2] | (codes[:, 1::2] << 4), scales, lo


def _reference(x: torch.Tensor, qweight, scales, mins, group: int) -> torch.Tensor:
    """The kernel's arithmetic in float64: int8 activations per row and group with the centring
    correction, fp16 scales and minimums."""
    m, k = x.shape
    n = qweight.shape[0]
    codes = torch.stack((qweight & 15, qweight >> 4), -1).reshape(n, k // group, group).double()
    xg = x.reshape(m, k // group, group)
    amax = xg.abs().amax(-1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    xq = (xg * inv[..., None]).round().double()
    sx, xs = (amax / 127.0).double(), xg.double().sum(-1)
    corr = 8 * (xs - sx * xq.sum(-1))
    dots = torch.einsum("mgk,ngk->mng", xq, codes)
    s, lo = scales.half().double(), mins.half().double()
    return (s[None] * (dots * sx[:, None] + corr[:, None]) + lo[None] * xs[:, None]).sum(-1)


def _paths() -> list[str]:
    found = []
    for path in qkernel.PATHS:
        k = kernel(path)
        if k is not None:
            found.append(path)
    return found


PATHS = _paths()


def test_the_kernel_builds_on_a_machine_with_a_compiler() -> None:
    assert "avx2" in PATHS or not torch.backends.cpu.get_cpu_capability().startswith("AVX")


def test_pack_lays_out_blocks_of_sixteen_rows_with_fp16_headers() -> None:
    group, n, k = 32, 20, 64
    codes = torch.arange(n * k).reshape(n, k).remainder(16).to(torch.uint8)
    qweight = codes[:, 0::2] | (codes[:, 1::2] << 4)
    scales = torch.arange(n * (k // group), dtype=torch.float32).reshape(n, k // group) + 1
    mins = -scales
    blob = pack(qweight, scales, mins, group).reshape(-1)
    assert blob.numel() == packed_bytes(n, k, group) == 2 * 2 * (HEADER_BYTES + 8 * group)
    first = blob[: HEADER_BYTES + 8 * group]  # block 0, group 0
    head = first[:HEADER_BYTES].view(torch.float16).float()
    assert torch.equal(head[:BLOCK_ROWS], scales[:BLOCK_ROWS, 0])
    assert torch.equal(head[BLOCK_ROWS:], mins[:BLOCK_ROWS, 0])
    chunk = first[HEADER_BYTES : HEADER_BYTES + 64]  # columns 0..7 of rows 0..15
    for row in (0, 5, 15):
        for i in range(4):
            byte = int(chunk[row * 4 + i])
            assert byte & 15 == codes[row, i] and byte >> 4 == codes[row, 4 + i]
    last_block = blob[2 * (HEADER_BYTES + 8 * group) :]  # rows 16..31: 4 real rows, 12 zero rows
    assert not last_block[: HEADER_BYTES // 2].view(torch.float16)[4:].any()


@pytest.mark.parametrize("path", PATHS)
def test_a_rows_product_does_not_depend_on_the_rows_beside_it(path: str) -> None:
    """Several rows take other block functions than one (on AVX-512 VNNI, pairs of blocks): each
    row still gets exactly the floats it gets alone, also in the last, partial block."""
    torch.manual_seed(3)
    n, k, group = 2051, 512, 64
    blob = pack(*_quantize(torch.randn(n, k) * 0.02, group), group)
    kern = kernel(path)
    for rows in (2, 3, 8, 9, 13):
        x = torch.randn(rows, k)
        together = kern.matmul(x, blob, n, group)
        for r in range(rows):
            assert torch.equal(together[r], kern.matmul(x[r : r + 1], blob, n, group)[0]), (rows, r)


@pytest.mark.skipif("avx512_vnni" not in PATHS, reason="needs the avx512_vnni kernel path and a C++ compiler")
def test_pairs_of_blocks_give_the_floats_of_one_block_a_pass() -> None:
    """``csm_pair_from`` (for A/B scripts) sets the rows from which AVX-512 VNNI passes take two
    blocks (two by default); with pairs off, 8 rows' products are the same floats."""
    torch.manual_seed(6)
    n, k, group = 2051, 512, 64
    blob = pack(*_quantize(torch.randn(n, k) * 0.02, group), group)
    kern = kernel("avx512_vnni")
    x = torch.randn(8, k)
    paired = kern.matmul(x, blob, n, group)
    assert kern.lib.csm_pair_from(1 << 30) == 2
    try:
        assert torch.equal(kern.matmul(x, blob, n, group), paired)
    finally:
        assert kern.lib.csm_pair_from(2) == 1 << 30


@pytest.mark.skipif(not PATHS, reason="no C++ compiler or no AVX2 on this CPU")
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_each_path_matches_the_reference(path: str, group: int) -> None:
    torch.manual_seed(group)
    n, k = 2051, 256  # rows not a multiple of 16, as the 2051-code heads
    qweight, scales, mins = _quantize(torch.randn(n, k) * 0.02, group)
    blob = pack(qweight, scales, mins, group)
    kern = kernel(path)
    for rows in (1, 2, 4, 5, 8, 9, 13):
        x = torch.randn(rows, k)
        x[0, :group] = 0  # an all-zero group quantizes to zeros without dividing by zero
        y = kern.matmul(x, blob, n, group)
        want = _reference(x, qweight, scales, mins, group)
        assert y.shape == (rows, n)
        torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(len(PATHS) < 2, reason="needs two kernel paths (AVX-512 VNNI or AVX-VNNI)")
@pytest.mark.parametrize("group", [32, 64, 128])
def test_every_int4_path_gives_the_same_floats(group: int) -> None:
    """Exact integer sums, then the same float operations in the same order on every path: a
    stream's int4 codes do not depend on its CPU's instructions, for a lone row or a batch."""
    torch.manual_seed(7)
    n, k = 2051, 512
    blob = pack(*_quantize(torch.randn(n, k) * 0.02, group), group)
    for rows in (1, 4, 8, 13):
        x = torch.randn(rows, k)
        first, *others = (kernel(p).matmul(x, blob, n, group) for p in PATHS)
        assert all(torch.equal(first, other) for other in others), rows


@pytest.mark.skipif(not PATHS, reason="no C++ compiler or no AVX2 on this CPU")
def test_the_kernel_is_close_to_the_dequantized_float_product() -> None:
    torch.manual_seed(0)
    w = torch.randn(512, 1024) * 0.02
    qweight, scales, mins = _quantize(w, 64)
    codes = torch.stack((qweight & 15, qweight >> 4), -1).reshape(512, 16, 64).float()
    dequantized = (codes * scales.half().float()[..., None] + mins.half().float()[..., None]).reshape(512, 1024)
    x = torch.randn(3, 1024)
    y = kernel(PATHS[0]).matmul(x, pack(qweight, scales, mins, 64), 512, 64)
    want = x @ dequantized.T
    # int8 activations on centred codes: about 0.6% (1.2% without the centring)
    assert (y - want).norm() / want.norm() < 0.008


def _reference8(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """The W8A8 kernel's arithmetic in float64: int8 activations per row and group, exact integer sums."""
    m, k = x.shape
    xg = x.reshape(m, k // group, group)
    amax = xg.abs().amax(-1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    xq = (xg * inv[..., None]).round().double()
    dots = torch.einsum("mgk,ngk->mng", xq, weight.double().reshape(-1, k // group, group))
    return (dots * (amax / 127.0).double()[:, None]).sum(-1) * scales.double()


@pytest.mark.skipif(not PATHS, reason="no C++ compiler or no AVX2 on this CPU")
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("group", [64, 128])
def test_each_int8_path_matches_the_reference(path: str, group: int) -> None:
    torch.manual_seed(group)
    n, k = 2051, 256
    weight = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    weight[0] = -127  # the extremes: |w| and x at 127 must not saturate the AVX2 pair sums
    scales = torch.rand(n) * 0.01
    kern = kernel(path)
    blocks = pack_int8(weight, group)
    for rows in (1, 2, 4, 5, 9, 40):  # one, several and more than a pass of rows over each block
        x = torch.randn(rows, k)
        x[0, :group] = 0
        x[-1, -group:] = -1.0
        y = kern.int8_matmul(x, blocks, scales, group)
        assert y.shape == (rows, n)
        torch.testing.assert_close(y.double(), _reference8(x, weight, scales, group), atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(len(PATHS) < 2, reason="needs two kernel paths (AVX-512 VNNI or AVX-VNNI)")
def test_every_int8_path_gives_the_same_floats() -> None:
    """The same integer sums and the same float operations after them: a stream's codes do not depend
    on whether its CPU has VNNI (the AVX2 path's halves of 8 rows give AVX-512's sums)."""
    torch.manual_seed(3)
    weight, scales = torch.randint(-127, 128, (300, 512), dtype=torch.int8), torch.rand(300)
    blocks, x = pack_int8(weight, 128), torch.randn(6, 512)
    first, *others = (kernel(p).int8_matmul(x, blocks, scales, 128) for p in PATHS)
    assert all(torch.equal(first, other) for other in others)


def test_int8_blocks_unpack_to_the_weight_they_were_packed_from() -> None:
    torch.manual_seed(4)
    weight = torch.randint(-127, 128, (37, 256), dtype=torch.int8)
    blocks = pack_int8(weight, 64)
    assert blocks.shape == (3, 4 * (64 + 16 * 64))  # 16-row blocks; per group a header and the codes
    header = blocks.reshape(3, 4, -1)[0, 1, :64].view(torch.int32)
    assert header.tolist() == (-128 * weight[:16, 64:128].sum(-1, dtype=torch.int32)).tolist()
    assert torch.equal(unpack_int8(blocks, 37, 64), weight)
    with pytest.raises(ValueError, match="do not divide"):
        pack_int8(weight, 96)


@pytest.mark.skipif(not PATHS, reason="no C++ compiler or no AVX2 on this CPU")
def test_int8_layers_run_their_rows_on_the_kernel_close_to_the_weight_only_product() -> None:
    from csmcli.quant import DEQUANTIZE_ROWS, Int8Linear

    torch.manual_seed(1)
    layer = Int8Linear(torch.randn(3, 96, 256) * 0.02, torch.float32)  # a stack, as the depth heads
    x, weight = torch.randn(4, 256), layer.weight.clone()
    plain = [layer(x, i) for i in range(3)]
    layer.use_kernel(kernel(PATHS[0]))
    assert layer.kernel is not None and layer.kernel_group == 128
    assert layer.weight is None and layer.kernel_weights.shape[0] == 3  # one layout at a time
    prompt = torch.randn(DEQUANTIZE_ROWS + 8, 256)  # prompts too run on the kernel
    plain.append(prompt @ (weight[1].float() * layer.scales[1, :, None]).T)
    for i, rows, want in (0, x, plain[0]), (1, x, plain[1]), (2, x, plain[2]), (1, prompt, plain[3]):
        got = layer(rows, i)
        assert got.dtype == torch.float32 and (got - want).norm() / want.norm() < 0.01
    layer.use_plain()
    assert layer.kernel is None and layer.kernel_weights is None and torch.equal(layer.weight, weight)
    narrow = Int8Linear(torch.randn(8, 96), torch.float32)
    narrow.use_kernel(kernel(PATHS[0]))
    assert narrow.kernel is None  # no group divides 96 columns


@pytest.mark.skipif(not PATHS, reason="no C++ compiler or no AVX2 on this CPU")
def test_a_one_slot_int8_engine_steps_its_transformers_on_the_w8a8_kernel(tiny_dir) -> None:
    """int8 rows on the W8A8 kernel (one slot): the backbone gets its fused step, whose pairs point at
    the layers' weights and scales, and frames step through it.  The tiny depth decoder's 32-column
    projections fit no activation group, so it keeps its layers."""
    import functools

    from csmcli import GenerationOptions, Synthesizer

    synth = Synthesizer.load(str(tiny_dir), device="cpu", dtype="float32", quantize="int8")
    assert "int8-" in synth.engine.cpu_kernels
    backbone, decoder = synth.model.backbone, synth.model.decoder
    assert decoder.fused_step is None and decoder.layers[0].wqkv.kernel is None
    fused, calls = backbone.fused_step, []
    assert fused is not None and fused.product.address == backbone.layers[0].w13.kernel.int8_product.address
    layers = [getattr(b, a) for b in backbone.layers for a in ("wqkv", "wo", "w13", "w2")]
    pointers = [(m.kernel_weights.data_ptr(), m.kernel_scales.data_ptr()) for m in layers]
    assert [tuple(p.tolist()) for p in fused.tensors] == pointers
    backbone.fused_step = functools.partial(lambda f, *a: calls.append(a[0].shape) or f(*a), fused)
    codes = synth.generate("Hello from CSM.", 0, options=GenerationOptions(temperature=0, max_audio_ms=4 * 80)).codes
    assert codes.shape == (4, 32) and int(codes.max()) < 2048
    assert calls.count((1, 1, synth.model.backbone_spec.dim)) >= 3  # a step for each frame after the first


def test_int8_weight_pairs_refuse_what_the_kernel_cannot_read() -> None:
    from csmcli.qkernel import int8_weight

    blocks, scales = pack_int8(torch.zeros(20, 64, dtype=torch.int8), 64), torch.ones(20)
    assert int8_weight(blocks, scales).tolist() == [blocks.data_ptr(), scales.data_ptr()]
    plain = torch.zeros(20, 64, dtype=torch.int8)
    for bad in ((plain, scales), (blocks, scales.double()), (blocks, torch.ones(2, 10))):
        with pytest.raises(ValueError, match="float32 scales"):
            int8_weight(*bad)
    with pytest.raises(ValueError, match="do not hold 40"):
        int8_weight(blocks, torch.ones(40))
    with pytest.raises(ValueError, match="contiguous"):
        int8_weight(torch.zeros(64, 2, dtype=torch.uint8).T, torch.ones(20))


def test_no_compiler_means_no_kernel_and_one_warning(tmp_path) -> None:
    code = (
        "import logging, sys; from pathlib import Path; logging.basicConfig();"
        "from csmcli.qkernel import kernel;"
        f"print(kernel('avx2', Path({str(tmp_path)!r})), kernel('avx2', Path({str(tmp_path)!r})))"
    )
    env = {**os.environ, "PATH": str(tmp_path)}  # no compiler on it
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.strip() == "None None"
    assert done.stderr.count("CPU kernel qkernel unavailable (no C++ compiler found)") == 1


def test_no_path_means_no_kernel() -> None:
    assert qkernel.path_for("default", vnni=False) is None
    assert qkernel.path_for("avx2", vnni=True) == "avx2"
    assert qkernel.path_for("avx512", vnni=False) == "avx2"
    assert qkernel.path_for("avx512", vnni=True) == "avx512_vnni"
    assert qkernel.path_for("avx2", vnni=False, avx_vnni=True) == "avx_vnni"
    assert qkernel.path_for("avx512", vnni=True, avx_vnni=True) == "avx512_vnni"


@pytest.mark.skipif(not PATHS, reason="no C++ compiler or no AVX2 on this CPU")
def test_a_library_built_without_avx_vnni_leaves_such_cpus_on_the_avx2_path(monkeypatch: pytest.MonkeyPatch) -> None:
    lib = kernel(PATHS[0]).lib
    monkeypatch.setattr(lib, "csm_int4_cpu_has", lambda path: int(path == qkernel.PATHS["avx2"]))
    assert qkernel.kernel_for("avx2", vnni=False, avx_vnni=True).path == "avx2"


def test_pack_refuses_a_group_that_does_not_divide_the_row() -> None:
    with pytest.raises(ValueError, match="group 48"):
        pack(torch.zeros(16, 32, dtype=torch.uint8), torch.ones(16, 2), torch.zeros(16, 2), 48)


@pytest.mark.skipif(not PATHS, reason="no C++ compiler or no AVX2 on this CPU")
@pytest.mark.parametrize("isa", ["avx512", "avx_vnni", "avx2"])
def test_prepare_cpu_gives_int4_layers_the_kernel_of_the_cpus_path(isa: str) -> None:
    from csmcli import cpu
    from csmcli.quant import Int4Linear

    caps = cpu.detect_cpu_caps()
    if isa == "avx512" and caps.isa != "avx512" or isa == "avx_vnni" and "avx_vnni" not in PATHS:
        pytest.skip(f"this CPU has no {isa}")
    caps = cpu.cpu_caps(isa)
    want = qkernel.path_for(caps.isa, caps.vnni, caps.avx_vnni)
    assert want == {"avx512": want, "avx_vnni": "avx_vnni", "avx2": "avx2"}[isa]
    torch.manual_seed(3)
    w = torch.randn(2, 40, 128) * 0.02
    reference = Int4Linear.from_weight(w, 32)
    layer = Int4Linear.from_weight(w, 32)
    model = torch.nn.Module()
    model.heads = layer
    assert cpu.prepare_int4(model, caps, "auto") == f"int4-{want}"
    assert layer.canonical() is None and not layer.packed  # one copy: the kernel's
    x = torch.randn(5, 128)
    for i in range(2):
        torch.testing.assert_close(layer(x, i), reference(x, i), atol=5e-3, rtol=0.02)
    plain = torch.nn.Module()
    plain.layer = Int4Linear.from_weight(w[0], 32)
    assert cpu.prepare_int4(plain, caps, "plain") == "int4pack"


def _bf16_kernel():
    from csmcli import bf16kernel

    return bf16kernel.kernel("avx2") if qkernel.kernel("avx2") is not None else None


#: The products a fused step can run on here: the int4 and W8A8 kernels' paths and the bf16 kernel.
STEP_KERNELS = [f"{q}-{p}" for q in ("int4", "int8") for p in PATHS]
STEP_KERNELS += ["bf16"] if PATHS and _bf16_kernel() is not None else []


def _fused_stack(kind: str, dtype: torch.dtype):
    """A small transformer (grouped-query attention, llama3 RoPE) whose projections are on ``kind``
    (``int4-<path>``, ``int8-<path>`` or ``bf16``), and its fused step."""
    from csmcli.cpu import CpuLinear, bf16_step, cpu_caps
    from csmcli.model import Transformer, TransformerSpec
    from csmcli.quant import PROJECTIONS, Int4Linear, Int8Linear, int4_step, int8_step

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # fmt: skip
    spec = TransformerSpec(dim=128, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=192,
                           norm_eps=1e-5, max_len=40, rope=rope)  # fmt: skip
    torch.manual_seed(11)
    net = Transformer(spec)
    for block in net.layers:
        for norm in (block.attn_norm, block.ffn_norm):  # weights that bfloat16 holds exactly
            norm.weight.data = (1 + 0.1 * torch.randn(spec.dim)).bfloat16().float()
        for attr in PROJECTIONS:
            weight = getattr(block, attr).weight.detach() * 2
            if kind == "bf16":
                layer = CpuLinear(weight.bfloat16(), None, cpu_caps(), kernel=_bf16_kernel())
            elif kind.startswith("int8"):
                layer = Int8Linear(weight, torch.float32)
                layer.use_kernel(kernel(kind.removeprefix("int8-")))
            else:
                layer = Int4Linear.from_weight(weight, 64)
                layer.use_kernel(kernel(kind.removeprefix("int4-")))
            setattr(block, attr, layer)
    net.norm.weight.data = (1 + 0.1 * torch.randn(spec.dim)).bfloat16().float()
    net = net.to(dtype)
    if kind == "bf16":
        return net, bf16_step(net, _bf16_kernel())
    if kind.startswith("int8"):
        return net, int8_step(net, kernel(kind.removeprefix("int8-")))
    return net, int4_step(net, kernel(kind.removeprefix("int4-")))


@pytest.mark.skipif(not STEP_KERNELS, reason="no C++ compiler or no AVX2 on this CPU")
@pytest.mark.parametrize("kind", STEP_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_the_fused_step_matches_the_layer_by_layer_one(kind: str, dtype: torch.dtype) -> None:
    """Depth-decoder steps (two rows, then one, over a cache from position 0) and backbone steps
    (slots at different positions after a prompt) give the outputs and cache entries of the eager
    layers, on int4, int8 or bf16 products, up to float32 rounding and the bfloat16 roundings the
    eager layers make (of their residual stream, and of the bf16 kernel's outputs)."""
    net, fused = _fused_stack(kind, dtype)
    assert fused is not None
    spec = net.spec

    def close(got: torch.Tensor, want: torch.Tensor) -> None:
        error = float((got.float() - want.float()).norm() / want.float().norm())
        if dtype == torch.float32 and kind != "bf16":
            # float32 rounding, unless an activation lies on the edge of two int8 codes and rounds
            # one way in each (a few inputs in a hundred): that moves everything after it by ~1%
            assert error < 0.02
        else:  # bfloat16 roundings (the eager residual stream or products, both caches) meet the
            # activations' int8 codes, so each side is about 2% from a float32 run; a misread cache is far off
            assert error < 0.05

    caches = [net.new_cache(3, spec.max_len, dtype, torch.device("cpu")) for _ in range(2)]

    def both(x: torch.Tensor, pos: torch.Tensor, kv_len: int, mask) -> None:
        net.fused_step = None
        want = net(x, pos, caches[0][:, :, : x.shape[0]], kv_len, mask)
        net.fused_step = fused
        got = net(x, pos, caches[1][:, :, : x.shape[0]], kv_len, mask)
        close(got, want)
        close(caches[1][..., :kv_len, :], caches[0][..., :kv_len, :])

    # depth decoder: positions 0 and 1 causally, then one row a step attending to all before it
    both(torch.randn(3, 2, spec.dim).to(dtype), torch.arange(2).repeat(3, 1), 2, None)
    for p in range(2, 6):
        both(torch.randn(3, 1, spec.dim).to(dtype), torch.full((3, 1), p), p + 1, None)
    # backbone: slots at positions 5, 35 and 7 (a longer prompt in slot 1), each row masked to its
    # own past; from the second step on, the heads' attention is shared among threads
    net.fused_step, prompt = None, torch.randn(1, 30, spec.dim).to(dtype)
    for c in caches:
        net(prompt, torch.arange(6, 36)[None], c[:, :, 1:2], 36, torch.ones(1, 1, 30, 36, dtype=torch.bool).tril(6))
    with pytest.raises(IndexError, match="outside the cache"):  # never a write past the cache
        fused(torch.zeros(1, 1, spec.dim, dtype=dtype), torch.tensor([[spec.max_len]]), caches[1][:, :, :1])
    for step in range(3):
        pos = torch.tensor([5, 35, 7]) + step
        kv_len = int(pos.max()) + 1
        mask = (torch.arange(kv_len)[None] <= pos[:, None])[:, None, None]
        both(torch.randn(3, 1, spec.dim).to(dtype), pos[:, None], kv_len, mask)
