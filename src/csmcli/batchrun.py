"""Batch runs of dialogue scripts: planning, resume and scheduling, without any command line.

A :class:`Dialogue` is one script's planned work: a :class:`Task` per turn and the folder it
writes (turn files, ``manifest.jsonl``, ``.codes/NNNN.npy`` with each turn's Mimi codes, and the
combined file named after the script).  :func:`mark_todo` decides what an earlier run already
finished; :func:`run_lanes` generates the rest through a :class:`~csmcli.synthesizer.Synthesizer`,
several turns at once, and reports each finished turn through a callback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import audio as audio_io
from . import formats
from .dialog import Script, ScriptError, Turn, check_out_name, parse_pairs, parse_script, turn_file
from .errors import AudioError, CsmError, InputError
from .options import SPEAKERS, GenerationOptions

if TYPE_CHECKING:
    from torch import Tensor

    from .synthesizer import Synthesizer
    from .utterance import Utterance

log = logging.getLogger("csmcli")

MANIFEST = "manifest.jsonl"
CODES_DIR = ".codes"


@dataclass
class Task:
    """A turn of a script with everything that decides its audio (``key``) and where it goes."""

    turn: Turn
    file: str
    options: GenerationOptions
    voice: str | None
    voices: tuple[tuple[int, str | None], ...]
    key: dict[str, Any]
    #: Bits/s of the turn file if its format is lossy, else None.
    bitrate: int | None = None


@dataclass
class Dialogue:
    """One script's outputs: folder, combined file, its tasks and the manifest entries of finished turns."""

    script: Script
    out_dir: Path
    combined: Path
    tasks: list[Task]
    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    todo: list[Task] = field(default_factory=list)
    #: The audio of the turns generated in this run, by turn number, for the combined file.
    audio: dict[int, np.ndarray] = field(default_factory=dict)

    def path(self, task: Task) -> Path:
        """Where the task's audio goes."""
        return self.out_dir / task.file

    def codes_path(self, task: Task) -> Path:
        """Where the task's codes go."""
        return self._codes_path(task.turn.number)

    def _codes_path(self, number: int) -> Path:
        return self.out_dir / CODES_DIR / f"{number:04d}.npy"

    def write_manifest(self) -> None:
        """Rewrite ``manifest.jsonl`` atomically: the finished turns, in turn order."""
        lines = [json.dumps(self.records[n], ensure_ascii=False) + "\n" for n in sorted(self.records)]
        write_atomic(self.out_dir / MANIFEST, "".join(lines).encode())


# -- planning ---------------------------------------------------------------------------------


def default_out_dir(script: Path) -> Path:
    """``dialog.txt`` -> ``dialog/`` beside it (``dialog`` without a suffix -> ``dialog_audio/``)."""
    return script.parent / (script.stem if script.suffix else f"{script.name}_audio")


def combined_path(script: Path, folder: Path, fmt: str) -> Path:
    """The joined conversation: named after the script, in ``folder`` (``talk.jsonl`` -> ``talk/talk.wav``)."""
    return folder / f"{script.stem}.{fmt}"


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


def read_scripts(
    paths: list[Path], speakers: dict[str, int] | None, dirs: list[Path], combined: Path | None, fmt: str
) -> tuple[list[Script], list[Path]]:
    """Every script parsed and its file names checked, with the combined files; all problems of all
    scripts in one :class:`ScriptError`."""
    scripts, joined, problems = [], [], []
    for path, folder in zip(paths, dirs, strict=True):
        target = combined or combined_path(path, folder, fmt)
        try:
            formats.for_path(target, None)
        except CsmError:
            raise InputError(
                f"--combined needs an audio extension ({formats.extensions_help()}), got {target}"
            ) from None
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


def turn_options(turn: Turn, base: GenerationOptions) -> GenerationOptions:
    """The turn's options: its own (JSON Lines) over the command's; ``--seed S`` gives turn n seed S+n-1."""
    if base.seed is not None and "seed" not in turn.options:
        base = base.replace(seed=(base.seed + turn.number - 1) % 2**32)
    return GenerationOptions.from_mapping(turn.options, base=base)


def parse_voices(spec: str | None, scripts: list[Script]) -> dict[str, str]:
    """``--voices Alice=calm,1=none`` keyed by lower-case name or speaker id; unknown names are errors."""
    voices = {key.casefold(): voice for key, voice in parse_pairs(spec, "--voices")}
    known = {t.name.casefold() for s in scripts for t in s.turns} | {str(s) for s in SPEAKERS}
    for key in voices:
        if key not in known:
            raise InputError(f"--voices: no speaker {key!r} in the script; use a name from it, 0 or 1")
    return voices


def voice_of(turn: Turn, voices: dict[str, str]) -> str | None:
    """The turn's voice: its own, else ``--voices`` by name or speaker id, else the speaker's preset."""
    return turn.voice or voices.get(turn.name.casefold()) or voices.get(str(turn.speaker))


def model_key(model: str) -> str:
    """The model as recorded in the manifest: local folders by absolute path."""
    return str(Path(model).resolve()) if Path(model).exists() else model


def bitrate_for(path: str | Path, bitrate: str | int | None) -> int | None:
    """``--bitrate`` checked for the file at ``path`` if its format takes one, else that format's default (None)."""
    fmt = formats.for_path(path, None)
    return formats.check_bitrate(fmt, bitrate if formats.lookup(fmt).bitrate else None)


def plan_tasks(
    script: Script,
    fmt: str,
    base: GenerationOptions,
    voices: dict[str, str],
    context_turns: int | None,
    model: str,
    bitrate: str | int | None = None,
) -> list[Task]:
    """A task per turn, with each speaker's voice in effect at that turn (for the context) and its
    file's bitrate (``bitrate`` where the file's format takes one)."""
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
            "bitrate": bitrate_for(file, bitrate),
            "options": dataclasses.asdict(options),
            "context_turns": context_turns,
            "model": model_key(model),
        }
        tasks.append(Task(turn, file, options, voice, tuple((s, current[s]) for s in first), key, key["bitrate"]))
    return tasks


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


# -- resume -----------------------------------------------------------------------------------


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
    """Keep finished turns that match; with context (``chained``) every turn after a redone one is redone.

    Files of an earlier run that this plan does not keep (turns since changed, redone or dropped
    from the script, and the combined file when any turn is redone) are deleted now, so the
    folder never mixes two plans.
    """
    old = load_manifest(dialogue.out_dir / MANIFEST)
    dialogue.records, dialogue.todo = {}, []
    for task in dialogue.tasks:
        entry = old.get(task.turn.number)
        keep = (
            not force
            and entry is not None
            and all(entry.get(k) == v for k, v in task.key.items())
            and dialogue.path(task).is_file()
            and not (chained and dialogue.todo)
        )
        if keep:
            dialogue.records[task.turn.number] = entry
        else:
            dialogue.todo.append(task)
    remove_stale_turns(dialogue, old)


def remove_stale_turns(dialogue: Dialogue, old: dict[int, dict[str, Any]]) -> None:
    """Delete the turn files and codes of ``old`` manifest entries that are not kept, and the combined
    file if anything is to be redone."""
    kept = {dialogue.path(t).resolve() for t in dialogue.tasks if t.turn.number in dialogue.records}
    stale = [dialogue.combined] if dialogue.todo else []
    for number, entry in old.items():
        if number in dialogue.records:
            continue
        stale.append(dialogue._codes_path(number))
        file = entry.get("file")
        with contextlib.suppress(ValueError):
            if isinstance(file, str):
                check_out_name(file)  # only files inside the folder
                stale.append(dialogue.out_dir / file)
    for path in stale:
        if path.resolve() not in kept:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)


def remove_stale_temps(dialogue: Dialogue) -> None:
    """Delete temp files a killed run left behind next to the dialogue's files (``.NAME.*.part``)."""
    paths = [dialogue.out_dir / MANIFEST, dialogue.combined]
    paths += [p for t in dialogue.tasks for p in (dialogue.path(t), dialogue.codes_path(t))]
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


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (creating its folder); no partial files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with audio_io.atomic_file(path) as f:
        f.write(data)


def load_codes(path: Path, num_codebooks: int) -> Tensor | None:
    """Codes saved by an earlier run as a LongTensor ``[frames, num_codebooks]``, or None if unusable."""
    import torch

    from .engine import NUM_AUDIO_CODES

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


def needs_codec(dialogue: Dialogue) -> bool:
    """True if the combined file needs turns of an earlier run decoded from their codes (lossy turn files)."""
    return any(
        t.turn.number not in dialogue.audio and not formats.lookup(formats.for_path(t.file, None)).lossless
        for t in dialogue.tasks
    )


def turn_audio(dialogue: Dialogue, task: Task, sample_rate: int, synth: Synthesizer | None) -> np.ndarray:
    """The turn's audio for the combined file, never through a lossy file: this run's samples, else a
    lossless turn file, else the turn's codes decoded by ``synth``'s codec (the file if they are unusable)."""
    if task.turn.number in dialogue.audio:
        return dialogue.audio[task.turn.number]
    if synth is not None and not formats.lookup(formats.for_path(task.file, None)).lossless:
        codes = load_codes(dialogue.codes_path(task), synth.model.num_codebooks)
        if codes is not None:
            return synth.codec.decode(codes)
    return audio_io.read_audio(dialogue.path(task), sample_rate)


def write_combined(
    dialogue: Dialogue,
    pause: float,
    sample_rate: int,
    bitrate: str | int | None = None,
    synth: Synthesizer | None = None,
) -> bool:
    """Join the turns with pauses into the combined file (``bitrate`` if its format takes one); False
    while turns are missing."""
    if len(dialogue.records) < len(dialogue.tasks):
        return False
    pieces = [turn_audio(dialogue, t, sample_rate, synth) for t in dialogue.tasks]
    joined = audio_io.concat_with_pauses(pieces, pause, sample_rate)
    fmt = formats.for_path(dialogue.combined, None)
    formats.write_file(dialogue.combined, joined, fmt, sample_rate, bitrate_for(dialogue.combined, bitrate))
    return True


# -- scheduling -------------------------------------------------------------------------------

#: Called with each finished turn: its dialogue, task, seconds of audio and why it stopped.
TurnDone = Callable[[Dialogue, Task, float, str], None]


class Lane:
    """Turns generated one after another.  With ``context_turns`` (not None) each turn hears every
    speaker's voice and the last turns before it, text and audio; without, turns are independent."""

    def __init__(self, dialogue: Dialogue, tasks: list[Task], context_turns: int | None) -> None:
        from .utterance import History

        self.dialogue = dialogue
        self.tasks = deque(tasks)
        self.context_turns = context_turns
        self.history = History(context_turns or 0)

    def start_history(self, synth: Synthesizer) -> None:
        """Hear the kept turns just before the first pending one (their codes, else their audio re-encoded)."""
        if not self.context_turns or not self.tasks:
            return
        first = self.tasks[0].turn.number
        kept = [t for t in self.dialogue.tasks if t.turn.number < first][-self.context_turns :]
        for task in kept:
            codes = load_codes(self.dialogue.codes_path(task), synth.model.num_codebooks)
            if codes is None:
                log.warning("no codes for turn %d: re-encoding %s", task.turn.number, task.file)
                samples = audio_io.read_audio(self.dialogue.path(task), synth.sample_rate)
                self.history.add(task.turn.text, task.turn.speaker, audio=samples)
            else:
                self.history.add(task.turn.text, task.turn.speaker, codes=codes)

    def next_turn(self, synth: Synthesizer) -> TurnInFlight | None:
        """Start the next pending turn, or None when the lane is finished."""
        if not self.tasks:
            return None
        task = self.tasks.popleft()
        voices = None
        if self.context_turns is not None:
            voices = [seg for speaker, voice in task.voices for seg in synth.voice_context(speaker, voice)]
        utterance = synth.utterance(
            task.turn.text,
            task.turn.speaker,
            voice=task.voice,
            context=voices,
            history=self.history.segments,
            options=task.options,
            first_chunk_frames=8,
            chunk_frames=32,
        )
        return TurnInFlight(self, task, utterance, synth)

    def finish(self, turn: TurnInFlight, synth: Synthesizer, on_done: TurnDone) -> None:
        """Write the turn's codes, audio and manifest entry (in that order), then remember it as context."""
        d, task, utterance = self.dialogue, turn.task, turn.utterance
        samples = np.concatenate(turn.samples) if turn.samples else np.zeros(0, dtype=np.float32)
        codes = utterance.codes()
        write_atomic(d.codes_path(task), codes_bytes(codes))
        d.path(task).parent.mkdir(parents=True, exist_ok=True)
        formats.write_file(d.path(task), samples, formats.for_path(task.file, None), synth.sample_rate, task.bitrate)
        d.audio[task.turn.number] = samples
        d.records[task.turn.number] = {
            "turn": task.turn.number,
            "speaker": task.turn.speaker,
            "name": task.turn.name,
            "text": task.turn.text,
            "voice": task.voice,
            "file": task.file,
            "duration": round(len(samples) / synth.sample_rate, 3),
            "frames": int(codes.shape[0]),
            "seed": utterance.jobs[0].seed,
            "stop": utterance.stop_reason,
            **{k: task.key[k] for k in ("bitrate", "options", "context_turns", "model")},
        }
        d.write_manifest()
        if self.context_turns:
            self.history.add(task.turn.text, task.turn.speaker, codes=codes)
        on_done(d, task, len(samples) / synth.sample_rate, utterance.stop_reason)


class TurnInFlight:
    """One turn being generated: its utterance's current job in the engine and the audio so far."""

    def __init__(self, lane: Lane, task: Task, utterance: Utterance, synth: Synthesizer) -> None:
        self.lane = lane
        self.task = task
        self.utterance = utterance
        self.samples: list[np.ndarray] = []
        self.job = synth.submit(utterance.next_job())

    @property
    def frames(self) -> int:
        """Frames generated so far."""
        return self.utterance.frames

    @property
    def max_frames(self) -> int:
        """The turn's frame budget."""
        return self.task.options.max_frames

    def advance(self, synth: Synthesizer) -> bool:
        """Collect audio; when the current piece is done, start the next.  False once the turn is done."""
        self.samples += [c.samples for c in self.job.pop_chunks()]
        if not self.job.done.is_set():
            return True
        if self.job.error is not None:
            raise self.job.error
        following = self.utterance.next_job(self.job)
        if following is None:
            return False
        self.job = synth.submit(following)
        return True


def make_lanes(dialogues: list[Dialogue], context_turns: int | None) -> list[Lane]:
    """The pending turns as lanes: a lane per dialogue with context, a lane per turn without."""
    if context_turns is None:
        return [Lane(d, [t], None) for d in dialogues for t in d.todo]
    return [Lane(d, d.todo, context_turns) for d in dialogues if d.todo]


def run_lanes(
    synth: Synthesizer,
    lanes: list[Lane] | deque[Lane],
    batch_size: int,
    on_done: TurnDone,
    on_step: Callable[[list[TurnInFlight]], None] | None = None,
) -> None:
    """Generate every lane's turns, up to ``batch_size`` lanes at once in the engine's batch, writing
    each turn's files as it finishes; ``on_done`` hears of each finished turn, ``on_step`` of the
    turns in flight after every frame.  A deque is drained as it is, so another thread may add lanes
    while the run goes on (a cluster worker does)."""
    waiting = lanes if isinstance(lanes, deque) else deque(lanes)
    active: list[TurnInFlight] = []
    while True:
        while waiting and len(active) < batch_size:
            lane = waiting.popleft()
            lane.start_history(synth)
            turn = lane.next_turn(synth)
            if turn is not None:
                active.append(turn)
        if not active:
            return
        synth.step()
        for turn in list(active):
            if turn.advance(synth):
                continue
            active.remove(turn)
            turn.lane.finish(turn, synth, on_done)
            following = turn.lane.next_turn(synth)
            if following is not None:
                active.append(following)
        if on_step is not None:
            on_step(active)
