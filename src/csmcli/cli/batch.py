"""``csm batch``: whole dialogues from scripts, one file per turn plus the joined conversation.

The command parses its arguments, shows progress and prints messages; planning, resume and
generation live in :mod:`csmcli.batchrun` (the folder layout is described there).  A rerun keeps
every turn whose file exists and whose manifest entry matches; with context, the first turn redone
makes every later turn redone too.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .. import audio as audio_io
from .. import formats
from ..batchrun import (
    Dialogue,
    Task,
    TurnInFlight,
    check_voices,
    locked,
    make_lanes,
    mark_todo,
    needs_codec,
    output_dirs,
    parse_voices,
    plan_tasks,
    prepare_folders,
    read_scripts,
    remove_stale_temps,
    run_lanes,
    write_combined,
)
from ..dialog import ScriptError, parse_speakers
from ..errors import InputError, OptionsError
from ..options import FRAME_MS, format_rtf
from .common import BitrateOpt, GenerationFlags, ModelFlags, QuietOpt, command, stderr_is_tty
from .loading import load_synthesizer
from .ray_options import RayCpusOpt, RayOpt

if TYPE_CHECKING:
    from ..synthesizer import Synthesizer


def turns(count: int) -> str:
    """``1 turn``, ``2 turns``."""
    return f"{count} turn{'' if count == 1 else 's'}"


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

    def update(self, active: list[TurnInFlight]) -> None:
        """Refresh the bar with the turns in flight counted by their share of the frame budget."""
        if self._bar is None:
            return
        partial = sum(min(r.frames / r.max_frames, 0.95) for r in active)
        seconds = self.done_seconds + sum(r.frames for r in active) * FRAME_MS / 1000
        info = f"{seconds:.1f} s audio, {format_rtf(self.elapsed, seconds)}"
        self._bar.update(self._task, completed=self.done + partial, info=info)


# -- the command ------------------------------------------------------------------------------


def report_problems(exc: ScriptError) -> None:
    """Print every problem of a script on stderr, then fail with a summary."""
    for problem in exc.problems:
        print(problem, file=sys.stderr)
    count = len(exc.problems)
    raise InputError(f"{count} problem{'s' if count > 1 else ''} found; nothing was generated") from None


@command
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
    fmt: Annotated[str, typer.Option("--format", help=f"{formats.choices_help()} for the turn files.")] = "wav",
    bitrate: BitrateOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Redo turns that an earlier run finished.")] = False,
    *,
    generation: GenerationFlags,
    loader: ModelFlags,
    ray: RayOpt = None,
    ray_cpus: RayCpusOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Speak whole dialogues: one audio file per turn, a manifest and the joined conversation.

    Each turn hears the speakers' voices and the turns before it. With --seed S, turn n uses seed S+n-1.

    A rerun keeps the finished turns whose text and options are unchanged; --force redoes them.
    """
    options = generation.options()
    model, device, dtype = loader.model, loader.device, loader.dtype
    quantize, compile_ = loader.quantize, loader.compile
    if pause < 0:
        raise OptionsError(f"--pause must be 0 or more seconds, got {pause}")
    if batch_size < 1 or context_turns < 0:
        raise OptionsError("--batch-size must be at least 1 and --context-turns at least 0")
    if combined is not None and len(scripts) > 1:
        raise InputError("--combined names one file: give one script (each script's folder gets its own)")
    fmt = formats.lookup(fmt).name
    formats.check_bitrate(fmt, bitrate)
    chain = None if no_context else context_turns
    try:
        dirs = output_dirs(scripts, out_dir)
        parsed, joined = read_scripts(scripts, parse_speakers(speakers), dirs, combined, fmt)
    except ScriptError as exc:
        report_problems(exc)
    voice_map = parse_voices(voices, parsed)
    dialogues = [
        Dialogue(s, d, c, plan_tasks(s, fmt, options, voice_map, chain, model, bitrate))
        for s, d, c in zip(parsed, dirs, joined, strict=True)
    ]
    with contextlib.ExitStack() as stack:
        for d in dialogues:
            prepare_folders(d)
            stack.enter_context(locked(d.out_dir))
            remove_stale_temps(d)
            mark_todo(d, force, chained=chain is not None)
        synth = None
        if ray is None or not any(d.todo for d in dialogues):
            synth = generate(
                dialogues, chain, batch_size, model, device, dtype, quiet, quantize, compile_, loader.thread_setting
            )
        else:
            from .ray_batch import generate_on_ray

            generate_on_ray(ray, ray_cpus, dialogues, chain, batch_size, quiet, loader)
        if synth is None and any(len(d.records) == len(d.tasks) and needs_codec(d) for d in dialogues):
            synth = loader.load(not quiet and stderr_is_tty())  # to decode kept lossy turns from their codes
        for d in dialogues:
            if write_combined(d, pause, audio_io.SAMPLE_RATE, bitrate, synth) and not quiet:
                print(f"csm: {d.script.label}: {turns(len(d.tasks))} joined in {d.combined}", file=sys.stderr)


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
    threads: int | str = "auto",
) -> Synthesizer | None:
    """Load the model if any turn is pending and generate those turns, files and manifests as they finish;
    the loaded model, or None if nothing was pending."""
    todo = [t for d in dialogues for t in d.todo]
    kept = sum(len(d.tasks) for d in dialogues) - len(todo)
    if not todo:
        for d in dialogues:
            d.write_manifest()  # drops entries of turns no longer in the script
        if not quiet:
            done = "the one turn is" if kept == 1 else f"all {kept} turns are"
            print(f"csm: {done} already done (--force redoes them)", file=sys.stderr)
        return None
    lanes = make_lanes(dialogues, chain)
    slots = min(batch_size, len(lanes))
    synth = load_synthesizer(model, device, dtype, not quiet and stderr_is_tty(), slots, quantize, compile, threads)
    try:
        check_voices(synth, dialogues)
    except ScriptError as exc:
        report_problems(exc)
    for d in dialogues:
        d.write_manifest()
    with BatchProgress(quiet, len(todo)) as progress:
        try:
            run_lanes(synth, lanes, slots, progress.turn_done, progress.update)
        except KeyboardInterrupt:
            progress.say(
                f"csm: stopped after {progress.done} of {len(todo)} turns; run the same command again to continue"
            )
            raise
    if not quiet:
        seconds = progress.done_seconds
        kept_note = f"; kept {kept} finished earlier" if kept else ""
        print(
            f"csm: generated {turns(len(todo))} ({seconds:.1f} s of audio) in {progress.elapsed:.1f} s, "
            f"{format_rtf(progress.elapsed, seconds)}{kept_note}",
            file=sys.stderr,
        )
    return synth


def register(app: typer.Typer) -> None:
    """Add ``batch`` to the app."""
    app.command("batch")(batch)
