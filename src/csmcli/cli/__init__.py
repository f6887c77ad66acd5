"""The ``csm`` command: a thin Typer layer over :mod:`csmcli`'s synthesis core."""

from __future__ import annotations

import logging
import os
import sys

import typer

try:  # recent typer vendors its own click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer uses the real click
    from click.exceptions import ClickException

from ..errors import CsmError
from . import batch, bench, download, play, say, serve, voices

app = typer.Typer(
    name="csm",
    help="Fast, streaming speech synthesis with Sesame's CSM-1B.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
say.register(app)
play.register(app)
batch.register(app)
serve.register(app)
download.register(app)
voices.register(app)
bench.register(app)


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("csm: %(levelname)s: %(message)s"))
    log = logging.getLogger("csmcli")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    logging.getLogger("transformers").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; every user error becomes one line on stderr and a non-zero exit, never a traceback."""
    _setup_logging()
    try:
        result = app(args=argv, prog_name="csm", standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        print("csm: interrupted", file=sys.stderr)
        sys.exit(130)
    except CsmError as exc:
        print(f"csm: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(141)
    except Exception as exc:
        if os.environ.get("CSM_DEBUG"):
            raise
        print(f"csm: internal error: {type(exc).__name__}: {exc} (set CSM_DEBUG=1 for a traceback)", file=sys.stderr)
        sys.exit(70)
    sys.exit(result if isinstance(result, int) else 0)
