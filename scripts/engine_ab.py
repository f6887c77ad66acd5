"""Frame steps of one engine in two variants, alternating in one process.

Loads full-size random weights, builds an engine for ``--batch`` streams, then switches between the
two variants of ``--compare`` every few steps and prints each one's median ms a step (alternating in
one process keeps a noisy machine's drift out of the comparison):

* ``hugepages``: the weights a frame streams in 4 KiB pages (loaded with :mod:`csmcli.hugepages`
  off) against the copy ``prepare_cpu`` moves into 2 MiB pages; the fused steps, which hold the
  weights' addresses, are rebuilt at each switch.
* ``fused-depth``: a frame's 31 depth-decoder steps in one call (:class:`csmcli.qkernel.FusedDepth`)
  against one fused step each, with torch's heads, sampling and projections between them.
* ``prefetch``: csmcli's kernels prefetching their weights from one activation row against from
  four (:attr:`csmcli.cpu.CpuCaps.prefetch_rows`).
* ``pairs``: int4 products on AVX-512 VNNI taking two 16-row blocks a pass (from two rows on)
  against one block a pass.

Usage: python scripts/engine_ab.py --compare hugepages|fused-depth|prefetch|pairs [--quantize none|int8|int4]
       [--dtype auto|bfloat16|float32] [--batch N] [--rounds R]
(prefix ``CSM_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` for the AVX2 path)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from csmcli import bench, cpu, hugepages
from csmcli.cli.loading import cpu_settings
from csmcli.engine import Engine
from csmcli.loader import load_parts, make_engine
from csmcli.model import held_weights


def hugepage_variants(engine: Engine) -> dict[str, Callable[[], None]]:
    """4 KiB pages (the engine as loaded) and 2 MiB pages (the weights moved now)."""
    model = engine.model
    held = [t for part, _ in model.frame_parts() for t in held_weights(part) if isinstance(t, torch.Tensor)]
    tensors = list({id(t): t for t in held}.values())  # fbgemm's opaque weights stay
    small = [t.data for t in tensors]
    moved = hugepages.adopt(tensors)
    big = [t.data for t in tensors]
    print(f"{engine.cpu_kernels}: {moved / 1e6:.0f} MB moved into 2 MiB pages")

    def use(copy: list[torch.Tensor]) -> None:
        for t, data in zip(tensors, copy, strict=True):
            t.data = data
        cpu.fuse_steps(model)

    return {"4 KiB pages": lambda: use(small), "2 MiB pages": lambda: use(big)}


def fused_depth_variants(engine: Engine) -> dict[str, Callable[[], None]]:
    """The depth decoder's steps in one call and in 31."""
    model, fused = engine.model, engine.model.fused_depth
    if fused is None:
        raise SystemExit(f"{engine.cpu_kernels}: no fused depth decoder here, nothing to compare")

    def use(depth) -> None:
        model.fused_depth = depth

    return {"one call": lambda: use(fused), "31 calls": lambda: use(None)}


def prefetch_variants(engine: Engine) -> dict[str, Callable[[], None]]:
    """The kernels the engine's layers use prefetching from one row and from four."""
    libs = cpu.kernel_libraries(engine.model)
    if not libs:
        raise SystemExit(f"{engine.cpu_kernels}: none of csmcli's kernels here, nothing to compare")

    def use(rows: int) -> None:
        for lib in libs:
            lib.csm_prefetch_from(rows)

    return {"prefetch from 1 row": lambda: use(1), "from 4 rows": lambda: use(4)}


def pair_variants(engine: Engine) -> dict[str, Callable[[], None]]:
    """int4 products on AVX-512 VNNI taking two blocks a pass from two rows on, and one block always."""
    libs = [lib for lib in cpu.kernel_libraries(engine.model) if hasattr(lib, "csm_pair_from")]
    if not libs or not engine.cpu_kernels.startswith("int4-avx512_vnni"):
        raise SystemExit(f"{engine.cpu_kernels}: not the int4 kernel's AVX-512 VNNI path, nothing to compare")

    def use(rows: int) -> None:
        for lib in libs:
            lib.csm_pair_from(rows)

    return {"two blocks a pass": lambda: use(2), "one block": lambda: use(1 << 30)}


VARIANTS = {
    "hugepages": hugepage_variants,
    "fused-depth": fused_depth_variants,
    "prefetch": prefetch_variants,
    "pairs": pair_variants,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", choices=tuple(VARIANTS), required=True)
    parser.add_argument("--quantize", default="int4")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    pages = args.compare == "hugepages"
    if pages and not hugepages.supported():
        raise SystemExit("transparent huge pages are off here: nothing to compare")
    supported = hugepages.supported
    if pages:
        hugepages.supported = lambda: False  # load in 4 KiB pages
    parts = load_parts(None, quantize=args.quantize, dtype=args.dtype, max_batch_size=args.batch, **cpu_settings())
    engine = make_engine(parts.model, parts.codec, parts.device, parts.dtype, args.batch,
                         cpu_kernels=parts.cpu_kernels, cpu_caps=parts.cpu_caps)  # fmt: skip
    hugepages.supported = supported
    variants = VARIANTS[args.compare](engine)
    times = bench.alternating_steps(engine, args.batch, variants, args.rounds)
    summary = ", ".join(f"{name} {ms:.1f}" for name, ms in times.items())
    print(f"batch {args.batch}, {args.quantize}, {engine.cpu_kernels}: {summary} ms a step")


if __name__ == "__main__":
    main()
