"""The public entry point: load a checkpoint once, then generate or stream speech."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import checkpoint
from .codec import Codec
from .cpu import CpuCaps
from .engine import AudioChunk, Job, JobStats
from .errors import PromptTooLongError
from .loader import load_parts, make_engine
from .model import CSMModel
from .options import FRAME_MS, GenerationOptions
from .prompt import Prompt, PromptBuilder, Segment, check_speaker, check_text
from .textsplit import split_text
from .voices import NO_VOICE, VoiceLibrary

log = logging.getLogger("csmcli")
#: Silence between the pieces of a long text.
PIECE_PAUSE_S = 0.25
#: How many earlier pieces of a long text condition the next one.
HISTORY_PIECES = 2


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
        device: torch.device,  # noqa: ANN001
        dtype: torch.dtype,
        max_batch_size: int = 1,
        source: Path | None = None,
        prompts_dir: Path | None = None,
        compile: bool = False,
        cpu_kernels: str | None = None,
        cpu_caps: CpuCaps | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        self.model = model
        self.codec = codec
        self.device = device
        self.dtype = dtype
        self.source = source
        self.prompts = PromptBuilder(tokenizer, codec.encode, model.num_codebooks)
        self.voices = VoiceLibrary(prompts_dir)
        self._voice_segments: dict[tuple, Segment] = {}
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
        device: str = "auto",
        dtype: str = "auto",
        local_files_only: bool = False,
        max_batch_size: int = 1,
        quantize: str = "none",
        compile: bool = False,
        cpu_kernels: str | None = None,
        cpu_isa: str | None = None,
        cuda_graphs: bool = True,
        mimi: str = checkpoint.MIMI_MODEL,
    ) -> Synthesizer:
        """Load a hub id (through the hub cache) or a local checkpoint directory (see :mod:`csmcli.loader`).

        ``quantize="int8"`` stores the projections as weight-only int8 (see :mod:`csmcli.quant`).
        ``compile`` runs :meth:`Engine.compile` before returning: on a GPU the layers, on the CPU
        (int8 weights) every depth-decoder step whole.  ``cpu_kernels`` (``auto``, ``packed``,
        ``plain``) picks the CPU matrix kernels, ``cpu_isa`` (``avx512``, ``avx2``, ``default``) runs
        the paths a CPU with only that instruction set takes (default: what this CPU offers; see
        :func:`csmcli.cpu.cpu_caps`).  ``cuda_graphs`` captures each frame as CUDA graphs on a GPU;
        ``mimi`` is where the codec comes from when the checkpoint has none.
        """
        parts = load_parts(
            model,
            device=device,
            dtype=dtype,
            local_files_only=local_files_only,
            max_batch_size=max_batch_size,
            quantize=quantize,
            compile=compile,
            cpu_kernels=cpu_kernels,
            cpu_isa=cpu_isa,
            mimi=mimi,
        )
        return cls(
            parts.model,
            parts.codec,
            parts.tokenizer,
            parts.device,
            parts.dtype,
            max_batch_size,
            source=parts.path,
            prompts_dir=parts.prompts_dir,
            compile=compile,
            cpu_kernels=cpu_kernels,
            cpu_caps=parts.cpu_caps,
            cuda_graphs=cuda_graphs,
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
    ) -> Job:  # noqa: ANN001
        """Build and validate (but do not start) one generation job."""
        options = options or GenerationOptions()
        prompt = self.prompt(text, speaker, context)
        job = Job(prompt, options, first_chunk_frames, chunk_frames, sink)
        self.engine.check_fits(prompt, options)
        return job

    def voice_context(self, speaker: int = 0, voice: str | None = None) -> list[Segment]:
        """Context segments for a voice: ``None`` = the speaker's default preset (if the checkpoint
        has one), ``"none"`` = no context, otherwise a preset or user voice by name."""
        check_speaker(speaker)
        if voice == NO_VOICE:
            return []
        chosen = self.voices.default_for(speaker) if voice is None else self.voices.get(voice)
        if chosen is None:
            return []
        key = (chosen.name, chosen.audio_path, speaker)
        if key not in self._voice_segments:
            segment = Segment(chosen.text, speaker, chosen.load())
            self.prompts.segment_rows(segment)  # encode once; the codes stay on the segment
            self._voice_segments[key] = segment
        return [self._voice_segments[key]]

    def jobs(
        self,
        text: str,
        speaker: int = 0,
        *,
        voice: str | None = None,
        context: Sequence[Segment] | None = None,
        options: GenerationOptions | None = None,
        first_chunk_frames: int = 1,
        chunk_frames: int = 8,
        sink=None,  # noqa: ANN001
        pause_s: float = PIECE_PAUSE_S,
    ) -> Iterator[Job]:
        """Jobs for text of any length, one piece at a time.

        The text is split at sentence (then clause, then word) boundaries; each piece is
        conditioned on the voice (or ``context``) and the pieces before it.  Run each job to
        completion before asking for the next: the next piece's context is built from its codes.
        Context that does not fit is dropped oldest first with a warning, never an error.
        """
        options = options or GenerationOptions()
        check_text(text)
        check_speaker(speaker)
        base = list(context) if context is not None else self.voice_context(speaker, voice)
        history: list[Segment] = []
        for k, piece in enumerate(split_text(text)):
            piece_options = (
                options if options.seed is None or k == 0 else options.replace(seed=(options.seed + k) % 2**32)
            )
            job = self._fitting_job(
                piece, speaker, base, history[-HISTORY_PIECES:], piece_options, first_chunk_frames, chunk_frames, sink
            )
            if k:
                job.lead_samples = round(pause_s * self.sample_rate)
            yield job
            if job.stats.stop_reason in ("cancelled", "error", ""):
                return
            history.append(Segment(piece, speaker, codes=job.all_codes()))

    def _fitting_job(
        self,
        text: str,
        speaker: int,
        base: list[Segment],
        history: list[Segment],
        options: GenerationOptions,
        first_chunk_frames: int,
        chunk_frames: int,
        sink,
    ) -> Job:  # noqa: ANN001
        history, base = list(history), list(base)
        while True:
            prompt = self.prompt(text, speaker, [*base, *history])
            room = self.engine.max_len - len(prompt)
            if room >= options.max_frames:
                break
            if history or base:
                dropped = (history or base).pop(0)
                log.warning("context too long for the model: dropping the oldest segment (%r)", dropped.text[:40])
                continue
            if room < 1:
                raise PromptTooLongError("this piece of text alone fills the model's context")
            log.warning(
                "max_audio_ms=%d does not fit after the prompt: using %d ms", options.max_audio_ms, room * FRAME_MS
            )
            options = options.replace(max_audio_ms=room * FRAME_MS)
        return Job(prompt, options, first_chunk_frames, chunk_frames, sink)

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
        for job in self.jobs(
            text,
            speaker,
            voice=voice,
            context=context,
            options=options,
            first_chunk_frames=first_chunk_frames,
            chunk_frames=chunk_frames,
        ):
            yield from self.run(job)

    def run(self, job: Job) -> Iterator[AudioChunk]:
        """Drive the engine for ``job`` in this thread, yielding its chunks as they come."""
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
        samples, jobs = [], []
        for job in self.jobs(
            text, speaker, voice=voice, context=context, options=options, first_chunk_frames=8, chunk_frames=32
        ):
            jobs.append(job)
            samples += [c.samples for c in self.run(job)]
        return _result(jobs, samples, self.sample_rate)

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
