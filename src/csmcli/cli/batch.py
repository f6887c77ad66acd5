"""``csm batch``: whole dialogues from scripts, one file per turn plus the joined conversation.

Each script gets a folder (``dialog/`` beside ``dialog.txt``) with ``0001_alice.wav``, ...,
``manifest.jsonl`` (one entry per finished turn, rewritten atomically after each turn),
``.codes/0001.npy`` (the turn's Mimi codes, so a resumed run conditions later turns on exactly
what was generated) and the combined file.  A rerun keeps every turn whose file exists and whose
manifest entry matches; with context, the first turn redone makes every later turn redone too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .. import audio as audio_io
from ..dialog import (
    Script,
    ScriptError,
    Turn,
    parse_pairs,
    parse_script,
    parse_speakers,
    turn_file,
)
from ..errors import AudioError, CsmError, InputError, OptionsError
from ..options import FRAME_MS, GenerationOptions
from .common import (
    CompileOpt,
    DeviceOpt,
    DtypeOpt,
    MaxAudioMsOpt,
    ModelOpt,
    QuantizeOpt,
    QuietOpt,
    RepetitionPenaltyOpt,
    SeedOpt,
    TemperatureOpt,
    TopKOpt,
    TopPOpt,
    generation_options,
    stderr_is_tty,
)
from .loading import load_synthesizer
from .ray_options import RayCpusOpt, RayOpt

if TYPE_CHECKING:
    from torch import Tensor

    from ..engine import Job
    from ..prompt import Segment
    from ..synthesizer import Synthesizer

log = logging.getLogger("csmcli")

MANIFEST = "manifest.jsonl"
CODES_DIR = ".codes"
COMBINED = "dialog.wav"


@dataclass
class Task:
    """A turn of a script with everything that decides its audio (``key``) and where it goes."""

    turn: Turn
    file: str
    options: GenerationOptions
    voice: str | None
    voices: tuple[tuple[int, str | None], ...]
    key: dict[str, Any]


@dataclass
class Dialogue:
    """One script's outputs: folder, combined file, its tasks and the manifest entries of finished turns."""

    script: Script
    out_dir: Path
    combined: Path
    tasks: list[Task]
    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    todo: list[Task] = field(default_factory=list)

    def path(self, task: Task) -> Path:
        """Where the task's audio goes."""
        return self.out_dir / task.file

    def codes_path(self, task: Task) -> Path:
        """Where the task's codes go."""
        return self.out_dir / CODES_DIR / f"{task.turn.number:04d}.npy"

    def write_manifest(self) -> None:
        """Rewrite ``manifest.jsonl`` atomically: the finished turns, in turn order."""
        lines = [json.dumps(self.records[n], ensure_ascii=False) + "\n" for n in sorted(self.records)]
        write_atomic(self.out_dir / MANIFEST, "".join(lines).encode())


# -- planning ---------------------------------------------------------------------------------


def default_out_dir(script: Path) -> Path:
    """``dialog.txt`` -> ``dialog/`` beside it (``dialog`` without a suffix -> ``dialog_audio/``)."""
    return script.parent / (script.stem if script.suffix else f"{script.name}_audio")


def output_dirs(scripts: list[Path], out_dir: Path | None) -> list[Path]:
    """Each script's folder: ``-d`` for one script, ``-d/<name>`` for several, else beside the script."""
    dirs = []
    for script in scripts:
        if out_dir is None:
            dirs.append(default_out_dir(script))
        else:
            dirs.append(out_dir if len(scripts) == 1 else out_dir / default_out_dir(script).name)
    seen: dict[Path, Path] = {}
    for script, folder in zip(scripts, dirs, strict=True):
        key = folder.resolve()
        if key in seen:
            raise InputError(f"{seen[key]} and {script} would both write to {folder}: rename one of them")
        seen[key] = script
    return dirs


def turn_options(turn: Turn, base: GenerationOptions) -> GenerationOptions:
    """The turn's options: its own (JSON Lines) over the command's; ``--seed S`` gives turn n seed S+n-1."""
    if base.seed is not None and "seed" not in turn.options:
        base = base.replace(seed=(base.seed + turn.number - 1) % 2**32)
    return GenerationOptions.from_mapping(turn.options, base=base)


def parse_voices(spec: str | None, scripts: list[Script]) -> dict[str, str]:
    """``--voices Alice=calm,1=none`` keyed by lower-case name or speaker id; unknown names are errors."""
    voices = {key.casefold(): voice for key, voice in parse_pairs(spec, "--voices")}
    known = {t.name.casefold() for s in scripts for t in s.turns} | {"0", "1"}
    for key in voices:
        if key not in known:
            raise InputError(f"--voices: no speaker {key!r} in the script; use a name from it, 0 or 1")
    return voices


def voice_of(turn: Turn, voices: dict[str, str]) -> str | None:
    """The turn's voice: its own, else ``--voices`` by name or speaker id, else the speaker's preset."""
    return turn.voice or voices.get(turn.name.casefold()) or voices.get(str(turn.speaker))


def plan_tasks(
    script: Script, fmt: str, base: GenerationOptions, voices: dict[str, str], context_turns: int | None, model: str
) -> list[Task]:
    """A task per turn, with each speaker's voice in effect at that turn (for the context)."""
    chosen = [voice_of(t, voices) for t in script.turns]
    first: dict[int, str | None] = {}
    for turn, voice in zip(script.turns, chosen, strict=True):
        first.setdefault(turn.speaker, voice)
    current = dict(first)
    tasks = []
    for turn, voice in zip(script.turns, chosen, strict=True):
        current[turn.speaker] = voice
        options = turn_options(turn, base)
        file = turn_file(turn, fmt)
        key = {
            "text": turn.text,
            "speaker": turn.speaker,
            "voice": voice,
            "file": file,
            "options": dataclasses.asdict(options),
            "context_turns": context_turns,
            "model": model,
        }
        tasks.append(Task(turn, file, options, voice, tuple((s, current[s]) for s in first), key))
    return tasks


def load_manifest(path: Path) -> dict[int, dict[str, Any]]:
    """Entries of an earlier run by turn number; unreadable lines are ignored (those turns are redone)."""
    records: dict[int, dict[str, Any]] = {}
    with contextlib.suppress(OSError, UnicodeDecodeError):
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and isinstance(entry.get("turn"), int):
                    records[entry["turn"]] = entry
    return records


def mark_todo(dialogue: Dialogue, force: bool, chained: bool) -> None:
    """Keep finished turns that match; with context (``chained``) every turn after a redone one is redone."""
    old = {} if force else load_manifest(dialogue.out_dir / MANIFEST)
    dialogue.records, dialogue.todo = {}, []
    for task in dialogue.tasks:
        entry = old.get(task.turn.number)
        keep = (
            entry is not None
            and all(entry.get(k) == v for k, v in task.key.items())
            and dialogue.path(task).is_file()
            and not (chained and dialogue.todo)
        )
        if keep:
            dialogue.records[task.turn.number] = entry
        else:
            dialogue.todo.append(task)


def read_scripts(
    paths: list[Path], speakers: dict[str, int] | None, dirs: list[Path], combined: Path | None, fmt: str
) -> tuple[list[Script], list[Path]]:
    """Every script parsed and its file names checked, with the combined files; all problems of all
    scripts in one :class:`ScriptError`."""
    scripts, joined, problems = [], [], []
    for path, folder in zip(paths, dirs, strict=True):
        target = combined or folder / COMBINED
        try:
            audio_io.format_for(str(target), None)
        except CsmError:
            raise InputError(f"--combined needs an audio extension (.wav, .flac, .ogg or .raw), got {target}") from None
        reserved = {}
        with contextlib.suppress(ValueError):
            reserved[target.resolve().relative_to(folder.resolve()).as_posix().casefold()] = "combined file"
        script, found = parse_script(path, speakers, fmt, reserved)
        problems += found
        scripts.append(script)
        joined.append(target)
    if problems:
        raise ScriptError(problems)
    return scripts, joined


def check_voices(synth: Synthesizer, dialogues: list[Dialogue]) -> None:
    """Load (and encode) every voice of the scripts with pending turns; bad ones reported by line."""
    problems, seen = [], set()
    for d in dialogues:
        for task in d.tasks if d.todo else []:
            pair = (task.turn.speaker, task.voice)
            if pair in seen:
                continue
            seen.add(pair)
            try:
                synth.voice_context(*pair)
            except CsmError as exc:
                problems.append(f"{d.script.label}:{task.turn.line}: {exc}")
    if problems:
        raise ScriptError(problems)


# -- files ------------------------------------------------------------------------------------


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (creating its folder); no partial files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with audio_io.atomic_file(path) as f:
        f.write(data)


def remove_stale_temps(paths: list[Path]) -> None:
    """Delete temp files a killed run left behind next to ``paths`` (``.NAME.*.part``)."""
    for path in paths:
        for stale in path.parent.glob(f".{path.name}.*.part"):
            with contextlib.suppress(OSError):
                stale.unlink()


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold ``folder/.lock`` so two runs cannot write the same folder at once (no-op without fcntl)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(folder / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise InputError(f"another csm batch is writing to {folder}; wait for it or use -d") from None
        yield


def prepare_folders(dialogue: Dialogue) -> None:
    """Create the output folder, its codes folder and the combined file's folder, or fail in one line."""
    for folder in (dialogue.out_dir / CODES_DIR, dialogue.combined.parent):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AudioError(f"cannot create {folder}: {exc.strerror or exc}") from None


def load_codes(path: Path, num_codebooks: int) -> Tensor | None:
    """Codes saved by an earlier run as a LongTensor ``[frames, num_codebooks]``, or None if unusable."""
    import torch

    from ..engine import NUM_AUDIO_CODES

    try:
        codes = np.load(path)
    except (OSError, ValueError, EOFError):
        return None
    if codes.ndim != 2 or codes.shape[1] != num_codebooks:
        return None
    if codes.size and not 0 <= codes.min() <= codes.max() < NUM_AUDIO_CODES:
        return None
    return torch.from_numpy(codes.astype(np.int64))


def codes_bytes(codes: Tensor) -> bytes:
    """Codes as ``.npy`` bytes (int16: codes are below 2048)."""
    buf = io.BytesIO()
    np.save(buf, codes.cpu().numpy().astype(np.int16))
    return buf.getvalue()


# -- generation -------------------------------------------------------------------------------


class Lane:
    """Turns generated one after another.  With ``context_turns`` (not None) each turn hears every
    speaker's voice and the last turns before it, text and audio; without, turns are independent."""

    def __init__(
        self,
        dialogue: Dialogue,
        tasks: list[Task],
        context_turns: int | None,
        on_done: Callable[[Dialogue, Task, float, str], None],
    ) -> None:
        self.dialogue = dialogue
        self.tasks = deque(tasks)
        self.context_turns = context_turns
        self.on_done = on_done
        self.history: list[Segment] = []

    def start_history(self, synth: Synthesizer) -> None:
        """Segments of the kept turns just before the first pending one (codes, else re-encoded audio)."""
        from ..prompt import Segment

        if not self.context_turns or not self.tasks:
            return
        first = self.tasks[0].turn.number
        kept = [t for t in self.dialogue.tasks if t.turn.number < first][-self.context_turns :]
        for task in kept:
            codes = load_codes(self.dialogue.codes_path(task), synth.model.num_codebooks)
            if codes is None:
                log.warning("no codes for turn %d: re-encoding %s", task.turn.number, task.file)
                samples = audio_io.read_audio(self.dialogue.path(task), synth.sample_rate)
                self.history.append(Segment(task.turn.text, task.turn.speaker, audio=samples))
            else:
                self.history.append(Segment(task.turn.text, task.turn.speaker, codes=codes))

    def context(self, synth: Synthesizer, task: Task) -> list[Segment] | None:
        """Voices then recent turns; the oldest turns go first when they do not fit the model."""
        if self.context_turns is None:
            return None
        from ..textsplit import split_text

        voices = [seg for speaker, voice in task.voices for seg in synth.voice_context(speaker, voice)]
        history = self.history[-self.context_turns :] if self.context_turns else []
        first_piece = split_text(task.turn.text)[0]
        room = synth.engine.max_len - task.options.max_frames
        wanted = len(history)
        while history and len(synth.prompt(first_piece, task.turn.speaker, [*voices, *history])) > room:
            history = history[1:]
        if len(history) < wanted:
            log.warning(
                "turn %d hears only %d of its %d earlier turns: the rest do not fit the model's "
                "context (lower --max-audio-ms to keep more)",
                task.turn.number,
                len(history),
                wanted,
            )
        return [*voices, *history]

    def next_run(self, synth: Synthesizer) -> Run | None:
        """Start the next pending turn, or None when the lane is finished."""
        if not self.tasks:
            return None
        task = self.tasks.popleft()
        context = self.context(synth, task)
        jobs = synth.jobs(
            task.turn.text,
            task.turn.speaker,
            voice=task.voice,
            context=context,
            options=task.options,
            first_chunk_frames=8,
            chunk_frames=32,
        )
        return Run(self, task, jobs, synth)

    def finish(self, run: Run, synth: Synthesizer) -> None:
        """Write the turn's codes, audio and manifest entry (in that order), then remember it as context."""
        from ..prompt import Segment

        d, task = self.dialogue, run.task
        samples = np.concatenate(run.samples) if run.samples else np.zeros(0, dtype=np.float32)
        codes = run.codes()
        write_atomic(d.codes_path(task), codes_bytes(codes))
        d.path(task).parent.mkdir(parents=True, exist_ok=True)
        audio_io.write_audio(d.path(task), samples, audio_io.format_for(task.file, None), synth.sample_rate)
        d.records[task.turn.number] = {
            "turn": task.turn.number,
            "speaker": task.turn.speaker,
            "name": task.turn.name,
            "text": task.turn.text,
            "voice": task.voice,
            "file": task.file,
            "duration": round(len(samples) / synth.sample_rate, 3),
            "frames": int(codes.shape[0]),
            "seed": run.finished[0].seed,
            "stop": run.finished[-1].stats.stop_reason,
            **{k: task.key[k] for k in ("options", "context_turns", "model")},
        }
        d.write_manifest()
        if self.context_turns:
            self.history.append(Segment(task.turn.text, task.turn.speaker, codes=codes))
        self.on_done(d, task, len(samples) / synth.sample_rate, run.finished[-1].stats.stop_reason)


class Run:
    """One turn in flight: the jobs of its pieces (each started when the one before has finished)."""

    def __init__(self, lane: Lane, task: Task, jobs: Iterator[Job], synth: Synthesizer) -> None:
        self.lane = lane
        self.task = task
        self.jobs = jobs
        self.samples: list[np.ndarray] = []
        self.finished: list[Job] = []
        self.job = next(jobs)
        synth.engine.submit(self.job)

    @property
    def frames(self) -> int:
        """Frames generated so far."""
        return sum(j.stats.frames for j in self.finished) + self.job.stats.frames

    def codes(self) -> Tensor:
        """All pieces' codes, ``[frames, 32]``."""
        import torch

        return torch.cat([j.all_codes() for j in self.finished])

    def advance(self, synth: Synthesizer) -> bool:
        """Collect audio; when the current piece is done, start the next.  False once the turn is done."""
        self.samples += [c.samples for c in self.job.pop_chunks()]
        if not self.job.done.is_set():
            return True
        if self.job.error is not None:
            raise self.job.error
        self.finished.append(self.job)
        try:
            self.job = next(self.jobs)
        except StopIteration:
            return False
        synth.engine.submit(self.job)
        return True


def run_lanes(synth: Synthesizer, lanes: list[Lane], batch_size: int, progress: BatchProgress) -> None:
    """Generate every lane's turns, up to ``batch_size`` lanes at once in the engine's batch."""
    waiting = deque(lanes)
    active: list[Run] = []
    while True:
        while waiting and len(active) < batch_size:
            lane = waiting.popleft()
            lane.start_history(synth)
            run = lane.next_run(synth)
            if run is not None:
                active.append(run)
        if not active:
            return
        synth.engine.step()
        for run in list(active):
            if run.advance(synth):
                continue
            active.remove(run)
            run.lane.finish(run, synth)
            following = run.lane.next_run(synth)
            if following is not None:
                active.append(following)
        progress.update(active)


# -- progress ---------------------------------------------------------------------------------


class BatchProgress:
    """A bar on stderr (turns, audio seconds, speed, ETA) and a line per finished turn.

    Lines only when stderr is not a terminal; nothing at all with ``-q``.
    """

    def __init__(self, quiet: bool, total: int) -> None:
        self.quiet = quiet
        self.total = total
        self.done = 0
        self.done_seconds = 0.0
        self.started = time.perf_counter()
        self._bar: Progress | None = None
        self._task = None

    def __enter__(self) -> BatchProgress:
        if not self.quiet and stderr_is_tty():
            self._bar = Progress(
                TextColumn("[bold]turns"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task("turns", total=self.total, info="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    @property
    def elapsed(self) -> float:
        """Seconds since generation started."""
        return max(time.perf_counter() - self.started, 1e-6)

    def say(self, message: str) -> None:
        """A line on stderr (above the bar), unless quiet."""
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.console.print(message, markup=False, highlight=False)
        else:
            print(message, file=sys.stderr, flush=True)

    def turn_done(self, dialogue: Dialogue, task: Task, seconds: float, stop: str) -> None:
        """Count a finished turn and report where it went."""
        self.done += 1
        self.done_seconds += seconds
        budget = ", hit --max-audio-ms" if stop == "budget" else ""
        self.say(
            f"csm: [{self.done}/{self.total}] {dialogue.script.label} turn {task.turn.number} "
            f"({task.turn.name}, {seconds:.1f} s{budget}) -> {dialogue.path(task)}"
        )

    def update(self, active: list[Run]) -> None:
        """Refresh the bar with the turns in flight counted by their share of the frame budget."""
        if self._bar is None:
            return
        partial = sum(min(r.frames / r.job.options.max_frames, 0.95) for r in active)
        seconds = self.done_seconds + sum(r.frames for r in active) * FRAME_MS / 1000
        info = f"{seconds:.1f} s audio, {seconds / self.elapsed:.2f}x real time"
        self._bar.update(self._task, completed=self.done + partial, info=info)


# -- the command ------------------------------------------------------------------------------


def write_combined(dialogue: Dialogue, pause: float, sample_rate: int) -> bool:
    """Join the turn files with pauses into the combined file; False while turns are missing."""
    if len(dialogue.records) < len(dialogue.tasks):
        return False
    pieces = [audio_io.read_audio(dialogue.path(t), sample_rate) for t in dialogue.tasks]
    joined = audio_io.concat_with_pauses(pieces, pause, sample_rate)
    fmt = audio_io.format_for(str(dialogue.combined), None)
    audio_io.write_audio(dialogue.combined, joined, fmt, sample_rate)
    return True


def report_problems(exc: ScriptError) -> None:
    """Print every problem of a script on stderr, then fail with a summary."""
    for problem in exc.problems:
        print(problem, file=sys.stderr)
    count = len(exc.problems)
    raise InputError(f"{count} problem{'s' if count > 1 else ''} found; nothing was generated") from None


def model_key(model: str) -> str:
    """The model as recorded in the manifest: local folders by absolute path."""
    return str(Path(model).resolve()) if Path(model).exists() else model


def batch(
    scripts: Annotated[
        list[Path],
        typer.Argument(
            help="Dialogue scripts: .txt ('NAME: line' or '[0] line' per turn) or .jsonl (one object per turn).",
            show_default=False,
        ),
    ],
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out-dir",
            "-d",
            help="Folder for the turns, manifest and combined file (several scripts: "
            "one subfolder each); by default beside the script, named after it.",
        ),
    ] = None,
    combined: Annotated[
        Path | None, typer.Option("--combined", help="The whole conversation in one file (default: OUTDIR/dialog.wav).")
    ] = None,
    pause: Annotated[
        float, typer.Option("--pause", help="Seconds of silence between turns in the combined file.")
    ] = 0.4,
    speakers: Annotated[
        str | None,
        typer.Option(
            "--speakers", help="Names to speaker ids, e.g. Alice=0,Bob=1 (default: 0, 1 in order of appearance)."
        ),
    ] = None,
    voices: Annotated[
        str | None,
        typer.Option(
            "--voices", help="Voice per name or speaker id, e.g. Alice=calm,1=none (default: each speaker's preset)."
        ),
    ] = None,
    context_turns: Annotated[
        int, typer.Option("--context-turns", help="How many earlier turns (text and audio) each turn hears.")
    ] = 3,
    no_context: Annotated[
        bool, typer.Option("--no-context", help="Generate the turns independently and batched (voices still apply).")
    ] = False,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Turns generated at once (independent turns, or several scripts).")
    ] = 4,
    fmt: Annotated[str, typer.Option("--format", help="wav|flac|ogg|raw for the turn files.")] = "wav",
    force: Annotated[bool, typer.Option("--force", help="Redo turns that an earlier run finished.")] = False,
    model: ModelOpt = "sesame/csm-1b",
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    repetition_penalty: RepetitionPenaltyOpt = None,
    max_audio_ms: MaxAudioMsOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = "none",
    compile_: CompileOpt = False,
    ray: RayOpt = None,
    ray_cpus: RayCpusOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Speak whole dialogues: one audio file per turn, a manifest and the joined conversation.

    Each turn hears the speakers' voices and the turns before it. With --seed S, turn n uses seed S+n-1.

    A rerun keeps the finished turns whose text and options are unchanged; --force redoes them.
    """
    options = generation_options(temperature, top_k, top_p, repetition_penalty, max_audio_ms, seed)
    if pause < 0:
        raise OptionsError(f"--pause must be 0 or more seconds, got {pause}")
    if batch_size < 1 or context_turns < 0:
        raise OptionsError("--batch-size must be at least 1 and --context-turns at least 0")
    if combined is not None and len(scripts) > 1:
        raise InputError("--combined names one file: give one script (each script's folder gets dialog.wav)")
    fmt = audio_io.format_for(None, fmt)
    chain = None if no_context else context_turns
    try:
        dirs = output_dirs(scripts, out_dir)
        parsed, joined = read_scripts(scripts, parse_speakers(speakers), dirs, combined, fmt)
    except ScriptError as exc:
        report_problems(exc)
    key = model_key(model)
    voice_map = parse_voices(voices, parsed)
    dialogues = [
        Dialogue(s, d, c, plan_tasks(s, fmt, options, voice_map, chain, key))
        for s, d, c in zip(parsed, dirs, joined, strict=True)
    ]
    with contextlib.ExitStack() as stack:
        for d in dialogues:
            prepare_folders(d)
            stack.enter_context(locked(d.out_dir))
            remove_stale_temps(
                [d.out_dir / MANIFEST, d.combined, *(d.path(t) for t in d.tasks), *(d.codes_path(t) for t in d.tasks)]
            )
            mark_todo(d, force, chained=chain is not None)
        if ray is None:
            generate(dialogues, chain, batch_size, model, device, dtype, quiet, quantize, compile_)
        else:
            from .ray_batch import generate_on_ray

            generate_on_ray(
                ray, ray_cpus, dialogues, chain, batch_size, model, device, dtype, quiet, quantize, compile_
            )
        for d in dialogues:
            if write_combined(d, pause, audio_io.SAMPLE_RATE) and not quiet:
                print(f"csm: {d.script.label}: {len(d.tasks)} turns joined in {d.combined}", file=sys.stderr)


def generate(
    dialogues: list[Dialogue],
    chain: int | None,
    batch_size: int,
    model: str,
    device: str,
    dtype: str,
    quiet: bool,
    quantize: str = "none",
    compile: bool = False,
) -> None:
    """Load the model if any turn is pending and generate those turns, files and manifests as they finish."""
    todo = [t for d in dialogues for t in d.todo]
    kept = sum(len(d.tasks) for d in dialogues) - len(todo)
    if not todo:
        for d in dialogues:
            d.write_manifest()  # drops entries of turns no longer in the script
        if not quiet:
            print(f"csm: all {kept} turns are already done (--force redoes them)", file=sys.stderr)
        return
    if chain is None:
        lanes_of = [(d, [t]) for d in dialogues for t in d.todo]
    else:
        lanes_of = [(d, d.todo) for d in dialogues if d.todo]
    slots = min(batch_size, len(lanes_of))
    synth = load_synthesizer(model, device, dtype, not quiet and stderr_is_tty(), slots, quantize, compile)
    try:
        check_voices(synth, dialogues)
    except ScriptError as exc:
        report_problems(exc)
    for d in dialogues:
        d.write_manifest()
    with BatchProgress(quiet, len(todo)) as progress:
        lanes = [Lane(d, tasks, chain, progress.turn_done) for d, tasks in lanes_of]
        try:
            run_lanes(synth, lanes, slots, progress)
        except KeyboardInterrupt:
            progress.say(
                f"csm: stopped after {progress.done} of {len(todo)} turns; run the same command again to continue"
            )
            raise
    if not quiet:
        seconds = progress.done_seconds
        kept_note = f"; kept {kept} finished earlier" if kept else ""
        print(
            f"csm: generated {len(todo)} turns ({seconds:.1f} s of audio) in {progress.elapsed:.1f} s, "
            f"{seconds / progress.elapsed:.2f}x real time{kept_note}",
            file=sys.stderr,
        )


def register(app: typer.Typer) -> None:
    """Add ``batch`` to the app."""
    app.command("batch")(batch)
