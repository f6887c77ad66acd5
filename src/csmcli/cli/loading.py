"""Loading the synthesizer for a command, with a spinner on stderr."""

from __future__ import annotations

from .progress import status


def load_synthesizer(  # noqa: ANN201
    model: str,
    device: str,
    dtype: str,
    show: bool,
    max_batch_size: int = 1,
    quantize: str = "none",
    compile: bool = False,
):
    """Load ``model`` (hub id or directory) onto ``device``; errors surface as one-line CsmErrors."""
    from ..synthesizer import Synthesizer

    with status(show, f"loading {model}" + (" and compiling" if compile else "")):
        return Synthesizer.load(
            model, device=device, dtype=dtype, max_batch_size=max_batch_size, quantize=quantize, compile=compile
        )
