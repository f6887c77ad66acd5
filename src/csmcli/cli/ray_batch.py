"""``csm batch --ray``: the batch's lanes on a Ray cluster, with one progress display for the whole job."""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

from ..batchrun import Dialogue, make_lanes, model_key
from ..cluster import ClusterConfig, ClusterJob, ClusterStatus
from ..dialog import ScriptError
from ..options import FRAME_MS
from .batch import BatchProgress, report_problems, turns

#: Environment variables the workers get from the command's environment (model cache, voices, offline mode).
FORWARDED_ENV = ("CSM_", "HF_")


class ClusterDisplay(BatchProgress):
    """The local batch display, fed by the whole cluster: turns, audio seconds, frames/s, workers alive."""

    frames = 0

    def status(self, status: ClusterStatus) -> None:
        """Refresh the bar from the driver's view of the job."""
        self.frames = status.frames
        if self._bar is None:
            return
        seconds = self.done_seconds + status.in_flight_frames * FRAME_MS / 1000
        info = (
            f"{seconds:.1f} s audio, {status.frames / max(status.elapsed, 1e-6):.1f} frames/s, {status.workers} workers"
        )
        self._bar.update(self._task, completed=self.done, info=info)


def generate_on_ray(
    address: str,
    cpus: int | None,
    dialogues: list[Dialogue],
    chain: int | None,
    batch_size: int,
    quiet: bool,
    model: str,
    **load_args: Any,
) -> None:
    """Generate the pending turns on the cluster at ``address`` with ``model`` loaded by every worker
    (``load_args``: :meth:`Synthesizer.load`'s device, dtype, quantize, compile); the same files and
    manifests as a local run."""
    from ..synthesizer import Synthesizer

    todo = [t for d in dialogues for t in d.todo]
    lanes = make_lanes(dialogues, chain)
    slots = min(batch_size, len(lanes))
    load = functools.partial(Synthesizer.load, model_key(model), max_batch_size=slots, **load_args)
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
    config = ClusterConfig(address, cpus_per_worker=cpus, device=load_args.get("device", "auto"), env=env)
    for d in dialogues:
        d.write_manifest()
    with ClusterDisplay(quiet, len(todo)) as progress:
        try:
            summary = ClusterJob(config, load, slots, progress).run(dialogues, lanes, chain)
        except ScriptError as exc:
            report_problems(exc)
        except KeyboardInterrupt:
            progress.say(
                f"csm: stopped after {progress.done} of {len(todo)} turns; run the same command again to continue"
            )
            raise
    if not quiet:
        kept = sum(len(d.tasks) for d in dialogues) - len(todo)
        lost = f"; workers lost and replaced: {summary.lost}" if summary.lost else ""
        print(
            f"csm: generated {turns(summary.turns)} ({progress.done_seconds:.1f} s of audio) in "
            f"{summary.elapsed:.1f} s on {summary.workers} Ray workers, "
            f"{summary.frames / max(summary.elapsed, 1e-6):.1f} frames/s"
            + (f"; kept {kept} finished earlier" if kept else "")
            + lost,
            file=sys.stderr,
        )
