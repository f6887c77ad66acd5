"""Loading the synthesizer for a command, with a spinner on stderr.

The environment variables that tune loading are read here (and only here in the package), then
passed down as parameters: ``CSM_CPU_ISA`` (limit the CPU paths to ``avx512``, ``avx2`` or
``default``) and ``CSM_CPU_KERNELS`` (``auto``, ``packed`` or ``plain``).
"""

from __future__ import annotations

import os

from .progress import status


def cpu_settings() -> dict[str, str | None]:
    """The CPU settings from the environment: ``cpu_isa`` and ``cpu_kernels`` (None when unset)."""
    return {"cpu_isa": os.environ.get("CSM_CPU_ISA") or None, "cpu_kernels": os.environ.get("CSM_CPU_KERNELS") or None}


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
            model,
            device=device,
            dtype=dtype,
            max_batch_size=max_batch_size,
            quantize=quantize,
            compile=compile,
            **cpu_settings(),
        )
