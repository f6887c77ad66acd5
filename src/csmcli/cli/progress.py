"""Progress on stderr while generating: frames, seconds of audio, real-time factor."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from types import TracebackType

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ..options import format_rtf


class GenerationProgress:
    """A rich live line, or nothing when disabled (``-q`` or stderr not a terminal)."""

    def __init__(self, enabled: bool, label: str = "generating") -> None:
        self.enabled = enabled
        self.label = label
        self.started = time.perf_counter()
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> GenerationProgress:
        if self.enabled:
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=None)
        return self

    def update(self, frames: int, audio_seconds: float, label: str | None = None) -> None:
        """Show the frame count, audio length and speed so far."""
        if self._progress is None:
            return
        speed = format_rtf(time.perf_counter() - self.started, audio_seconds)
        self._progress.update(
            self._task, description=f"{label or self.label}: {frames} frames, {audio_seconds:.1f} s audio, {speed}"
        )

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()


def status(enabled: bool, message: str) -> AbstractContextManager:
    """A spinner with a message on stderr (or a no-op context)."""
    if not enabled:
        return nullcontext()
    return Console(stderr=True).status(message)
