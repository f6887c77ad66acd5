"""Frame steps with the depth decoder's 31 steps in one call against one call each, alternating.

Loads full-size random weights, builds an engine for ``--batch`` streams, then takes the fused depth
decoder (:class:`csmcli.qkernel.FusedDepth`) away and back every few steps (the steps then run one
fused transformer step each, with torch's heads, sampling and projections between them) and prints
each one's median ms a step.  Alternating in one process keeps a noisy machine's drift out of the
comparison.

Usage: python scripts/fused_depth_ab.py [--quantize none|int8|int4] [--dtype auto|bfloat16|float32]
       [--batch N] [--rounds R]
(prefix ``CSM_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` for the AVX2 path)
"""

from __future__ import annotations

import argparse

from csmcli import bench
from csmcli.cli.loading import cpu_settings
from csmcli.loader import load_parts, make_engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantize", default="int4")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    parts = load_parts(None, quantize=args.quantize, dtype=args.dtype, max_batch_size=args.batch, **cpu_settings())
    engine = make_engine(parts.model, parts.codec, parts.device, parts.dtype, args.batch,
                         cpu_kernels=parts.cpu_kernels, cpu_caps=parts.cpu_caps)  # fmt: skip
    model, fused = engine.model, engine.model.fused_depth
    if fused is None:
        raise SystemExit(f"{engine.cpu_kernels}: no fused depth decoder here, nothing to compare")

    def use(depth) -> None:
        model.fused_depth = depth

    times = bench.alternating_steps(engine, args.batch, {"one call": lambda: use(fused), "31 calls": lambda: use(None)},
                                    args.rounds)  # fmt: skip
    summary = ", ".join(f"{name} {ms:.1f}" for name, ms in times.items())
    print(f"batch {args.batch}, {args.quantize}, {engine.cpu_kernels}: {summary} ms a step")


if __name__ == "__main__":
    main()
