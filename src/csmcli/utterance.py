"""Requests of any length: one job per piece of text, and earlier utterances kept as context."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from .engine import AudioChunk, Job
from .errors import OptionsError
from .options import FRAME_MS, GenerationOptions
from .prompt import Segment

if TYPE_CHECKING:
    from .synthesizer import Synthesizer

#: How many earlier pieces of a long text condition the next one.
HISTORY_PIECES = 2


class History:
    """Finished utterances as context for the next one: each becomes a :class:`Segment` (text, speaker,
    and its codes, or audio encoded when first used); only the newest ``keep`` are kept."""

    def __init__(self, keep: int) -> None:
        if keep < 0:
            raise OptionsError(f"history length must be 0 or more, got {keep}")
        self.keep = keep
        self.segments: list[Segment] = []

    def add(self, text: str, speaker: int, codes: Tensor | None = None, audio: np.ndarray | None = None) -> None:
        """Remember what ``speaker`` said as ``codes`` (``[frames, 32]``) or ``audio`` (24 kHz float32)."""
        self.segments.append(Segment(text, speaker, audio=audio, codes=codes))
        del self.segments[: max(0, len(self.segments) - self.keep)]


@dataclass(eq=False, repr=False)
class Utterance:
    """One request's jobs: its text split at sentence (then clause, then word) boundaries, one job
    per piece, each conditioned on the context and the pieces before it.

    Ask for jobs with :meth:`next_job`, handing back the job it gave last once that has finished
    (the next piece hears its codes).  ``options.max_audio_ms`` limits the request as a whole: each
    piece gets what the pieces before it left, and none starts once it is spent.
    """

    synth: Synthesizer
    pieces: list[str]
    speaker: int
    base: list[Segment]
    history: list[Segment]
    options: GenerationOptions
    chunking: tuple[int, int]
    sink: Any
    pause_s: float
    jobs: list[Job] = field(default_factory=list, init=False)
    said: History = field(default_factory=lambda: History(HISTORY_PIECES), init=False)

    @property
    def frames(self) -> int:
        """Frames generated so far, all pieces."""
        return sum(j.stats.frames for j in self.jobs)

    @property
    def stop_reason(self) -> str:
        """Why the last job stopped (``eos``, ``budget``, ``cancelled``, ``error``; empty while running)."""
        return self.jobs[-1].stats.stop_reason if self.jobs else ""

    def codes(self) -> Tensor:
        """Every generated frame, all pieces, ``[frames, 32]``."""
        return torch.cat([j.all_codes() for j in self.jobs]) if self.jobs else torch.zeros(0, 32, dtype=torch.long)

    def next_job(self, finished: Job | None = None) -> Job | None:
        """The next piece's job (not submitted), or None when the request is done.

        ``finished`` is the job this method returned last (None on the first call); it must have
        finished.  A cancelled or failed piece ends the request.
        """
        last = self.jobs[-1] if self.jobs else None
        if finished is not last:
            raise ValueError("next_job takes the job it returned last (None on the first call)")
        with self.synth.engine.lock:  # the engine thread finishes jobs under this lock
            if last is not None:
                if not last.done.is_set():
                    raise RuntimeError("the previous piece has not finished: run it to the end first")
                if last.stats.stop_reason in ("cancelled", "error"):
                    return None
                self.said.add(self.pieces[len(self.jobs) - 1], self.speaker, codes=last.all_codes())
            left = self.options.max_frames - self.frames
            if len(self.jobs) == len(self.pieces) or left < 1:
                return None
            return self._job(len(self.jobs), left)

    def _job(self, k: int, frames_left: int) -> Job:
        options = self.options
        if options.seed is not None and k:
            options = options.replace(seed=(options.seed + k) % 2**32)
        if frames_left < options.max_frames:
            options = options.replace(max_audio_ms=frames_left * FRAME_MS)
        history = [*self.history, *self.said.segments]
        prompt, options = self.synth.fit_context(self.pieces[k], self.speaker, self.base, history, options)
        job = Job(prompt, options, *self.chunking, self.sink)
        if k:
            job.lead_samples = round(self.pause_s * self.synth.sample_rate)
        self.jobs.append(job)
        return job

    def chunks(self) -> Iterator[AudioChunk]:
        """Generate every piece in this thread, yielding chunks as they come (closing cancels)."""
        job = self.next_job()
        while job is not None:
            yield from self.synth.stream_job(job)
            job = self.next_job(job)
