"""Frame steps with the weights in 4 KiB pages against 2 MiB pages, alternating in one process.

Loads full-size random weights with :mod:`csmcli.hugepages` off, keeps that copy, moves the
weights a frame streams into 2 MiB pages as ``prepare_cpu`` does, then swaps the two copies (and
rebuilds the fused steps, which hold the weights' addresses) every few steps and prints each one's
median ms a step.  Alternating in one process keeps a noisy machine's drift out of the comparison.

Usage: python scripts/hugepages_ab.py [--quantize none|int8|int4] [--dtype auto|bfloat16|float32]
       [--batch N] [--rounds R]
(prefix ``CSM_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` for the AVX2 path)
"""

from __future__ import annotations

import argparse

import torch

from csmcli import bench, cpu, hugepages
from csmcli.cli.loading import cpu_settings
from csmcli.loader import load_parts, make_engine
from csmcli.model import held_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantize", default="int4")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    if not hugepages.supported():
        raise SystemExit("transparent huge pages are off here: nothing to compare")
    supported, hugepages.supported = hugepages.supported, lambda: False  # load in 4 KiB pages
    parts = load_parts(None, quantize=args.quantize, dtype=args.dtype, max_batch_size=args.batch, **cpu_settings())
    engine = make_engine(parts.model, parts.codec, parts.device, parts.dtype, args.batch,
                         cpu_kernels=parts.cpu_kernels, cpu_caps=parts.cpu_caps)  # fmt: skip
    hugepages.supported = supported
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

    times = bench.alternating_steps(engine, args.batch, {"4 KiB": lambda: use(small), "2 MiB": lambda: use(big)},
                                    args.rounds)  # fmt: skip
    summary = ", ".join(f"{name} pages {ms:.1f}" for name, ms in times.items())
    print(f"batch {args.batch}, {args.quantize}, {engine.cpu_kernels}: {summary} ms a step")


if __name__ == "__main__":
    main()
