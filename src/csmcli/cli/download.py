"""``csm download``: fetch only what csmcli needs into the standard hub cache."""

from __future__ import annotations

import typer

from .. import checkpoint
from .common import ModelOpt, stderr_is_tty
from .progress import status


def download(model: ModelOpt = checkpoint.DEFAULT_MODEL) -> None:
    """Download MODEL's config, transformers-format weights, tokenizer and prompts (about 7 GB)."""
    with status(stderr_is_tty(), f"downloading {model}"):
        path = checkpoint.download(model)
    typer.echo(str(path))


def register(app: typer.Typer) -> None:
    """Add ``download`` to the app."""
    app.command("download")(download)
