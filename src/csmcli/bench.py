"""``csm bench``: measure the engine (prefill, ms per frame, time to first audio, batching, memory).

With ``random_weights`` the full-size CSM-1B architecture gets random weights (the same compute
as the real model), so the numbers can be reproduced where the gated weights are absent.  The
``transformers`` baseline runs ``CsmForConditionalGeneration.generate`` on the same weights,
prompt length and frame count in the same process: in the model's dtype on a GPU, in float32 and
bfloat16 on the CPU (compared against the faster).  On the CPU a frame's floor is the bytes of
weights it reads over the memory bandwidth measured in the same run.
"""

from __future__ import annotations

import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from . import hugepages
from .engine import Job
from .model import CSMModel, held_weights
from .options import FRAME_MS, GenerationOptions
from .prompt import Prompt
from .threads import physical_cores, spinners

__all__ = ["BenchSetup", "frame_weight_bytes", "memory_read_gb_s", "physical_cores", "run_bench"]


@dataclass
class BenchSetup:
    """What to measure."""

    prompt_rows: int = 128
    frames: int = 24
    batch_sizes: tuple[int, ...] = (1, 4, 8)
    warmup: int = 3
    baseline: str | None = None
    voice_rows: int = 320
    busy_cores: int = 0  # processes that keep a core busy for the whole run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _prompt(rows: int, seed: int = 0) -> Prompt:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(rows, 33, dtype=torch.long)
    tokens[:, -1] = torch.randint(0, 128000, (rows,), generator=g)
    tokens[0, -1], tokens[-1, -1] = 128000, 128001
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, -1] = True
    return Prompt(tokens, mask)


def _options(frames: int) -> GenerationOptions:
    return GenerationOptions(seed=1, max_audio_ms=frames * FRAME_MS)


class FrameLoop(Protocol):
    """What the measurements drive, through public operations only: a
    :class:`~csmcli.synthesizer.Synthesizer` (or the :class:`~csmcli.engine.Engine` behind one)."""

    device: torch.device

    def submit(self, job: Job) -> Job: ...

    def step(self) -> bool: ...

    def admit(self) -> int: ...

    def clear_prefix_cache(self) -> None: ...


def _run_to_end(loop: FrameLoop, job: Job) -> None:
    while not job.done.is_set():
        loop.step()


def _first_audio_s(loop: FrameLoop, job: Job) -> float:
    """Seconds from submitting ``job`` to its first chunk; the job then runs to its end."""
    loop.submit(job)
    t = time.perf_counter()
    while not job.pop_chunks():
        loop.step()
    elapsed = time.perf_counter() - t
    _run_to_end(loop, job)
    return elapsed


@torch.inference_mode()
def measure_engine(loop: FrameLoop, setup: BenchSetup) -> dict[str, Any]:
    """Prefill time, time to first audio (plain and behind a cached voice) and one stream's ms per frame."""
    device = loop.device
    total = setup.warmup + setup.frames
    out: dict[str, Any] = {}
    prefill = []
    for i in range(3):
        job = loop.submit(Job(_prompt(setup.prompt_rows, i), _options(total)))
        _sync(device)
        t = time.perf_counter()
        loop.admit()
        _sync(device)
        prefill.append(time.perf_counter() - t)
        job.cancel()
        _run_to_end(loop, job)
    out["prefill_ms"] = 1e3 * statistics.median(prefill)

    ttfa = [_first_audio_s(loop, Job(_prompt(setup.prompt_rows, 10 + i), _options(2))) for i in range(3)]
    out["time_to_first_audio_ms"] = 1e3 * statistics.median(ttfa)
    out.update(_prefix_ttfa(loop, setup))

    one = measure_throughput(loop, setup, 1)
    out["batches"] = {"1": one}
    out["ms_per_frame"] = one["ms_per_frame"]
    out["real_time_factor"] = one["real_time_factor"]
    return out


@torch.inference_mode()
def measure_throughput(loop: FrameLoop, setup: BenchSetup, batch: int) -> dict[str, float]:
    """Median ms per frame with ``batch`` streams generating together."""
    total = setup.warmup + setup.frames
    jobs = [
        loop.submit(Job(_prompt(setup.prompt_rows, 100 + j), _options(total), chunk_frames=8)) for j in range(batch)
    ]
    for _ in range(setup.warmup):
        loop.step()
    times = []
    for _ in range(setup.frames):
        t = time.perf_counter()
        loop.step()
        _sync(loop.device)
        times.append(time.perf_counter() - t)
    for job in jobs:
        _run_to_end(loop, job)
    ms = 1e3 * statistics.median(times)
    return {"ms_per_frame": ms, "frames_per_s": batch * 1e3 / ms, "real_time_factor": ms / FRAME_MS}


def measure_transformers(
    state: dict[str, torch.Tensor], config: dict[str, Any], device: torch.device, dtype: torch.dtype, setup: BenchSetup
) -> dict[str, Any]:
    """transformers' generate on the same weights in ``dtype``: ms per frame from two runs of different length.

    The model is built in ``dtype`` and loads ``state`` (any dtype, converted tensor by tensor), so at
    most one full copy of the weights exists besides ``state``."""
    from transformers import CsmConfig, CsmForConditionalGeneration
    from transformers.initialization import no_init_weights

    cfg = CsmConfig(**{k: v for k, v in config.items() if k not in ("model_type", "transformers_weights")})
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights(), torch.device(device):
            ref = CsmForConditionalGeneration(cfg).to(dtype)
    finally:
        torch.set_default_dtype(default)
    full = dict(state)
    full.setdefault(
        "depth_decoder.model.embed_tokens.weight", full["backbone_model.embed_tokens.embed_audio_tokens.weight"]
    )
    full.setdefault(
        "backbone_model.embed_tokens.embed_audio_tokens.weight", full["depth_decoder.model.embed_tokens.weight"]
    )
    missing, _ = ref.load_state_dict(full, strict=False)
    if any(not k.startswith("codec_model.") for k in missing):
        raise RuntimeError(f"baseline model is missing {missing[:3]}")
    ref.eval()
    ids = _prompt(setup.prompt_rows).tokens[:, -1][None].to(device)
    mask = torch.ones_like(ids)

    def run(frames: int) -> float:
        _sync(device)
        t = time.perf_counter()
        with torch.inference_mode():
            ref.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=frames,
                min_new_tokens=frames,
                do_sample=True,
                temperature=0.9,
                top_k=50,
                depth_decoder_do_sample=True,
                depth_decoder_temperature=0.9,
                depth_decoder_top_k=50,
            )
        _sync(device)
        return time.perf_counter() - t

    run(2)
    short, long_ = max(2, setup.frames // 4), setup.frames
    ms = 1e3 * (run(long_) - run(short)) / (long_ - short)
    return {"ms_per_frame": ms, "real_time_factor": ms / FRAME_MS}


def _prefix_ttfa(loop: FrameLoop, setup: BenchSetup) -> dict[str, float]:
    """Time to first audio for a prompt behind a voice-sized prefix, without and with the prefix cache."""
    voice = _prompt(setup.voice_rows, 1000)
    text = _prompt(24, 1001)
    prompt = Prompt.concat([voice, text])
    prompt.prefix_len = len(voice)
    out = {}
    for label in ("uncached", "cached"):
        times = []  # the last uncached run leaves the prefix cached for the cached runs
        for _ in range(3):
            if label == "uncached":
                loop.clear_prefix_cache()
            times.append(_first_audio_s(loop, Job(prompt, _options(2))))
        out[f"time_to_first_audio_{label}_prefix_ms"] = 1e3 * statistics.median(times)
    out["prefix_rows"] = len(voice)
    return out


@torch.inference_mode()
def alternating_steps(
    loop: FrameLoop, batch: int, variants: dict[str, Callable[[], None]], rounds: int = 6
) -> dict[str, float]:
    """Median ms a step of ``batch`` streams under each variant (a function that sets it up), the
    variants taking turns every few steps in one process, so that a noisy machine's drift falls on
    all of them alike (for A/B scripts)."""
    jobs = [loop.submit(Job(_prompt(64, 100 + j), _options(1000), chunk_frames=1000)) for j in range(batch)]
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(2):
        loop.step()
    for _ in range(rounds):
        for name, use in variants.items():
            use()
            loop.step()
            for _ in range(3):
                start = time.perf_counter()
                loop.step()
                times[name].append(time.perf_counter() - start)
    for job in jobs:
        job.cancel()
    loop.step()
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def _fbgemm_weight(packed: torch.ScriptObject) -> Tensor:
    """The int8 matrix inside fbgemm's packed linear weights (what their reads cost)."""
    return torch.ops.quantized.linear_unpack(packed)[0].int_repr()


def _tensor_bytes(tensors: list[Tensor]) -> int:
    """Bytes the tensors occupy in their own dtype, each counted once (also opaque packed tensors)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        key = id(t) if t.is_mkldnn else t.data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def frame_weight_bytes(model: CSMModel) -> int:
    """Bytes of weights one frame reads (:meth:`~csmcli.model.CSMModel.frame_parts`), as stored
    (float, packed, int8...)."""
    return sum(count * _tensor_bytes(_weights(part)) for part, count in model.frame_parts())


def _weights(part: nn.Module | Tensor) -> list[Tensor]:
    """The matrices behind :func:`~csmcli.model.held_weights` (fbgemm's unpacked)."""
    return [t if isinstance(t, Tensor) else _fbgemm_weight(t) for t in held_weights(part)]


def memory_read_gb_s(size_bytes: int = 2**30, repeats: int = 4) -> float:
    """Memory read bandwidth in GB/s with torch's current threads: the best of ``repeats`` sums over a
    float32 buffer of ``size_bytes`` (choose it far larger than the last-level cache), in 2 MiB pages
    where the CPU path keeps its weights there (:mod:`csmcli.hugepages`)."""
    buf = torch.ones(size_bytes // 4)
    hugepages.adopt([buf])
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    return buf.numel() * 4 / best / 1e9


def peak_memory_mb(device: torch.device) -> float:
    """Peak device memory (CUDA) or peak resident set size of the process (CPU), in MB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_bench(
    model: str | None, setup: BenchSetup, threads: int | str | None = "auto", graphs: bool = True, **settings: Any
) -> dict[str, Any]:
    """Load (or randomly build, ``model=None``) the model, measure it and optionally the transformers
    baseline, with ``setup.busy_cores`` spinning processes running from start to end.

    ``threads``: CPU threads, a number or ``auto`` (measured after the spinners start); ``settings`` are
    :func:`csmcli.loader.load_parts`' other keyword parameters (``device``, ``dtype``, ``quantize``,
    ``compile``, ``cpu_kernels``, ``cpu_isa``, ``mimi``...); ``graphs``: capture CUDA graphs."""
    with spinners(setup.busy_cores):
        time.sleep(0.2 if setup.busy_cores else 0)  # the spinners are running before auto counts busy cores
        result = _measure_all(model, setup, threads, graphs, settings)
    return result


def _measure_all(
    model: str | None, setup: BenchSetup, threads: int | str | None, graphs: bool, settings: dict[str, Any]
) -> dict[str, Any]:
    from .loader import load_parts, make_engine

    parts = load_parts(model, keep_state=setup.baseline is not None, threads=threads, **settings)
    for name, tensor in (parts.state or {}).items():  # the baseline's weights in the model's dtype (less memory)
        parts.state[name] = tensor.to(parts.dtype) if tensor.is_floating_point() else tensor
    net, codec, torch_device, torch_dtype, caps = parts.model, parts.codec, parts.device, parts.dtype, parts.cpu_caps
    # On the CPU one stream gets its own engine: a single-slot engine picks the fastest kernels for
    # one row (csm say / play), a multi-slot one the kernels that serve several rows (serve, batch).
    cpu = torch_device.type == "cpu"
    started = time.perf_counter()
    engine = make_engine(
        net,
        codec,
        torch_device,
        torch_dtype,
        1 if cpu else max(setup.batch_sizes),
        compile=parts.compile,
        cuda_graphs=graphs,
        cpu_kernels=parts.cpu_kernels,
        cpu_caps=caps,
    )
    setup_s = time.perf_counter() - started
    result: dict[str, Any] = {
        "model": parts.source,
        "device": torch.cuda.get_device_name(torch_device)
        if torch_device.type == "cuda"
        else platform.processor() or platform.machine(),
        "device_type": torch_device.type,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "quantization": parts.quantize,
        "threads": torch.get_num_threads(),
        "threads_setting": threads,
        "busy_cores": setup.busy_cores,
        "cuda_graphs": engine.graphs is not None,
        "cpu_kernels": engine.cpu_kernels,
        "cpu_isa": caps.isa if caps else None,
        "cpu_bf16_packed": caps.bf16_packed if caps else None,
        "cpu_prefetch_rows": caps.prefetch_rows if caps else None,
        "compiled": parts.compile,
        "compile_and_capture_s": setup_s,
        "torch": torch.__version__,
        "prompt_rows": setup.prompt_rows,
        "frames": setup.frames,
    }
    if cpu:
        weights = frame_weight_bytes(engine.model)
        result["frame_weight_mb"] = weights / 1e6
        streamed = [t for part, _ in engine.model.frame_parts() for t in held_weights(part)]
        result["frame_weight_mb_in_huge_pages"] = hugepages.bytes_in_arenas(streamed) / 1e6
        result["memory_read_gb_s"] = memory_read_gb_s()
        result["floor_ms_per_frame"] = 1e3 * weights / (result["memory_read_gb_s"] * 1e9)
    result.update(measure_engine(engine, setup))
    if cpu and max(setup.batch_sizes) > 1:
        del engine
        engine = make_engine(
            net,
            codec,
            torch_device,
            torch_dtype,
            max(setup.batch_sizes),
            compile=parts.compile,
            cpu_kernels=parts.cpu_kernels,
            cpu_caps=caps,
        )
        result["cpu_kernels_batched"] = engine.cpu_kernels
    for batch in setup.batch_sizes:
        if batch > 1:
            result["batches"][str(batch)] = measure_throughput(engine, setup, batch)
    result["peak_memory_mb"] = peak_memory_mb(torch_device)
    if setup.baseline == "transformers":
        del engine, net
        if torch_device.type == "cuda":
            torch.cuda.empty_cache()
        result.update(measure_baseline(parts.state, parts.config, torch_device, torch_dtype, setup, result))
    return result


def measure_baseline(
    state: dict[str, Tensor],
    config: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
    setup: BenchSetup,
    ours: dict[str, Any],
) -> dict[str, Any]:
    """transformers on the same weights, in the model's dtype on a GPU and in float32 and bfloat16 on
    the CPU (its best dtype there depends on the CPU); ``speedup_vs_baseline`` is against the fastest."""
    dtypes = (torch.float32, torch.bfloat16) if device.type == "cpu" else (dtype,)
    runs = {str(d).removeprefix("torch."): measure_transformers(state, config, device, d, setup) for d in dtypes}
    best = min(runs, key=lambda name: runs[name]["ms_per_frame"])
    baseline = {"name": "transformers", "dtype": best, **runs[best], "dtypes": runs}
    return {"baseline": baseline, "speedup_vs_baseline": runs[best]["ms_per_frame"] / ours["ms_per_frame"]}
