"""The ``csm`` command: a thin Typer layer over :mod:`csmcli`'s synthesis core.

Importing this module, printing help and rejecting bad arguments never import torch: the
commands import the engine only once they run.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated

import typer

try:  # recent typer vendors its own click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer uses the real click
    from click.exceptions import ClickException, NoArgsIsHelpError, UsageError

from .. import __version__
from ..errors import CsmError
from . import batch, bench, download, play, say, serve, voices

app = typer.Typer(
    name="csm",
    help="Fast, streaming speech synthesis with Sesame's CSM-1B.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help: rich markup would eat literal "[default: ...]" in help texts, and typer's rich
    # panels show a value placeholder (<bool>) even for switches that take none.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
say.register(app)
play.register(app)
batch.register(app)
serve.register(app)
download.register(app)
voices.register(app)
bench.register(app)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"csm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version and exit."),
    ] = False,
) -> None:
    """Fast, streaming speech synthesis with Sesame's CSM-1B."""


class StderrHandler(logging.StreamHandler):
    """Writes each record to ``sys.stderr`` as it is at that moment, so a command run again in the same
    process (tests, embedders that swap or close the stream) neither writes to a closed stream nor
    repeats its lines."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # the stream is always the current sys.stderr
        pass


def _setup_logging() -> None:
    log = logging.getLogger("csmcli")
    if not any(isinstance(h, StderrHandler) for h in log.handlers):
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("csm: %(levelname)s: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    logging.getLogger("transformers").setLevel(logging.ERROR)


def usage_error_line(exc: ClickException) -> str:
    """A click usage error as the one line every other error gets, pointing at the command's help."""
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if isinstance(exc, UsageError) and ctx is not None else ""
    return f"csm: error: {message}{hint}"


def _exit_on_closed_stdout() -> None:
    """A reader that stopped early (``csm say -o - | head -c 100``): no message, status 141 like a
    tool killed by SIGPIPE; stdout is pointed at /dev/null so the final flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(141)


def _run(argv: list[str] | None) -> object:
    """Parse and run one command, leaving every exception to :func:`main` (click's own ``main``
    would turn a closed stdout into a silent status 1)."""
    command = typer.main.get_command(app)
    with command.make_context("csm", list(sys.argv[1:] if argv is None else argv)) as ctx:
        return command.invoke(ctx)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; every user error becomes one line on stderr and a non-zero exit, never a traceback."""
    _setup_logging()
    try:
        result = _run(argv)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except NoArgsIsHelpError as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ClickException as exc:
        print(usage_error_line(exc), file=sys.stderr)
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        print("csm: interrupted", file=sys.stderr)
        sys.exit(130)
    except CsmError as exc:
        print(f"csm: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:
        _exit_on_closed_stdout()
    except Exception as exc:
        if os.environ.get("CSM_DEBUG"):
            raise
        print(f"csm: internal error: {type(exc).__name__}: {exc} (set CSM_DEBUG=1 for a traceback)", file=sys.stderr)
        sys.exit(70)
    sys.exit(result if isinstance(result, int) else 0)
