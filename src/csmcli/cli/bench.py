"""``csm bench``: reproducible speed figures for the engine, optionally against transformers."""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..errors import OptionsError
from ..options import FRAME_MS, format_rtf
from .common import ModelFlags, command


@command
def bench(
    random_weights: Annotated[
        bool,
        typer.Option("--random-weights", help="Full-size CSM-1B architecture with random weights instead of --model."),
    ] = False,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Comma-separated batch sizes.")] = "1,4,8",
    frames: Annotated[int, typer.Option("--frames", help="Timed frames per measurement.")] = 24,
    prompt_rows: Annotated[int, typer.Option("--prompt-rows", help="Prompt length in rows.")] = 128,
    baseline: Annotated[
        str | None, typer.Option("--baseline", help="Also time `transformers` on the same weights and print the ratio.")
    ] = None,
    busy_cores: Annotated[
        int,
        typer.Option(
            "--busy-cores",
            help="Keep this many cores busy with spinning processes for the whole run (a competing load).",
        ),
    ] = 0,
    no_graphs: Annotated[bool, typer.Option("--no-cuda-graphs", help="Run frames eagerly on CUDA.")] = False,
    cpu_kernels: Annotated[
        str | None,
        typer.Option(
            "--cpu-kernels", help="auto|packed|plain: CPU matrix kernels [default: $CSM_CPU_KERNELS or auto]."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    *,
    loader: ModelFlags,
) -> None:
    """Measure prefill, ms per frame, time to first audio, batch throughput and memory."""
    from ..bench import BenchSetup, run_bench
    from ..cpu import check_cpu_kernels
    from ..quant import check_quantization
    from .loading import load_settings

    check_quantization(loader.quantize)
    settings = load_settings()
    settings.pop("cuda_graphs")  # bench has its own --no-graphs
    settings["cpu_kernels"] = check_cpu_kernels(cpu_kernels or settings["cpu_kernels"])
    if baseline not in (None, "transformers"):
        raise OptionsError(f"baseline must be 'transformers', got {baseline!r}")
    try:
        sizes = tuple(sorted({int(b) for b in batch_sizes.split(",") if b.strip()}))
    except ValueError:
        raise OptionsError(f"batch sizes must be integers like 1,4,8, got {batch_sizes!r}") from None
    if busy_cores < 0:
        raise OptionsError(f"--busy-cores must be 0 or more, got {busy_cores}")
    if not sizes or min(sizes) < 1 or frames < 2 or prompt_rows < 2 or prompt_rows + frames + 8 > 2048:
        raise OptionsError("need batch sizes >= 1, frames >= 2 and prompt rows >= 2 within 2048 positions")
    setup = BenchSetup(
        prompt_rows=prompt_rows, frames=frames, batch_sizes=sizes, baseline=baseline, busy_cores=busy_cores
    )
    model = None if random_weights else loader.model
    settings.update(device=loader.device, dtype=loader.dtype, quantize=loader.quantize, compile=loader.compile)
    result = run_bench(model, setup, loader.thread_setting, graphs=not no_graphs, **settings)
    result["openmp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    _print(result)


def _print(r: dict) -> None:
    table = Table(title=f"csm bench: {r['model']}", show_header=False, box=None)
    rows = [
        (
            "device",
            f"{r['device']} ({r['device_type']}), {r['threads']} threads (--threads {r['threads_setting']}), "
            f"{r['busy_cores']} cores kept busy, OpenMP waits {r['openmp_wait_policy'] or 'default'}, "
            f"torch {r['torch']}",
        ),
        (
            "dtype / quantization",
            f"{r['dtype']} / {r['quantization']}, CUDA graphs: {r['cuda_graphs']}, compiled: {r['compiled']}",
        ),
        *(
            [
                (
                    "CPU path",
                    f"{r['cpu_isa']}, bf16 packed: {r['cpu_bf16_packed']}, kernels {r['cpu_kernels']} "
                    f"(batched: {r.get('cpu_kernels_batched', r['cpu_kernels'])}), "
                    f"weights prefetched in passes of {r['cpu_prefetch_rows']}+ rows",
                )
            ]
            if r["cpu_kernels"]
            else []
        ),
        *(
            [
                (
                    "floor",
                    f"{r['floor_ms_per_frame']:.1f} ms per frame: {r['frame_weight_mb']:.0f} MB of weights at "
                    f"{r['memory_read_gb_s']:.1f} GB/s",
                )
            ]
            if "floor_ms_per_frame" in r
            else []
        ),
        ("prefill", f"{r['prefill_ms']:.1f} ms for {r['prompt_rows']} rows"),
        ("ms per frame (1 stream)", f"{r['ms_per_frame']:.1f} ms  ({format_rtf(r['ms_per_frame'], FRAME_MS)})"),
        ("time to first audio", f"{r['time_to_first_audio_ms']:.1f} ms"),
        (
            f"  behind a {r['prefix_rows']}-row voice",
            f"{r['time_to_first_audio_uncached_prefix_ms']:.1f} ms uncached, "
            f"{r['time_to_first_audio_cached_prefix_ms']:.1f} ms with the prefix cache",
        ),
        ("peak memory", f"{r['peak_memory_mb']:.0f} MB"),
    ]
    for size, b in r["batches"].items():
        rows.append(
            (
                f"batch {size}",
                f"{b['ms_per_frame']:.1f} ms/frame, {b['frames_per_s']:.1f} frames/s, "
                f"{format_rtf(1, b['frames_per_s'] * FRAME_MS / 1000)} in total",
            )
        )
    if "baseline" in r:
        for dtype, run in r["baseline"]["dtypes"].items():
            rows.append((f"transformers {dtype}", f"{run['ms_per_frame']:.1f} ms per frame"))
        rows.append(("speedup", f"{r['speedup_vs_baseline']:.2f}x (against transformers {r['baseline']['dtype']})"))
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)


def register(app: typer.Typer) -> None:
    """Add ``bench`` to the app."""
    app.command("bench")(bench)
