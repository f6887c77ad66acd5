"""Time each CPU matrix kernel on CSM-1B's single-row shapes (microseconds per product).

What ``csmcli.cpu`` chooses between: float32 ``F.linear`` and oneDNN-packed weights, bfloat16
``F.linear`` / packed (only where the CPU has oneDNN's bf16 kernels) / the compiled gemv,
``torch._weight_int8pack_mm`` and the compiled int8 gemv, and torch's CPU int4 kernel
(``_weight_int4pack_mm_for_cpu``, bf16 rows) at each int4 group size.  Each shape is timed over enough copies
of the matrix to overflow the caches, as a frame does.  The last line sums each column over one
frame's products (the backbone once, the depth decoder 31 times).

Usage: python scripts/cpu_kernels.py [--threads N] [--isa avx512|avx2|default]
(``--isa avx2`` runs the paths an AVX2-only CPU takes; ``ATEN_CPU_CAPABILITY=avx2`` in the
environment also makes torch's own kernels use AVX2.)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from csmcli import cpu, quant
from csmcli.bench import physical_cores
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
COLUMNS = ("f32 linear", "f32 packed", "bf16 linear", "bf16 packed", "bf16 gemv", "int8pack", "int8 gemv") + tuple(
    f"int4 g{g}" for g in quant.INT4_GROUPS
)


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


def measure(n: int, k: int, caps: cpu.CpuCaps, gemv: GemvKernels | None) -> list[float]:
    """Microseconds per product of each kernel for an ``n x k`` matrix and one row."""
    nan = float("nan")
    copies = max(2, 256_000_000 // (n * k * 2))
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1, k, dtype=dtype)
        w = [torch.randn(n, k, dtype=dtype) for _ in range(copies if dtype == torch.bfloat16 else copies // 2 + 1)]
        out.append(micros(lambda: [F.linear(x, m) for m in w], len(w)))  # noqa: B023
        if dtype == torch.float32 or caps.bf16_packed:
            packed = [torch.ops.mkldnn._reorder_linear_weight(m, 1) for m in w]
            run = lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [None], "") for p in packed]  # noqa: B023, E731
            out.append(micros(run, len(w)))
            del packed
        else:
            out.append(nan)
        if dtype == torch.bfloat16:
            out.append(micros(lambda: [gemv.gemv(x.float(), m) for m in w], len(w)) if gemv else nan)  # noqa: B023
    x = torch.randn(1, k, dtype=torch.bfloat16)
    q = [torch.randint(-127, 128, (n, k), dtype=torch.int8) for _ in range(2 * copies)]
    s = torch.rand(n, dtype=torch.bfloat16)
    out.append(micros(lambda: [torch._weight_int8pack_mm(x, m, s) for m in q], len(q)))
    out.append(micros(lambda: [gemv.gemv_int8(x.float(), m, s) for m in q], len(q)) if gemv else nan)
    q.clear()  # free before the int4 copies
    padded = n + -n % 16  # the kernel wants output rows in multiples of 16 (Int4Linear pads likewise)
    one = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (padded, k), dtype=torch.int32), 1)
    packed = [one.clone() for _ in range(4 * copies)]
    for group in quant.INT4_GROUPS:
        sz = torch.rand(k // group, padded, 2, dtype=torch.bfloat16)
        run = lambda: [torch.ops.aten._weight_int4pack_mm_for_cpu(x, p, group, sz) for p in packed]  # noqa: B023, E731
        out.append(micros(run, len(packed)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--isa", default=None, help="limit the CPU paths to this instruction set")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    caps = cpu.cpu_caps(args.isa)
    gemv = cpu.gemv_kernels(torch.bfloat16, caps)
    print(f"threads {args.threads}, torch {torch.__version__}, {caps}, compiled gemv: {gemv is not None}")
    print(f"{'shape':16s} {'N x K':>12s} " + " ".join(f"{c:>11s}" for c in COLUMNS) + "   (us per product)")
    totals = [0.0] * len(COLUMNS)
    with torch.inference_mode():
        for name, n, k, uses in SHAPES:
            row = measure(n, k, caps, gemv)
            totals = [t + v * uses for t, v in zip(totals, row, strict=True)]
            print(f"{name:16s} {n:>5d} x {k:<5d} " + " ".join(f"{v:11.1f}" for v in row), flush=True)
    print(f"{'ms per frame':29s} " + " ".join(f"{t / 1e3:11.1f}" for t in totals))


if __name__ == "__main__":
    main()
