"""``csm batch --ray``: the batch's lanes on a Ray cluster, with one progress display for the whole job."""

from __future__ import annotations

import dataclasses
import functools
import os
import sys

from ..batchrun import Dialogue, make_lanes, model_key
from ..cluster import ClusterConfig, ClusterJob, ClusterStatus
from ..dialog import ScriptError
from ..options import FRAME_MS, format_rtf
from .batch import BatchProgress, report_problems, turns
from .common import ModelFlags

#: Environment variables the workers get from the command's environment (model cache, voices, offline mode).
FORWARDED_ENV = ("CSM_", "HF_")


class ClusterDisplay(BatchProgress):
    """The local batch display, fed by the whole cluster: turns, audio seconds, frames/s, workers alive."""

    def status(self, status: ClusterStatus) -> None:
        """Refresh the bar from the driver's view of the job."""
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
    loader: ModelFlags,
) -> None:
    """Generate the pending turns on the cluster at ``address``, every worker loading the model as
    ``loader`` says; the same files and manifests as a local run."""
    todo = [t for d in dialogues for t in d.todo]
    lanes = make_lanes(dialogues, chain)
    slots = min(batch_size, len(lanes))
    # a local checkpoint folder by its absolute path: the workers do not share this working folder
    load = functools.partial(dataclasses.replace(loader, model=model_key(loader.model)).load, False, slots)
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
    config = ClusterConfig(address, cpus_per_worker=cpus, device=loader.device, env=env)
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
            f"{format_rtf(summary.elapsed, progress.done_seconds)}, "
            f"{summary.frames / max(summary.elapsed, 1e-6):.1f} frames/s"
            + (f"; kept {kept} finished earlier" if kept else "")
            + lost,
            file=sys.stderr,
        )
