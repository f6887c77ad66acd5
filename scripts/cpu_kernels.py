"""Effective bandwidth of each CPU matrix kernel on CSM-1B's single-row shapes (GB/s of weights read).

What ``csmcli.kernels`` chooses between: ``F.linear`` (torch's default), oneDNN-packed weights,
the compiled gemv (bf16), ``torch._weight_int8pack_mm`` and the compiled int8 gemv.  Each shape is
timed over enough copies of the matrix to overflow the caches, as a frame does.
Usage: python scripts/cpu_kernels.py [THREADS]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F

from csmcli import kernels
from csmcli.bench import physical_cores

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


def gbps(fn, mats: list[torch.Tensor], reps: int = 9) -> float:  # noqa: ANN001
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sum(m.numel() * m.element_size() for m in mats) / statistics.median(times) / 1e9


def measure(n: int, k: int, gemv: bool) -> list[float]:
    """GB/s of each kernel for an ``n x k`` matrix and one bfloat16 row."""
    nan = float("nan")
    copies = max(2, 256_000_000 // (n * k * 2))
    x = torch.randn(1, k, dtype=torch.bfloat16)
    xf = x.float()
    w = [torch.randn(n, k, dtype=torch.bfloat16) for _ in range(copies)]
    packed = [torch.ops.mkldnn._reorder_linear_weight(m, 1) for m in w]
    out = [
        gbps(lambda: [F.linear(x, m) for m in w], w),
        gbps(lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [None], "") for p in packed], w),
        gbps(lambda: [kernels._Compiled.gemv(xf, m) for m in w], w) if gemv else nan,
    ]
    w.clear()
    packed.clear()
    q = [torch.randint(-127, 128, (n, k), dtype=torch.int8) for _ in range(2 * copies)]
    s = torch.rand(n, dtype=torch.bfloat16)
    out.append(gbps(lambda: [torch._weight_int8pack_mm(x, m, s) for m in q], q))
    out.append(gbps(lambda: [kernels._Compiled.gemv_int8(xf, m, s) for m in q], q) if gemv else nan)
    return out


def main(threads: int) -> None:
    torch.set_num_threads(threads)
    gemv = kernels.compiled_gemv()
    print(f"threads {threads}, torch {torch.__version__}, compiled gemv: {gemv}")
    print(f"{'shape':16s} {'N x K':>12s}  linear  packed   gemv | int8pack  gemv8   (GB/s of weights)")
    with torch.inference_mode():
        for name, n, k, _ in SHAPES:
            row = measure(n, k, gemv)
            print(f"{name:16s} {n:>5d} x {k:<5d} " + "  ".join(f"{v:6.1f}" for v in row), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else physical_cores())
