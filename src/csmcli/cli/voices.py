"""``csm voices``: list, add and remove voices (context audio plus transcript)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..errors import InputError
from ..options import DEFAULT_MODEL
from .common import ModelOpt
from .loading import user_home

if TYPE_CHECKING:
    from ..voices import VoiceLibrary

app = typer.Typer(help="Manage voices: presets from the checkpoint and your own recordings.", no_args_is_help=True)


def _library(model: str | None) -> VoiceLibrary:
    """The user's voices, plus the presets of ``model`` when it is available locally."""
    from .. import checkpoint
    from ..voices import VoiceLibrary

    prompts = None
    if model:
        try:
            prompts = checkpoint.inspect(checkpoint.resolve(model, local_files_only=True)).prompts_dir
        except Exception:  # presets are optional here: listing user voices must still work
            prompts = None
    return VoiceLibrary(prompts, home=user_home())


@app.command("list")
def list_voices(model: ModelOpt = DEFAULT_MODEL) -> None:
    """Show the available voices (user voices shadow presets of the same name)."""
    from rich.console import Console
    from rich.table import Table

    library = _library(model)
    voices = library.list()
    table = Table("name", "source", "transcript", box=None, pad_edge=False)
    for voice in voices:
        text = voice.text if len(voice.text) <= 60 else voice.text[:57] + "..."
        table.add_row(voice.name, voice.source, text)
    if voices:
        Console().print(table)
    if not library.presets():
        typer.echo(
            f"csm: no presets: they come with the model; `csm download {model}` fetches it "
            "(or pass --model DIR for a local checkpoint)",
            err=True,
        )
    if not voices:
        typer.echo("csm: no user voices: add one with `csm voices add NAME --audio FILE --text ...`", err=True)


@app.command("add")
def add_voice(
    name: Annotated[str, typer.Argument(help="Name for the voice.")],
    audio: Annotated[Path, typer.Option("--audio", "-a", help="A recording (any rate/format soundfile reads).")],
    text: Annotated[str, typer.Option("--text", "-t", help="Exactly what the recording says.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing voice of that name.")] = False,
) -> None:
    """Store a voice under $CSM_HOME/voices/NAME (resampled to 24 kHz mono)."""
    from ..voices import VoiceLibrary

    voice = VoiceLibrary(home=user_home()).add(name, audio, text, force=force)
    typer.echo(f"added voice {voice.name}: {voice.audio_path}")


@app.command("remove")
def remove_voice(name: Annotated[str, typer.Argument(help="The user voice to delete.")]) -> None:
    """Delete a user voice (presets come with the model and stay)."""
    from ..voices import PRESET_TRANSCRIPTS, VoiceLibrary

    library = VoiceLibrary(home=user_home())
    if name in PRESET_TRANSCRIPTS and all(v.name != name for v in library.user_voices()):
        raise InputError(f"{name} is a preset that comes with the model: presets cannot be removed, only user voices")
    library.remove(name)
    typer.echo(f"removed voice {name}")


def register(root: typer.Typer) -> None:
    """Add ``voices`` to the app."""
    root.add_typer(app, name="voices")
