"""The frame loop: requests in, audio chunks out, many requests in lock step.

An :class:`Engine` owns the model, the codec and static buffers sized once for ``max_batch``
slots: the backbone KV cache (``max_batch`` x 2048 positions), the depth decoder's cache, each
slot's last hidden state, position, sampling settings and recent codes.  :meth:`Engine.step`
admits waiting jobs (prefilling their prompts into free slots), then generates one frame for
every active slot at once and hands each job its codes; a job decodes them with its own
streaming Mimi decoder and emits :class:`AudioChunk` s.  The CLI drives ``step`` itself; the
server runs it in a background thread while jobs join and leave.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .cpu import CpuCaps, prepare_cpu
from .cpu import cpu_caps as detect_cpu_caps
from .errors import PromptTooLongError
from .graphs import EagerFrame, capture_frames, eager_frames, frame_buckets
from .model import EAGER_LAYERS, CSMModel, DepthStep, LayerFns
from .options import FRAME_MS, REPETITION_WINDOW, GenerationOptions
from .prompt import Prompt
from .sampling import FrameSampler, SamplingParams, frame_keys, sample

if TYPE_CHECKING:
    from .codec import FrameCodec, FrameDecoder

#: Codes 0..2047 are Mimi's; 2048..2050 are reserved and never sampled.
NUM_AUDIO_CODES = 2048
#: CUDA graphs sample among this many best codes per row (enough for every job with top_k up to it).
GRAPH_TOP_K = 64


@dataclass
class AudioChunk:
    """A piece of generated audio: float32 mono samples, in order, without gaps or overlaps."""

    samples: np.ndarray
    sample_rate: int
    start_frame: int
    frames: int
    final: bool = False


@dataclass
class JobStats:
    """What happened to one job, for logs, progress and benchmarks."""

    prompt_rows: int = 0
    prefix_cached: bool = False
    frames: int = 0
    stop_reason: str = ""
    submitted_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    first_audio_at: float | None = None
    finished_at: float | None = None

    @property
    def time_to_first_audio(self) -> float | None:
        """Seconds from submission to the first chunk."""
        return None if self.first_audio_at is None else self.first_audio_at - self.submitted_at


class Job:
    """One utterance being generated.  Chunks go to ``sink`` (by default an internal queue)."""

    def __init__(
        self,
        prompt: Prompt,
        options: GenerationOptions,
        first_chunk_frames: int = 1,
        chunk_frames: int = 8,
        sink: Callable[[AudioChunk], None] | None = None,
    ) -> None:
        self.prompt = prompt
        self.options = options
        self.seed = options.seed if options.seed is not None else secrets.randbits(32)
        self.first_chunk_frames = max(1, first_chunk_frames)
        self.chunk_frames = max(1, chunk_frames)
        self.stats = JobStats(prompt_rows=len(prompt))
        self.codes: list[Tensor] = []
        self.error: BaseException | None = None
        self._chunks: deque[AudioChunk] = deque()
        self._sink = sink or self._chunks.append
        self._pending: list[Tensor] = []
        self._emitted_frames = 0
        self._decoder: FrameDecoder | None = None
        self.lead_samples = 0
        self._cancelled = threading.Event()
        self.done = threading.Event()

    def cancel(self) -> None:
        """Stop generating this job at the next frame boundary (safe from any thread)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        """True once :meth:`cancel` was called."""
        return self._cancelled.is_set()

    def pop_chunks(self) -> list[AudioChunk]:
        """Chunks produced since the last call (default sink only)."""
        out = []
        while self._chunks:
            out.append(self._chunks.popleft())
        return out

    def all_codes(self) -> Tensor:
        """Every generated frame so far, ``[frames, 32]``."""
        return torch.stack(self.codes) if self.codes else torch.zeros(0, 32, dtype=torch.long)

    def _add_frame(self, codes: Tensor, codec: FrameCodec) -> None:
        self.codes.append(codes)
        self._pending.append(codes)
        self.stats.frames += 1
        wanted = self.first_chunk_frames if self._emitted_frames == 0 else self.chunk_frames
        if len(self._pending) >= wanted:
            self._emit(codec, final=False)

    def _finish(self, reason: str, codec: FrameCodec) -> None:
        self.stats.stop_reason = reason
        if reason != "cancelled":
            self._emit(codec, final=True)
        self.stats.finished_at = time.perf_counter()
        self.done.set()

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        self.stats.stop_reason = "error"
        self.stats.finished_at = time.perf_counter()
        self.done.set()

    def _emit(self, codec: FrameCodec, final: bool) -> None:
        if self._decoder is None:
            self._decoder = codec.stream()
        frames = len(self._pending)
        samples = self._decoder.push(torch.stack(self._pending)) if frames else np.zeros(0, dtype=np.float32)
        if self.lead_samples and self._emitted_frames == 0:
            samples = np.concatenate([np.zeros(self.lead_samples, dtype=np.float32), samples])
        self._pending = []
        if self.stats.first_audio_at is None and frames:
            self.stats.first_audio_at = time.perf_counter()
        chunk = AudioChunk(samples, codec.sample_rate, self._emitted_frames, frames, final)
        self._emitted_frames += frames
        self._sink(chunk)


class Engine:
    """Model + codec + static per-slot state; generates frames for all active jobs together."""

    def __init__(
        self,
        model: CSMModel,
        codec: FrameCodec,
        device: torch.device,
        dtype: torch.dtype,
        max_batch: int = 1,
        prefix_bytes: int = 256 * 2**20,
        cpu_kernels: str | None = None,
        cpu_caps: CpuCaps | None = None,
    ) -> None:
        self.model = model
        # on the CPU the projections are swapped for faster kernels (see csmcli.cpu)
        cpu = device.type == "cpu"
        self.cpu_caps = (cpu_caps or detect_cpu_caps()) if cpu else None
        self.cpu_kernels = prepare_cpu(model, cpu_kernels, max_batch, self.cpu_caps) if cpu else None
        self.codec = codec
        self.device = device
        self.dtype = dtype
        self.max_batch = max_batch
        self.max_len = model.max_len
        self.cache = model.backbone.new_cache(max_batch, self.max_len, dtype, device)
        self.depth_cache = model.decoder.new_cache(max_batch, model.num_codebooks + 1, dtype, device)
        self.hidden = torch.zeros(max_batch, model.backbone_spec.dim, dtype=dtype, device=device)
        for net in (model.backbone, model.decoder):  # built now, so compiled code never sees them change
            net.rope_tables(dtype)
        self.params = SamplingParams.empty(max_batch, device)
        self.codebook_ids = torch.arange(model.num_codebooks, device=device)
        self.recent = torch.full(
            (max_batch, REPETITION_WINDOW, model.num_codebooks), -1, dtype=torch.long, device=device
        )
        self.slots: list[Job | None] = [None] * max_batch
        self.positions = [0] * max_batch  # each slot's next position (host side)
        # the same on the device, where the frame (and its CUDA graph) reads it
        self.frame_positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.sample_fn = sample
        self.depth_step: DepthStep | None = None  # None: the model's step with layer_fns
        self.layer_fns: LayerFns = EAGER_LAYERS  # compile() swaps in compiled ones, for this engine only
        # eager frames narrow sampling to what the live jobs use; graphs take graph_top_k candidates
        self.graph_top_k: int | None = GRAPH_TOP_K  # None: every code (what the first release did)
        self.k_max: int | None = None
        # which sampling rules the frame's rows use (see sample); compiled frames use them all
        self.use_penalty = self.use_top_p = self.use_greedy = True
        self.compiled = False  # set by compile()
        self.graphs: dict[int, torch.cuda.CUDAGraph | EagerFrame] | None = None
        self.graph_buckets: list[int] = []
        self.graph_codes: dict[int, Tensor] = {}
        self.waiting: deque[Job] = deque()
        self.lock = threading.RLock()
        self.prefix_store: OrderedDict[str, Tensor] = OrderedDict()
        self.prefix_bytes = prefix_bytes

    # -- admission ---------------------------------------------------------------------------

    def check_fits(self, prompt: Prompt, options: GenerationOptions) -> None:
        """Raise :class:`PromptTooLongError` if prompt rows plus the frame budget exceed the context."""
        needed = len(prompt) + options.max_frames
        if needed > self.max_len:
            room = self.max_len - len(prompt)
            hint = f"lower max_audio_ms to {room * FRAME_MS} or less" if room > 0 else "shorten the text or the context"
            raise PromptTooLongError(
                f"prompt takes {len(prompt)} positions and max_audio_ms={options.max_audio_ms} needs "
                f"{options.max_frames} frames: more than the model's {self.max_len}; {hint}"
            )

    def submit(self, job: Job) -> Job:
        """Queue a job; it starts at the next :meth:`step` with a free slot."""
        self.check_fits(job.prompt, job.options)
        self.waiting.append(job)
        return job

    @property
    def busy(self) -> bool:
        """True while any job is waiting or running."""
        return bool(self.waiting) or any(s is not None for s in self.slots)

    @property
    def active_count(self) -> int:
        """Jobs currently holding a slot."""
        return sum(s is not None for s in self.slots)

    def stats(self) -> dict[str, int]:
        """Jobs ``active`` (holding a slot) and ``waiting``, and the slots there are (``max_batch_size``)."""
        with self.lock:
            return {"active": self.active_count, "waiting": len(self.waiting), "max_batch_size": self.max_batch}

    @torch.inference_mode()
    def admit(self) -> int:
        """Prefill waiting jobs into free slots without generating a frame (:meth:`step` does this
        first); how many jobs started."""
        with self.lock:
            before = self.active_count
            self._admit()
            return self.active_count - before

    def clear_prefix_cache(self) -> None:
        """Forget every stored context prefix."""
        with self.lock:
            self.prefix_store.clear()

    def _admit(self) -> None:
        while self.waiting and None in self.slots:
            job = self.waiting.popleft()
            if job.cancelled:
                job._finish("cancelled", self.codec)
                continue
            slot = self.slots.index(None)
            try:
                self._prefill(slot, job)
            except Exception as exc:  # a bad job must not take the engine down
                job._fail(exc)
                continue
            self.slots[slot] = job

    def _prefill(self, slot: int, job: Job) -> None:
        job.stats.started_at = time.perf_counter()
        prompt = job.prompt
        start = self._restore_prefix(slot, prompt, job.stats)
        tokens = prompt.tokens[start:].to(self.device)
        mask = prompt.mask[start:].to(self.device)
        embeds = self.model.embed_rows(tokens, mask).to(self.dtype)
        self.hidden[slot] = self.model.prefill(embeds, start, self.cache, slot, self.layer_fns)
        self.positions[slot] = len(prompt)
        o = job.options
        self.params.set_row(slot, o.temperature, o.top_k, o.top_p, o.repetition_penalty, job.seed)
        self.recent[slot] = -1

    def _restore_prefix(self, slot: int, prompt: Prompt, stats: JobStats) -> int:
        """Fill the slot's cache with the prompt's prefix (from the store, or computed and stored).

        The prefix is always run as its own prefill, cached or not, so both paths compute
        exactly the same numbers.  Returns the position where the rest of the prompt starts.
        """
        key = prompt.prefix_key
        if key is None:
            return 0
        n = prompt.prefix_len
        kv = self.prefix_store.get(key)
        if kv is None:
            embeds = self.model.embed_rows(prompt.tokens[:n].to(self.device), prompt.mask[:n].to(self.device))
            self.model.prefill(embeds.to(self.dtype), 0, self.cache, slot, self.layer_fns)
            kv = self.cache[:, :, slot, :, :n]
            if kv.numel() * kv.element_size() <= self.prefix_bytes:
                self.prefix_store[key] = kv.clone()
                while sum(t.numel() * t.element_size() for t in self.prefix_store.values()) > self.prefix_bytes:
                    self.prefix_store.popitem(last=False)
        else:
            self.prefix_store.move_to_end(key)
            self.cache[:, :, slot, :, :n] = kv
            stats.prefix_cached = True
        return n

    # -- the frame loop ----------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> bool:
        """Admit waiting jobs, then generate one frame for every active slot.  False when idle."""
        with self.lock:
            self._drop_cancelled()
            self._admit()
            rows = [i for i, s in enumerate(self.slots) if s is not None]
            if not rows:
                return False
            n = rows[-1] + 1
            live = set(rows)
            jobs = [self.slots[i].options for i in rows]
            k_max = max(o.top_k for o in jobs)
            # the graphs sample among the best graph_top_k codes; a job asking for more runs eagerly
            graphed = self.graphs is not None and (self.graph_top_k is None or k_max <= self.graph_top_k)
            width = self._bucket(n) if graphed else n
            positions = [self.positions[i] if i in live else 0 for i in range(width)]
            self.frame_positions[:width].copy_(torch.tensor(positions), non_blocking=True)
            if graphed:
                self.graphs[width].replay()
                codes = self.graph_codes[width]
            else:
                # compiled steps always take at least graph_top_k candidates and the penalty (a
                # penalty of 1 changes nothing; see sample): the same codes from one graph for all
                self.k_max = max(k_max, self._least_candidates) if self.compiled else k_max
                self.use_penalty = self.compiled or any(o.repetition_penalty != 1.0 for o in jobs)
                self.use_top_p = self.compiled or any(o.top_p < 1.0 for o in jobs)
                self.use_greedy = self.compiled or any(o.greedy for o in jobs)
                with self._frame_stance():
                    codes = self._frame(width, max(positions) + 1)
            host_codes = codes.cpu()
            for i in rows:
                self.positions[i] += 1
                self._deliver(i, host_codes[i])
            return True

    def _frame(self, n: int, kv_len: int) -> Tensor:
        """One frame for rows ``0..n-1``: sample 32 codes, then feed them to the backbone.

        Works only on preallocated state (hidden states, positions, caches, sampling rows), so
        the same function runs eagerly or is captured once per batch bucket as a CUDA graph.
        """
        codes = self.model.decode_frame(
            self.hidden[:n], self._sampler(), self.depth_cache, self.depth_step, self.layer_fns
        )
        frame_slot = self.params.frame[:n] % REPETITION_WINDOW
        self.recent[torch.arange(n, device=self.device), frame_slot] = codes
        self.params.frame[:n] += 1
        self.hidden[:n] = self.model.backbone_step(codes, self.frame_positions[:n], self.cache, kv_len, self.layer_fns)
        return codes

    def _frame_stance(self) -> AbstractContextManager[None]:
        """How a CPU frame runs compiled code: checking only the guards that tell its graphs apart.

        Every graph a frame needs is compiled before the first job (:meth:`compile` runs frames of
        one and several slots, and compiled frames always take the same sampling path), so full
        guard checks would only cost time, on each of a frame's many compiled calls.
        """
        if self.compiled and self.device.type == "cpu":
            return torch.compiler.set_stance(skip_guard_eval_unsafe=True)
        return nullcontext()

    def _bucket(self, n: int) -> int:
        return next(b for b in self.graph_buckets if b >= n)

    def compile(self, whole_step: bool | None = None) -> None:
        """Use ``torch.compile``d layer and sampling functions in this engine (call before
        :meth:`capture_graphs`); other engines in the process keep their own.

        ``whole_step`` also compiles every depth-decoder step whole (four layers with their attention
        and cache writes, the head, sampling and the next step's embedding): one call per step instead
        of ~150 eager ops, and at most four compiles (one or two rows, one or several slots).  The
        default is the whole step on the CPU, where those eager ops are a large share of a frame,
        unless the depth decoder has a fused step (int4 on csmcli's kernel: one call already, and
        faster than the compiled layers), and the layers only on a GPU (``scripts/gpu_variants.py``
        compares both there).  Where the model has a fused depth decoder as well
        (:class:`~csmcli.qkernel.FusedDepth`), CPU frames run no compiled code at all: the compiled
        layers serve only prompts too long for the fused steps.

        On the CPU every projection must be quantized (int8, or int4 on csmcli's kernel operator) or
        kept plain (``cpu_kernels="plain"``, bfloat16 on a CPU without oneDNN's bf16 kernels, or a
        one-slot engine's gemv layers): oneDNN's packed weights are opaque to the compiler.
        """
        from .cpu import check_model_compilable
        from .model import CPU_COMPILE_OPTIONS, compile_layers

        cpu = self.device.type == "cpu"
        if cpu:
            check_model_compilable(self.model)
        options = CPU_COMPILE_OPTIONS if cpu else None
        self.layer_fns = compile_layers(options)
        self.sample_fn = torch.compile(sample, dynamic=True, options=options)
        if (cpu and self.model.decoder.fused_step is None) if whole_step is None else whole_step:
            self.depth_step = torch.compile(self.model.depth_step, dynamic=True, options=options)
        self.compiled = True
        if cpu:  # compile now rather than in the first requests (capture_graphs does this on a GPU)
            self._run_frames()

    @property
    def _least_candidates(self) -> int:
        """How many codes every compiled frame samples among, at least (``graph_top_k``, or all)."""
        return self.graph_top_k or NUM_AUDIO_CODES

    @contextmanager
    def _scratch_frames(self, k_max: int | None) -> Iterator[None]:
        """Frames before any job runs (warm-up, graph capture): they sample among ``k_max`` codes
        with the penalty on and scribble on slot state, which is reset afterwards (recent codes,
        frame counters); every job's prefill and :meth:`SamplingParams.set_row` overwrite the rest."""
        self.frame_positions.zero_()
        self.k_max, self.use_penalty, self.use_top_p, self.use_greedy = k_max, True, True, True
        yield
        self.recent.fill_(-1)
        self.params.frame.zero_()

    @torch.inference_mode()
    def _run_frames(self) -> None:
        """Run a frame for one slot and for several (each compiles its own graphs), before any job."""
        with self.lock, self._scratch_frames(self._least_candidates):
            for n in sorted({1, min(2, self.max_batch)}):
                self._frame(n, 1)

    @torch.inference_mode()
    def capture_graphs(self, eager: bool = False) -> None:
        """Record the whole frame as one CUDA graph per batch bucket (see :mod:`csmcli.graphs`).

        Called once before any job runs (see :meth:`_scratch_frames`).  ``eager`` records stand-ins
        that run each frame eagerly (:func:`csmcli.graphs.eager_frames`), on any device: for testing
        the graph-shaped path without CUDA.
        """
        if self.graphs is not None or (self.device.type != "cuda" and not eager):
            return
        buckets = frame_buckets(self.max_batch)
        capture = eager_frames if eager else capture_frames
        with self._scratch_frames(self.graph_top_k):
            graphs, outputs = capture(lambda b: self._frame(b, self.max_len), buckets)
        self.graph_buckets, self.graph_codes, self.graphs = buckets, outputs, graphs

    def _sampler(self) -> FrameSampler:
        """The frame's sampling, with every slot's random keys for the frame computed once."""
        keys = frame_keys(self.params.seed, self.params.frame, self.codebook_ids)
        recent = self.recent if self.use_penalty else None
        rules = (self.use_top_p, self.use_greedy)
        return FrameSampler(self.sample_fn, self.params, keys, recent, self.k_max, *rules, NUM_AUDIO_CODES)

    def _deliver(self, slot: int, codes: Tensor) -> None:
        job = self.slots[slot]
        try:
            if not bool(codes.any()):
                self._release(slot, "eos")
                return
            job._add_frame(codes, self.codec)
            if job.stats.frames >= job.options.max_frames:
                self._release(slot, "budget")
        except Exception as exc:  # decoding failure ends this job only
            self.slots[slot] = None
            job._fail(exc)

    def _release(self, slot: int, reason: str) -> None:
        job = self.slots[slot]
        self.slots[slot] = None
        job._finish(reason, self.codec)

    def _drop_cancelled(self) -> None:
        for i, job in enumerate(self.slots):
            if job is not None and job.cancelled:
                self._release(i, "cancelled")

    def run_until_done(self, job: Job) -> None:
        """Step until ``job`` has finished (used by synchronous callers)."""
        while not job.done.is_set():
            self.step()


class EngineLoop:
    """Runs :meth:`Engine.step` in a background thread while there is work (for the server).

    Jobs submitted from any thread join the running batch at the next frame; a job's ``sink`` is
    called from the loop thread.  ``alive`` turns False if the loop dies, so health checks can
    tell.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="csm-engine", daemon=True)

    def start(self) -> EngineLoop:
        """Start the loop thread."""
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        """True while the loop thread runs without having failed."""
        return self._thread.is_alive() and self.error is None

    def submit(self, job: Job) -> Job:
        """Queue ``job`` (validated first, so errors raise here) and wake the loop."""
        if not self.alive:
            raise RuntimeError("the generation loop is not running")
        self.engine.submit(job)
        self._wake.set()
        return job

    def stop(self, timeout: float | None = None) -> None:
        """Ask the loop to exit after the current frame and wait for it."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.engine.step():
                    self._wake.wait(0.05)
                    self._wake.clear()
        except BaseException as exc:  # record it for /health, then fail and drop every job in flight
            self.error = exc
            with self.engine.lock:
                jobs = [*self.engine.slots, *self.engine.waiting]
                self.engine.slots = [None] * self.engine.max_batch
                self.engine.waiting.clear()
            for job in jobs:
                if job is not None and not job.done.is_set():
                    job._fail(exc)
