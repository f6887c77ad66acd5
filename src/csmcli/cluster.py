"""Ray workers for ``csm batch --ray``: the lanes of a local run, spread over a cluster.

The driver plans the work as a local run does and alone writes the manifests; each worker (a Ray
actor holding one Synthesizer on a GPU, or on a few CPU cores) runs the lanes it is given with
continuous batching and writes their codes and audio files into the shared output folders.  A lane
is one script's pending turns with context (they depend on each other, so they stay on one worker)
or a single independent turn.  A worker that dies loses only its turns in flight: its lanes go
back to the queue without the turns it reported and resume from the codes files, as a rerun does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .batchrun import Dialogue, Lane, Task, TurnInFlight, check_voices, remove_stale_temps, run_lanes
from .dialog import ScriptError
from .errors import CsmError, InputError

if TYPE_CHECKING:
    from .synthesizer import Synthesizer

#: The extra that installs Ray.
EXTRA = "csmcli[ray]"
#: CPU cores per worker on a cluster without GPUs (fewer when a node has fewer).
DEFAULT_WORKER_CPUS = 4
#: How long one poll of a worker waits for news, in seconds (and the driver for a poll).
POLL_S = 0.5
#: Workers' actor names start with this, then the worker's number (as the dashboard shows them).
WORKER_NAME = "csm-worker"
#: Workers leave files named so in the output folders to show that the driver sees what they write.
PROBE = ".csm-probe-"
#: Replacement workers started for dead ones, per worker of the job.
RESTARTS_PER_WORKER = 2


def import_ray():
    """The ``ray`` module, or a one-line error naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise InputError(f'--ray needs Ray: pip install "{EXTRA}"') from None
    return ray


def check_address(address: str) -> str:
    """``auto``, ``local``, ``ray://host:port`` or a cluster's ``host:port``; anything else is an error."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if address in ("auto", "local") or (host and port.isdigit()):
        return address
    raise InputError(f"--ray: expected auto, local, ray://HOST:PORT or HOST:PORT, got {address!r}")


@dataclass(frozen=True)
class ClusterConfig:
    """Where the cluster is (``address``, see :func:`check_address`) and its workers: one per GPU
    unless ``device`` is ``cpu``, else one per ``cpus_per_worker`` cores; at most ``max_workers``;
    ``env``: environment variables every worker gets."""

    address: str = "auto"
    cpus_per_worker: int | None = None
    max_workers: int | None = None
    device: str = "auto"
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class ClusterStatus:
    """The job as the progress display sees it."""

    workers: int
    frames: int
    in_flight_frames: int
    elapsed: float


@dataclass
class ClusterSummary:
    """What a finished job did."""

    turns: int
    frames: int
    elapsed: float
    workers: int
    lost: int


class ClusterProgress(Protocol):
    """What the job reports to its front end, from the driver's thread."""

    def turn_done(self, dialogue: Dialogue, task: Task, seconds: float, stop: str) -> None: ...

    def status(self, status: ClusterStatus) -> None: ...

    def say(self, message: str) -> None: ...


# -- the worker ---------------------------------------------------------------------------------


@dataclass
class TurnDone:
    """A turn's files are written; ``record`` is its manifest entry for the dialogue in ``folder``."""

    folder: str
    record: dict[str, Any]
    seconds: float
    stop: str


@dataclass
class Failed:
    """The worker stopped on an error, which stops the job."""

    message: str


class QuietDialogue(Dialogue):
    """A worker's copy of a dialogue: absolute paths, and no manifest (the driver, which hears of every
    turn, writes it)."""

    @classmethod
    def of(cls, dialogue: Dialogue) -> QuietDialogue:
        """The copy sent to workers, whose working folder is not the driver's."""
        d = dialogue
        return cls(d.script, d.out_dir.resolve(), d.combined.resolve(), d.tasks, todo=list(d.todo))

    def write_manifest(self) -> None:
        """Nothing: the manifest is the driver's."""


class Worker:
    """One model; runs the lanes it is given side by side in its engine batch (the Ray actor).

    :func:`run_lanes` drains the worker's queue of lanes, which :meth:`add` fills from the actor's
    other threads, so a lane joins the batch as soon as another one leaves it.
    """

    def __init__(self, load: Callable[[], Synthesizer], slots: int) -> None:
        self.load = load
        self.slots = slots
        self.synth: Synthesizer | None = None
        self.waiting: deque[Lane] = deque()
        self.events: list[TurnDone | Failed] = []
        self.news = threading.Condition()
        self.frames = 0
        self.in_flight = 0

    def start(self, folders: list[str], token: str, dialogues: list[Dialogue]) -> dict[str, Any]:
        """Leave a probe file in every output folder, load the model and check the scripts' voices."""
        node = socket.gethostname()
        try:
            for folder in folders:
                (Path(folder) / f"{PROBE}{token}").write_text(node)
        except OSError as exc:
            return {"node": node, "error": f"a worker on {node} cannot write to {folder}: {exc.strerror or exc}"}
        try:
            self.synth = self.load()
            check_voices(self.synth, dialogues)
        except ScriptError as exc:
            return {"node": node, "problems": exc.problems}
        except CsmError as exc:
            return {"node": node, "error": f"worker on {node}: {exc}"}
        threading.Thread(target=self.loop, name="csm-worker", daemon=True).start()
        return {"node": node, "device": str(self.synth.device)}

    def add(self, dialogue: Dialogue, tasks: list[Task], chain: int | None) -> None:
        """Queue a lane: ``tasks`` of ``dialogue`` in order (with context when ``chain`` is not None)."""
        with self.news:
            self.waiting.append(Lane(dialogue, tasks, chain))
            self.news.notify_all()

    def poll(self, timeout: float) -> tuple[list[TurnDone | Failed], int, int]:
        """The news since the last poll (waiting up to ``timeout`` for some), frames done and in flight."""
        with self.news:
            if not self.events:
                self.news.wait(timeout)
            events, self.events = self.events, []
        return events, self.frames, self.in_flight

    def emit(self, event: TurnDone | Failed) -> None:
        """Queue news for the driver's next poll."""
        with self.news:
            self.events.append(event)
            self.news.notify_all()

    def turn_done(self, dialogue: Dialogue, task: Task, seconds: float, stop: str) -> None:
        """A turn's files are written: tell the driver, with its manifest entry."""
        record = dialogue.records[task.turn.number]
        self.frames += record["frames"]
        self.emit(TurnDone(str(dialogue.out_dir), record, seconds, stop))

    def stepped(self, active: list[TurnInFlight]) -> None:
        """Count the frames of the turns in flight, for the driver's display."""
        self.in_flight = sum(t.frames for t in active)

    def loop(self) -> None:
        """Run lanes as they come, until the actor is killed or an error stops it."""
        try:
            while True:
                with self.news:
                    while not self.waiting:
                        self.news.wait()
                run_lanes(self.synth, self.waiting, self.slots, self.turn_done, self.stepped)
                self.in_flight = 0
        except CsmError as exc:
            self.emit(Failed(str(exc)))
        except Exception as exc:  # reported to the driver, which stops the job
            self.emit(Failed(f"worker on {socket.gethostname()} failed: {type(exc).__name__}: {exc}"))


# -- the driver ---------------------------------------------------------------------------------


@dataclass
class LaneWork:
    """A lane as the driver tracks it: the turns not reported yet are what a new worker gets."""

    id: int
    dialogue: Dialogue
    tasks: list[Task]

    def remaining(self) -> list[Task]:
        """The lane's turns without a manifest entry from this run."""
        return [t for t in self.tasks if t.turn.number not in self.dialogue.records]


@dataclass
class WorkerState:
    """A worker's actor, the lanes it holds and its last poll."""

    index: int
    actor: Any
    ref: Any
    ready: bool = False
    node: str = ""
    lanes: set[int] = field(default_factory=set)
    frames: int = 0
    in_flight: int = 0


def connect(address: str) -> bool:
    """Join (``auto``, ``host:port``, ``ray://``) or start (``local``) a cluster; False when already joined."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise InputError(f"--ray {address}: cannot reach the Ray cluster: {exc}") from None
    return True


def worker_shape(ray: Any, config: ClusterConfig) -> tuple[int, dict[str, float]]:
    """How many workers fit the cluster and each one's resources: a GPU each, else some CPU cores."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus and config.device != "cpu":
        return gpus, {"num_gpus": 1, "num_cpus": 1}
    if config.device not in ("auto", "cpu"):
        raise InputError(f"--device {config.device}: the Ray cluster has no GPUs")
    cores = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    per = config.cpus_per_worker or min(DEFAULT_WORKER_CPUS, max(cores, default=1))
    count = sum(c // per for c in cores)
    if not count:
        raise InputError(f"no node of the Ray cluster has {per} CPU cores for a worker; ask for fewer")
    return count, {"num_cpus": per}


class ClusterJob:
    """Generate planned lanes on a Ray cluster; files and manifests as a local run writes them."""

    def __init__(
        self, config: ClusterConfig, load: Callable[[], Synthesizer], slots: int, progress: ClusterProgress
    ) -> None:
        self.config = config
        self.load = load
        self.slots = slots
        self.progress = progress
        self.workers: dict[Any, WorkerState] = {}
        self.started = 0
        self.lost = 0
        self.dead_frames = 0
        self.count = 0

    def run(self, dialogues: list[Dialogue], lanes: list[Lane], chain: int | None) -> ClusterSummary:
        """Run every lane (of :func:`make_lanes`) to the end, or raise; Ray is started for the job only
        when the address is ``local``."""
        ray = import_ray()
        self.dialogues, self.token, self.chain = dialogues, uuid.uuid4().hex, chain
        self.copies = {id(d): QuietDialogue.of(d) for d in dialogues}
        self.work = {i: LaneWork(i, lane.dialogue, list(lane.tasks)) for i, lane in enumerate(lanes)}
        self.lane_of = {
            (str(self.copies[id(w.dialogue)].out_dir), t.turn.number): w for w in self.work.values() for t in w.tasks
        }
        self.queue = deque(self.work.values())
        self.remove_probes("")  # left by a run that was stopped while its workers started
        owned = connect(self.config.address)
        clock = time.perf_counter()
        try:
            count, shape = worker_shape(ray, self.config)
            self.count = min(count, len(lanes), self.config.max_workers or count)
            self.actor_class = ray.remote(Worker)
            self.actor_options = {"max_concurrency": 4, "runtime_env": {"env_vars": self.config.env}, **shape}
            for _ in range(self.count):
                self.spawn()
            done = self.drive(ray, clock)
        finally:
            for state in self.workers.values():
                with contextlib.suppress(Exception):
                    ray.kill(state.actor)
            self.remove_probes(self.token)
            if owned:
                ray.shutdown()
        return ClusterSummary(done, self.total_frames(), time.perf_counter() - clock, self.count, self.lost)

    def spawn(self) -> None:
        """Start a worker: it loads the model, probes the output folders and checks the voices."""
        copies = list(self.copies.values())
        folders = sorted({str(d.out_dir) for d in copies})
        name = f"{WORKER_NAME}-{self.started}-{self.token[:8]}"
        actor = self.actor_class.options(name=name, **self.actor_options).remote(self.load, self.slots)
        ref = actor.start.remote(folders, f"{self.token}-{self.started}", copies)
        self.workers[ref] = WorkerState(self.started, actor, ref)
        self.started += 1

    def drive(self, ray: Any, clock: float) -> int:
        """Hand out lanes and collect news until every lane is done; the number of turns generated."""
        done = 0
        while self.queue or any(w.lanes for w in self.workers.values()):
            if not self.workers:
                raise CsmError("every Ray worker died; run the same command again to continue")
            self.dispatch()
            ready, _ = ray.wait(list(self.workers), num_returns=1, timeout=POLL_S)
            for ref in ready:
                state = self.workers.pop(ref)
                try:
                    reply = ray.get(ref)
                except ray.exceptions.RayActorError:
                    self.bury(state)
                    continue
                done += self.handle(state, reply)
                state.ref = state.actor.poll.remote(POLL_S)
                self.workers[state.ref] = state
            self.progress.status(
                ClusterStatus(
                    sum(w.ready for w in self.workers.values()),
                    self.total_frames(),
                    sum(w.in_flight for w in self.workers.values()),
                    time.perf_counter() - clock,
                )
            )
        return done

    def handle(self, state: WorkerState, reply: Any) -> int:
        """Act on a worker's answer (its start report, or a poll); the number of turns it finished."""
        if not state.ready:
            self.started_worker(state, reply)
            return 0
        events, state.frames, state.in_flight = reply
        finished = 0
        for event in events:
            if isinstance(event, Failed):
                raise CsmError(event.message)
            work = self.lane_of[event.folder, event.record["turn"]]
            task = next(t for t in work.tasks if t.turn.number == event.record["turn"])
            work.dialogue.records[task.turn.number] = event.record
            work.dialogue.write_manifest()
            if not work.remaining():
                state.lanes.discard(work.id)
            self.progress.turn_done(work.dialogue, task, event.seconds, event.stop)
            finished += 1
        return finished

    def started_worker(self, state: WorkerState, report: dict[str, Any]) -> None:
        """Check a new worker's start report: its errors stop the job; the probes prove shared storage."""
        probes = {d.out_dir: d.out_dir / f"{PROBE}{self.token}-{state.index}" for d in self.dialogues}
        unseen = [folder for folder, probe in probes.items() if not probe.is_file()]
        for probe in probes.values():
            probe.unlink(missing_ok=True)
        if "problems" in report:
            raise ScriptError(report["problems"])
        if "error" in report:
            raise InputError(report["error"])
        if unseen:
            raise InputError(
                f"{unseen[0]} is not shared with the worker on {report['node']}: put the output folder on "
                "storage that every node mounts at the same path"
            )
        state.ready, state.node = True, report["node"]

    def dispatch(self) -> None:
        """Give queued lanes to the ready workers holding the fewest: each its share of the unfinished
        lanes (so the first worker up does not take them all), and at most one beyond its batch."""
        while self.queue:
            outstanding = len(self.queue) + sum(len(w.lanes) for w in self.workers.values())
            cap = min(self.slots + 1, -(-outstanding // len(self.workers)))
            ready = [w for w in self.workers.values() if w.ready and len(w.lanes) < cap]
            if not ready:
                return
            state = min(ready, key=lambda w: (len(w.lanes), w.index))
            work = self.queue.popleft()
            tasks = work.remaining()
            if tasks:
                state.actor.add.remote(self.copies[id(work.dialogue)], tasks, self.chain)
                state.lanes.add(work.id)

    def bury(self, state: WorkerState) -> None:
        """A worker died: its lanes go back to the front of the queue and a replacement starts."""
        self.lost += 1
        self.dead_frames += state.frames
        for lane in sorted(state.lanes, reverse=True):
            work = self.work[lane]
            remove_stale_temps(dataclasses.replace(work.dialogue, tasks=work.remaining()))
            self.queue.appendleft(work)
        where = f" on {state.node}" if state.node else ""
        kind = "turns" if self.chain is None else "scripts"
        self.progress.say(f"csm: worker {state.index}{where} died; its {len(state.lanes)} unfinished {kind} start over")
        if self.lost <= RESTARTS_PER_WORKER * self.count:
            self.spawn()

    def remove_probes(self, token: str) -> None:
        """Delete the workers' probe files of the job with ``token`` (every job's for ``""``)."""
        for d in self.dialogues:
            for probe in d.out_dir.glob(f"{PROBE}{token}*"):
                probe.unlink(missing_ok=True)

    def total_frames(self) -> int:
        """Frames generated by every worker of the job, the dead ones' included."""
        return self.dead_frames + sum(w.frames for w in self.workers.values())
