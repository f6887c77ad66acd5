"""Turns per second of ``csm batch`` run locally and on a local Ray cluster with 1 and 2 workers.

Usage: ``python scripts/bench_cluster.py [--model DIR] [--scripts 4] [--turns 4] [--max-audio-ms 800]``.

Without ``--model`` it makes the tiny random checkpoint (weights sized for tests, not for speech),
so the figures measure the machinery (start-up, scheduling, one model per worker) more than the
model.  Each row is one ``csm batch`` command from a clean output folder; the time is the wall
time of the whole command, start-up (Ray, workers, model loading) included.  A first, untimed
local run fills torch's compile cache so that no row pays for compiling the CPU kernels.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINES = ["Alice: Good morning, how was the trip?", "Bob: Long, but the view from the train was worth it."]


def run(work: Path, model: str, args: list[str]) -> float:
    """One ``csm batch`` over every script in ``work``: its wall seconds."""
    scripts = sorted(str(p) for p in work.glob("*.txt"))
    out = work / f"out-{time.monotonic_ns()}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CSM_MODEL": model, "PYTHONPATH": str(ROOT / "src")}
    clock = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "csmcli", "batch", *scripts, "-d", str(out), "--seed", "1", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - clock
    if proc.returncode:
        sys.exit(proc.stderr)
    return wall


def main() -> None:
    """Print one row per configuration."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder (default: a tiny random one)")
    parser.add_argument("--scripts", type=int, default=4)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-audio-ms", type=int, default=800)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = opts.model
        if model is None:
            sys.path.insert(0, str(ROOT / "tests"))
            from tiny_checkpoint import make_tiny_checkpoint

            model = str(make_tiny_checkpoint(work / "tiny", seed=0))
        for n in range(opts.scripts):
            (work / f"talk{n}.txt").write_text("\n".join(LINES[t % 2] for t in range(opts.turns)) + "\n")
        common = ["--device", "cpu", "--dtype", "float32", "--max-audio-ms", str(opts.max_audio_ms), "-q"]
        total = opts.scripts * opts.turns
        run(work, model, common)  # fills torch's compile cache, which every later command reuses
        print(f"{opts.scripts} scripts x {opts.turns} turns, {opts.max_audio_ms} ms each, {os.cpu_count()} cores")
        for label, extra in [
            ("local", []),
            ("ray, 1 worker x 2 cores", ["--ray", "local", "--ray-cpus", "2"]),
            ("ray, 2 workers x 1 core", ["--ray", "local", "--ray-cpus", "1"]),
        ]:
            wall = run(work, model, [*common, *extra])
            print(f"{label:26s} {wall:7.1f} s wall  {total / wall:6.3f} turns/s")


if __name__ == "__main__":
    main()
