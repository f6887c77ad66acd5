"""``csm download``: fetch only what csmcli needs into the standard hub cache."""

from __future__ import annotations

import typer

from ..options import DEFAULT_MODEL
from .common import ModelOpt, stderr_is_tty
from .progress import status


def download(model: ModelOpt = DEFAULT_MODEL) -> None:
    """Download MODEL's config, transformers-format weights, tokenizer and prompts (about 7 GB)."""
    from .. import checkpoint

    with status(stderr_is_tty(), f"downloading {model}"):
        path = checkpoint.download(model)
    typer.echo(str(path))


def register(app: typer.Typer) -> None:
    """Add ``download`` to the app."""
    app.command("download")(download)
