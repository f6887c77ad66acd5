"""GPU A/B: one stream's ms per frame under each way of running the frame, in one process.

Full-size CSM-1B with random weights, bfloat16, one slot, CUDA graphs.  Variants, in order:
``all-codes`` (graphs sample among all 2048 codes, as the first release did), ``top64`` (graphs
sample among the best 64, the default), ``layers`` (plus torch.compile of each layer's pointwise
work: ``--compile``) and ``step`` (plus each depth-decoder step compiled whole:
``Engine.compile(whole_step=True)``, experimental).  Each is timed right after its capture and
again once all are captured (captured graphs keep what they captured), with ``csm bench``'s
measure_throughput: median of 48 frames behind a 128-row prompt.

Usage: python scripts/gpu_variants.py [OUT_DIR] [--device cpu --config DIR/config.json --frames 4]
(the options only serve to try the script itself without a GPU, on a tiny model; the CPU engines
use plain kernels: the compiled variants cannot compile through packed oneDNN weights).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from csmcli.bench import BenchSetup, measure_throughput
from csmcli.checkpoint import CSM_1B_CONFIG
from csmcli.engine import Engine
from csmcli.loader import build_model, random_codec, random_state


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", type=Path)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--config", type=Path)
    ap.add_argument("--frames", type=int, default=48)
    args = ap.parse_args()
    device, dtype = torch.device(args.device), torch.bfloat16
    config = json.loads(args.config.read_text()) if args.config else CSM_1B_CONFIG
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    t = time.perf_counter()
    net = build_model(config, random_state(config, device=device), device, dtype)
    codec = random_codec(device)
    print(f"model built in {time.perf_counter() - t:.1f} s on {name}", flush=True)
    setup = BenchSetup(frames=args.frames, warmup=4)

    def engine(variant: str) -> Engine:
        e = Engine(net, codec, device, dtype, max_batch=1, cpu_kernels="plain")
        if variant == "all-codes":
            e.graph_top_k = None
        if variant in ("layers", "step"):
            e.compile(whole_step=variant == "step")
        t = time.perf_counter()
        e.capture_graphs()
        print(f"{variant}: compile + capture {time.perf_counter() - t:.1f} s", flush=True)
        return e

    results: dict[str, list[float]] = {}
    variants = ["all-codes", "top64", "layers", "step"]
    engines = {}
    for v in variants:  # each engine holds its own compiled functions
        engines[v] = engine(v)
        results[v] = [measure_throughput(engines[v], setup, 1)["ms_per_frame"]]
        print(f"{v}: {results[v][0]:.2f} ms/frame", flush=True)
    for v in variants:  # captured graphs replay what they captured, so every variant can run again
        results[v].append(measure_throughput(engines[v], setup, 1)["ms_per_frame"])
    print("\nvariant      ms/frame (runs)")
    for v in variants:
        print(f"{v:12s} " + " / ".join(f"{x:.2f}" for x in results[v]))
    if args.out is not None:
        report = {"device": name, "torch": torch.__version__, "ms_per_frame": results}
        (args.out / "gpu_variants.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
