"""Time each CPU matrix kernel on CSM-1B's shapes (microseconds per product), for one row and for a batch.

What ``csmcli.cpu`` chooses between: float32 ``F.linear`` and oneDNN-packed weights, bfloat16
``F.linear`` / packed (only where the CPU has oneDNN's bf16 kernels) / the compiled gemv / csmcli's
bf16 kernel (:mod:`csmcli.bf16kernel`, what CPUs without AMX use),
``torch._weight_int8pack_mm``, the compiled int8 gemv, fbgemm's dynamic int8 linear, csmcli's W8A8
int8 kernel (:mod:`csmcli.qkernel`), torch's CPU
int4 kernel (``_weight_int4pack_mm_for_cpu``, bf16 rows) and csmcli's W4A8 int4 kernel (the
CPU's path, :mod:`csmcli.qkernel`) at ``--group``; then the products of ``--rows`` rows (a
multi-slot engine's batch): float32 packed (what bf16 weights got on a CPU without bf16 packing
before the bf16 kernel), bf16 packed, the bf16 kernel, ``_weight_int8pack_mm``, fbgemm, the W8A8
kernel and both int4 kernels.  Each shape is timed over enough copies of the matrix to overflow
the caches, as a frame does, in 2 MiB pages where the engine's weights are (:mod:`csmcli.hugepages`).
The last line sums each column over one frame's products (the backbone once, the depth decoder 31
times); a last table gives the bf16 kernel's reading speed (GB/s of bf16 weights) per shape.

Usage: python scripts/cpu_kernels.py [--threads N] [--isa avx512|avx_vnni|avx2|default] [--rows M] [--group G]
(``--isa avx2`` runs the paths an AVX2-only CPU takes; ``ATEN_CPU_CAPABILITY=avx2`` in the
environment also makes torch's own kernels use AVX2.)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from csmcli import bf16kernel, cpu, hugepages, qkernel, quant
from csmcli.bench import physical_cores
from csmcli.bf16kernel import Bf16Kernel
from csmcli.gemv import GemvKernels

# (name, out_features, in_features, uses per frame)
SHAPES = [
    ("backbone wqkv", 3072, 2048, 16),
    ("backbone wo", 2048, 2048, 16),
    ("backbone w13", 16384, 2048, 16),
    ("backbone w2", 2048, 8192, 16),
    ("depth wqkv", 1536, 1024, 124),
    ("depth wo", 1024, 1024, 124),
    ("depth w13", 16384, 1024, 124),
    ("depth w2", 1024, 8192, 124),
    ("depth head", 2051, 1024, 31),
]
COLUMNS = ("f32 linear", "f32 packed", "bf16 linear", "bf16 packed", "bf16 gemv", "bf16 kernel")
COLUMNS += ("int8pack", "int8 gemv", "fbgemm", "int8 W8A8", "int4pack", "int4 kernel")
ROWS_COLUMNS = ("f32 packed", "bf16 packed", "bf16 kernel", "int8pack", "fbgemm", "int8 W8A8")
ROWS_COLUMNS += ("int4pack", "int4 kernel")


def micros(fn, count: int, reps: int = 7) -> float:
    """Median microseconds per product of ``fn``, which runs ``count`` products."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) / count * 1e6


def fbgemm_weights(q: list[torch.Tensor], scales: torch.Tensor) -> list:
    """fbgemm's packed copies of int8 matrices with per-row ``scales``."""
    zeros = torch.zeros(scales.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # torch marks its quantized tensors deprecated
        warnings.simplefilter("ignore")
        per_channel = [torch._make_per_channel_quantized_tensor(m, scales.double(), zeros, 0) for m in q]
        return [torch.ops.quantized.linear_prepack(m, None) for m in per_channel]


def int4_layers(n: int, k: int, group: int, count: int, caps: cpu.CpuCaps, kernels: str) -> list[quant.Int4Linear]:
    """``count`` copies of an int4 ``n x k`` layer, prepared as ``cpu.prepare_int4`` does with ``kernels``."""
    layers = [quant.Int4Linear.from_weight(torch.randn(n, k) * 0.02, group)]
    layers += [copy.deepcopy(layers[0]) for _ in range(count - 1)]
    holder = torch.nn.Module()
    holder.layers = torch.nn.ModuleList(layers)
    cpu.prepare_int4(holder, caps, kernels)
    hugepages.adopt(t for m in layers for t in (m.kernel_weights, *m.packed) if t is not None)
    return layers


def measure(
    n: int,
    k: int,
    caps: cpu.CpuCaps,
    kernels: tuple[GemvKernels | None, Bf16Kernel | None, qkernel.QKernel | None],
    rows: int,
    group: int,
) -> list[float]:
    """Microseconds per product of each kernel for an ``n x k`` matrix and one row, then ``rows`` rows."""
    nan = float("nan")
    gemv, bf16, w8a8 = kernels
    copies = max(2, 256_000_000 // (n * k * 2))
    out, batched = [], []
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1, k, dtype=dtype)
        xs = torch.randn(rows, k, dtype=dtype)
        w = [torch.randn(n, k, dtype=dtype) for _ in range(copies if dtype == torch.bfloat16 else copies // 2 + 1)]
        hugepages.adopt(w)
        out.append(micros(lambda: [F.linear(x, m) for m in w], len(w)))  # noqa: B023
        if dtype == torch.float32 or caps.bf16_packed:
            packed = [torch.ops.mkldnn._reorder_linear_weight(m, 1) for m in w]
            for v, results in ((x, out), (xs, batched)):
                run = lambda: [torch.ops.mkldnn._linear_pointwise(v, p, None, "none", [None], "") for p in packed]  # noqa: B023, E731
                results.append(micros(run, len(w)))
            del packed
        else:
            out.append(nan)
            batched.append(nan)
        if dtype == torch.bfloat16:
            out.append(micros(lambda: [gemv.gemv(x.float(), m) for m in w], len(w)) if gemv else nan)  # noqa: B023
            packed = [bf16kernel.pack(m) for m in w] if bf16 else []
            hugepages.adopt(packed)
            w.clear()  # the kernel's copies replace the plain ones, as in an engine
            for v, results in ((x, out), (xs, batched)):
                run = lambda: [bf16.matmul(v, p, n).to(v.dtype) for p in packed]  # noqa: B023, E731
                results.append(micros(run, len(packed)) if bf16 else nan)
            del packed
    x = torch.randn(1, k, dtype=torch.bfloat16)
    xs = torch.randn(rows, k, dtype=torch.bfloat16)
    q = [torch.randint(-127, 128, (n, k), dtype=torch.int8) for _ in range(2 * copies)]
    hugepages.adopt(q)
    s = torch.rand(n, dtype=torch.bfloat16) / 127
    out.append(micros(lambda: [torch._weight_int8pack_mm(x, m, s) for m in q], len(q)))
    out.append(micros(lambda: [gemv.gemv_int8(x.float(), m, s) for m in q], len(q)) if gemv else nan)
    batched.append(micros(lambda: [torch._weight_int8pack_mm(xs, m, s) for m in q], len(q)))
    fb = fbgemm_weights(q, s) if cpu.int8_fbgemm() else []
    for v, results in ((x, out), (xs, batched)):
        run = lambda: [torch.ops.quantized.linear_dynamic(v.float(), p, False).to(v.dtype) for p in fb]  # noqa: B023, E731
        results.append(micros(run, len(fb)) if fb else nan)
    fb.clear()
    s32, act_group = s.float(), quant.kernel_group(k)
    blocks = [qkernel.pack_int8(m, act_group) for m in q] if w8a8 and act_group else []
    hugepages.adopt(blocks)
    q.clear()  # the kernel's copies replace the plain ones, as in an engine; freed before the int4 copies
    for v, results in ((x, out), (xs, batched)):
        run = lambda: [w8a8.int8_matmul(v, b, s32, act_group).to(v.dtype) for b in blocks]  # noqa: B023, E731
        results.append(micros(run, len(blocks)) if blocks else nan)
    blocks.clear()
    for kernels in ("plain", "auto"):  # torch's int4 kernel, then csmcli's for this CPU's path
        layers = int4_layers(n, k, group, 4 * copies, caps, kernels)
        for v, results in ((x, out), (xs, batched)):
            results.append(micros(lambda: [m(v) for m in layers], len(layers)))  # noqa: B023
    return out + batched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--isa", default=None, help="limit the CPU paths to this instruction set")
    parser.add_argument("--rows", type=int, default=8, help="rows of the batched products (a batch's streams)")
    parser.add_argument("--group", type=int, default=quant.INT4_GROUP, choices=quant.INT4_GROUPS, help="int4 groups")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    caps = cpu.cpu_caps(args.isa)
    gemv = cpu.gemv_kernels(torch.bfloat16, caps)
    bf16 = bf16kernel.kernel(caps.isa)
    w8a8 = qkernel.kernel_for(caps.isa, caps.vnni, caps.avx_vnni)
    for kernel in (bf16, w8a8):  # from how many rows they prefetch, as the engine tells them
        if kernel is not None:
            kernel.lib.csm_prefetch_from(caps.prefetch_rows)
    built = f"compiled gemv: {gemv is not None}, bf16 kernel: {bf16 is not None}, int8/int4 kernels: {w8a8 is not None}"
    print(f"threads {args.threads}, torch {torch.__version__}, {caps}, {built}")
    columns = COLUMNS + tuple(f"{c} x{args.rows}" for c in ROWS_COLUMNS)
    print(f"{'shape':16s} {'N x K':>12s} " + " ".join(f"{c:>11s}" for c in columns) + "   (us per product)")
    totals = [0.0] * len(columns)
    speeds = []  # the bf16 kernel's GB/s of bf16 weights per shape, one row and args.rows rows
    single, several = columns.index("bf16 kernel"), columns.index(f"bf16 kernel x{args.rows}")
    with torch.inference_mode():
        for name, n, k, uses in SHAPES:
            row = measure(n, k, caps, (gemv, bf16, w8a8), args.rows, args.group)
            totals = [t + v * uses for t, v in zip(totals, row, strict=True)]
            speeds.append((name, n * k * 2e-3 / row[single], n * k * 2e-3 / row[several]))
            print(f"{name:16s} {n:>5d} x {k:<5d} " + " ".join(f"{v:11.1f}" for v in row), flush=True)
    print(f"{'ms per frame':29s} " + " ".join(f"{t / 1e3:11.1f}" for t in totals))
    print(f"\nbf16 kernel, GB/s of bf16 weights read: {'1 row':>8s} {f'{args.rows} rows':>8s}")
    for name, one, many in speeds:
        print(f"{name:39s} {one:8.1f} {many:8.1f}")


if __name__ == "__main__":
    main()
