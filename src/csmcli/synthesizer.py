"""The public entry point: load a checkpoint once, then generate or stream speech."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from . import checkpoint
from .codec import Codec
from .cpu import CpuCaps
from .engine import AudioChunk, EngineLoop, Job, JobStats
from .errors import PromptTooLongError
from .loader import load_parts, make_engine
from .model import CSMModel
from .options import FRAME_MS, GenerationOptions, check_speaker, check_text
from .prompt import Prompt, PromptBuilder, Segment
from .textsplit import split_text
from .utterance import Utterance
from .voices import NO_VOICE, VoiceLibrary

log = logging.getLogger("csmcli")
#: Silence between the pieces of a long text.
PIECE_PAUSE_S = 0.25
#: Encoded voices kept in memory (each holds up to 30 s of audio and its codes).
VOICE_CACHE = 32
T = TypeVar("T")


@dataclass
class Audio:
    """A finished utterance: float32 mono samples plus what produced them."""

    samples: np.ndarray
    sample_rate: int
    codes: Tensor
    seed: int
    stats: JobStats
    pieces: int = 1

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return len(self.samples) / self.sample_rate


class Synthesizer:
    """CSM-1B text-to-speech: ``Synthesizer.load(...)``, then :meth:`generate` or :meth:`stream`."""

    def __init__(
        self,
        model: CSMModel,
        codec: Codec,
        tokenizer,
        device: torch.device,
        dtype: torch.dtype,
        max_batch_size: int = 1,
        source: Path | None = None,
        prompts_dir: Path | None = None,
        compile: bool = False,
        cpu_kernels: str | None = None,
        cpu_caps: CpuCaps | None = None,
        cuda_graphs: bool = True,
        voices_home: Path | None = None,
    ) -> None:
        self.model = model
        self.codec = codec
        self.device = device
        self.dtype = dtype
        self.source = source
        self.prompts = PromptBuilder(tokenizer, codec.encode, model.num_codebooks)
        self.voices = VoiceLibrary(prompts_dir, home=voices_home)
        self._voice_segments: OrderedDict[tuple, Any] = OrderedDict()  # the most recently used last
        self._voice_lock = threading.Lock()
        self.context_encodes = 0  # voices and context clips encoded (cache misses)
        self.context_hits = 0  # ... and found already encoded
        self.engine = make_engine(
            model,
            codec,
            device,
            dtype,
            max_batch_size,
            compile=compile,
            cuda_graphs=cuda_graphs,
            cpu_kernels=cpu_kernels,
            cpu_caps=cpu_caps,
        )

    @property
    def sample_rate(self) -> int:
        """Output sample rate (24 kHz)."""
        return self.codec.sample_rate

    @classmethod
    def load(
        cls,
        model: str = checkpoint.DEFAULT_MODEL,
        *,
        cuda_graphs: bool = True,
        voices_home: Path | None = None,
        **settings: Any,
    ) -> Synthesizer:
        """Load a hub id (through the hub cache) or a local checkpoint directory.

        ``settings`` are :func:`csmcli.loader.load_parts`' keyword parameters, checked there:
        ``device``, ``dtype`` (both ``auto`` by default), ``local_files_only``, ``max_batch_size``,
        ``quantize`` (``int8`` or ``int4``: weight-only quantized projections, see :mod:`csmcli.quant`),
        ``cache_dir`` (where quantized weights are cached, see :mod:`csmcli.quantcache`; None: not
        cached), ``compile`` (runs :meth:`Engine.compile`: on a GPU the layers, on the CPU with
        quantized weights every depth-decoder step whole), ``cpu_kernels`` (``auto``, ``packed``,
        ``plain``), ``cpu_isa`` (``avx512``, ``avx2``, ``default``: the paths a CPU with only that
        instruction set takes), ``threads`` (torch's CPU threads: a number, or ``auto``: the physical
        cores other processes leave free; None keeps torch's setting) and ``mimi`` (where the codec
        comes from when the checkpoint has none).  ``cuda_graphs`` captures each frame as CUDA graphs
        on a GPU.  ``voices_home`` holds the user's voices (default: the platform's data directory).
        """
        parts = load_parts(model, **settings)
        return cls(
            parts.model,
            parts.codec,
            parts.tokenizer,
            parts.device,
            parts.dtype,
            parts.max_batch_size,
            source=parts.path,
            prompts_dir=parts.prompts_dir,
            compile=parts.compile,
            cpu_kernels=parts.cpu_kernels,
            cpu_caps=parts.cpu_caps,
            cuda_graphs=cuda_graphs,
            voices_home=voices_home,
        )

    # -- requests ----------------------------------------------------------------------------

    def prompt(self, text: str, speaker: int = 0, context: Sequence[Segment] = ()) -> Prompt:
        """The prompt rows for ``text`` spoken by ``speaker`` after ``context``."""
        return self.prompts.build(text, speaker, context)

    def job(
        self,
        text: str,
        speaker: int = 0,
        context: Sequence[Segment] = (),
        options: GenerationOptions | None = None,
        first_chunk_frames: int = 1,
        chunk_frames: int = 8,
        sink=None,
    ) -> Job:
        """Build and validate (but do not start) one generation job."""
        options = options or GenerationOptions()
        prompt = self.prompt(text, speaker, context)
        job = Job(prompt, options, first_chunk_frames, chunk_frames, sink)
        self.engine.check_fits(prompt, options)
        return job

    def voice_context(self, speaker: int = 0, voice: str | None = None) -> list[Segment]:
        """Context segments for a voice: ``None`` = the speaker's default preset (if the checkpoint
        has one), ``"none"`` = no context, otherwise a preset or user voice by name.

        A voice is read and encoded once and cached (see :meth:`cached_context`).  That first time
        takes a while and holds no lock of the engine's, so a server runs it in a worker thread while
        the engine keeps generating for everyone else.
        """
        check_speaker(speaker)
        if voice == NO_VOICE:
            return []
        chosen = self.voices.default_for(speaker) if voice is None else self.voices.get(voice)
        if chosen is None:
            return []
        key = ("voice", chosen.name, chosen.audio_path, chosen.stamp, chosen.text, speaker)
        return [self.cached_context(key, lambda: self.context_segment(chosen.text, speaker, chosen.load()))]

    def context_segment(self, text: str, speaker: int, audio: np.ndarray) -> Segment:
        """A context segment for ``audio`` (24 kHz mono) with its Mimi codes computed now; it keeps
        only the codes, which is all a prompt needs."""
        segment = Segment(text, speaker, audio)
        self.prompts.segment_rows(segment)  # checks the text and speaker, encodes the audio
        return Segment(segment.text, speaker, codes=segment.codes)

    def cached_context(self, key: tuple, make: Callable[[], T]) -> T:
        """What ``make()`` returns (an encoded voice or context clip), kept under ``key`` among the
        :data:`VOICE_CACHE` most recently used, so equal context is encoded once and its prompt rows
        are equal too (the engine's prefix cache then skips them as well).

        ``make`` runs without the lock, so a long decode and encode holds up no other request;
        :attr:`context_encodes` and :attr:`context_hits` count misses and hits.
        """
        with self._voice_lock:
            if key in self._voice_segments:
                self._voice_segments.move_to_end(key)
                self.context_hits += 1
                return self._voice_segments[key]
        value = make()
        with self._voice_lock:
            self._voice_segments[key] = value
            self.context_encodes += 1
            while len(self._voice_segments) > VOICE_CACHE:
                self._voice_segments.popitem(last=False)
        return value

    def utterance(
        self,
        text: str,
        speaker: int = 0,
        *,
        voice: str | None = None,
        context: Sequence[Segment] | None = None,
        history: Sequence[Segment] = (),
        options: GenerationOptions | None = None,
        first_chunk_frames: int = 1,
        chunk_frames: int = 8,
        sink=None,
        pause_s: float = PIECE_PAUSE_S,
    ) -> Utterance:
        """One request for text of any length, spoken piece by piece (see :class:`Utterance`).

        Each piece hears the voice (or ``context``), then ``history`` (earlier utterances, e.g. a
        :class:`History`'s segments), then the pieces before it.  ``options.max_audio_ms`` limits
        the whole request.  Safe to call while a background loop steps the engine.
        """
        options = options or GenerationOptions()
        check_text(text)
        check_speaker(speaker)
        base = list(context) if context is not None else self.voice_context(speaker, voice)
        return Utterance(
            self,
            split_text(text),
            speaker,
            base,
            list(history),
            options,
            (first_chunk_frames, chunk_frames),
            sink,
            pause_s,
        )

    def jobs(self, text: str, speaker: int = 0, **request: Any) -> Iterator[Job]:
        """The jobs of :meth:`utterance` (same arguments), one piece at a time; each must have finished
        before the next is asked for (:meth:`Utterance.next_job` raises otherwise)."""
        utterance = self.utterance(text, speaker, **request)
        job = utterance.next_job()
        while job is not None:
            yield job
            job = utterance.next_job(job)

    def fit_context(
        self,
        text: str,
        speaker: int,
        base: Sequence[Segment],
        history: Sequence[Segment],
        options: GenerationOptions,
    ) -> tuple[Prompt, GenerationOptions]:
        """The prompt for ``text`` after ``base`` (voices) and ``history`` (earlier utterances), and the
        options, such that the prompt plus the frame budget fit the model.

        What does not fit is dropped with a warning, never an error: the oldest history first, then
        the oldest base segment; text alone too long for the budget gets a smaller budget.
        """
        history, base = list(history), list(base)
        while True:
            prompt = self.prompt(text, speaker, [*base, *history])
            room = self.engine.max_len - len(prompt)
            if room >= options.max_frames:
                return prompt, options
            if history or base:
                dropped = (history or base).pop(0)
                log.warning(
                    "context too long for the model: dropping the oldest segment (%r); lower max_audio_ms to keep more",
                    dropped.text[:40],
                )
                continue
            if room < 1:
                raise PromptTooLongError("this piece of text alone fills the model's context")
            log.warning(
                "max_audio_ms=%d does not fit after the prompt: using %d ms", options.max_audio_ms, room * FRAME_MS
            )
            options = options.replace(max_audio_ms=room * FRAME_MS)

    def stream(
        self,
        text: str,
        speaker: int = 0,
        context: Sequence[Segment] | None = None,
        options: GenerationOptions | None = None,
        *,
        voice: str | None = None,
        first_chunk_frames: int = 1,
        chunk_frames: int = 8,
    ) -> Iterator[AudioChunk]:
        """Yield audio chunks as frames are generated (the first after ``first_chunk_frames``).

        Long text is spoken piece by piece with short pauses.  Concatenated, the chunks carry the
        same codes as :meth:`generate` and the same audio up to float rounding (the decoder runs in
        smaller pieces).  Closing the iterator early cancels the generation.
        """
        utterance = self.utterance(
            text,
            speaker,
            voice=voice,
            context=context,
            options=options,
            first_chunk_frames=first_chunk_frames,
            chunk_frames=chunk_frames,
        )
        yield from utterance.chunks()

    def stream_job(self, job: Job) -> Iterator[AudioChunk]:
        """Step the engine for ``job`` in this thread, yielding its chunks as they come; closing the
        iterator early cancels the job."""
        self.engine.submit(job)
        try:
            while True:
                yield from job.pop_chunks()
                if job.done.is_set():
                    yield from job.pop_chunks()
                    break
                self.engine.step()
            if job.error is not None:
                raise job.error
        finally:
            if not job.done.is_set():
                job.cancel()
                self.engine.step()

    def generate(
        self,
        text: str,
        speaker: int = 0,
        context: Sequence[Segment] | None = None,
        options: GenerationOptions | None = None,
        *,
        voice: str | None = None,
    ) -> Audio:
        """Synthesize ``text`` completely and return the audio."""
        utterance = self.utterance(
            text, speaker, voice=voice, context=context, options=options, first_chunk_frames=8, chunk_frames=32
        )
        samples = [c.samples for c in utterance.chunks()]
        return _result(utterance.jobs, samples, self.sample_rate)

    def generate_many(self, jobs: Sequence[Job]) -> list[Audio]:
        """Run independent jobs batched (up to ``max_batch_size`` at once) and return their audio."""
        for job in jobs:
            self.engine.submit(job)
        while not all(j.done.is_set() for j in jobs):
            self.engine.step()
        out = []
        for job in jobs:
            if job.error is not None:
                raise job.error
            out.append(_result([job], [c.samples for c in job.pop_chunks()], self.sample_rate))
        return out

    # -- the engine, for schedulers, servers and benchmarks ---------------------------------------

    def submit(self, job: Job) -> Job:
        """Queue ``job`` (checked first: errors raise here); it starts at a later :meth:`step`."""
        return self.engine.submit(job)

    def step(self) -> bool:
        """Start waiting jobs in free slots, then generate one frame for every running job; False when idle."""
        return self.engine.step()

    def admit(self) -> int:
        """Start waiting jobs in free slots (prefill their prompts) without generating a frame; how many started."""
        return self.engine.admit()

    def clear_prefix_cache(self) -> None:
        """Forget the cached context prefixes (the next prompt with a voice computes its prefix again)."""
        self.engine.clear_prefix_cache()

    def background_loop(self) -> EngineLoop:
        """A thread (not yet started) that steps the engine while jobs are waiting or running (for servers)."""
        return EngineLoop(self.engine)

    @property
    def capacity(self) -> int:
        """How many jobs generate at once (``max_batch_size``)."""
        return self.engine.max_batch

    def stats(self) -> dict[str, int]:
        """What the engine is doing now: jobs ``active`` (in a slot), ``waiting``, and ``max_batch_size``."""
        return self.engine.stats()


def _result(jobs: list[Job], samples: list[np.ndarray], sample_rate: int) -> Audio:
    """One Audio from the pieces of an utterance (codes concatenated, stats summed)."""
    audio = np.concatenate(samples) if samples else np.zeros(0, dtype=np.float32)
    first, last = jobs[0].stats, jobs[-1].stats
    stats = JobStats(
        prompt_rows=first.prompt_rows,
        prefix_cached=first.prefix_cached,
        frames=sum(j.stats.frames for j in jobs),
        stop_reason=last.stop_reason,
        submitted_at=first.submitted_at,
        started_at=first.started_at,
        first_audio_at=first.first_audio_at,
        finished_at=last.finished_at,
    )
    codes = torch.cat([j.all_codes() for j in jobs])
    return Audio(audio.astype(np.float32, copy=False), sample_rate, codes, jobs[0].seed, stats, len(jobs))
