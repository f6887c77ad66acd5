"""Loading the synthesizer for a command, with a spinner on stderr.

The environment variables that tune loading are read here, and only here in the package, then
passed to :func:`csmcli.loader.load_parts` as parameters:

* ``CSM_CPU_ISA``: run the CPU paths of a lesser CPU (``avx512``, ``avx_vnni``, ``avx2``, ``default``).
* ``CSM_CPU_KERNELS``: CPU matrix kernels (``auto``, ``packed``, ``plain``).
* ``CSM_CUDA_GRAPHS=0``: run frames eagerly on CUDA.
* ``CSM_MIMI``: where the codec comes from when a checkpoint has none (hub id or directory).
* ``CSM_HOME``: the user directory whose ``voices/`` holds the user's voices and whose ``cache/``
  the quantized weights (without it: the platform's cache directory).

(``CSM_COMPILE``, ``CSM_QUANTIZE`` and ``CSM_MODEL`` are the defaults of command-line options.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .progress import status

if TYPE_CHECKING:
    from ..synthesizer import Synthesizer


def cpu_settings() -> dict[str, str | None]:
    """``cpu_isa`` and ``cpu_kernels`` from the environment (None when unset)."""
    return {"cpu_isa": os.environ.get("CSM_CPU_ISA") or None, "cpu_kernels": os.environ.get("CSM_CPU_KERNELS") or None}


def user_home() -> Path | None:
    """``$CSM_HOME``, the user directory for voices (None: the platform's data directory)."""
    home = os.environ.get("CSM_HOME")
    return Path(home).expanduser() if home else None


def cache_dir() -> Path:
    """Where quantized weights are cached: ``$CSM_HOME/cache``, else the platform's user cache directory."""
    home = user_home()
    if home:
        return home / "cache"
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("csmcli", appauthor=False))


def load_settings() -> dict[str, Any]:
    """Every loader parameter the environment sets (see the module docstring)."""
    settings: dict[str, Any] = {**cpu_settings(), "cuda_graphs": os.environ.get("CSM_CUDA_GRAPHS", "1") != "0"}
    settings["cache_dir"] = cache_dir()
    if os.environ.get("CSM_MIMI"):
        settings["mimi"] = os.environ["CSM_MIMI"]
    return settings


def load_synthesizer(
    model: str,
    device: str,
    dtype: str,
    show: bool,
    max_batch_size: int = 1,
    quantize: str = "none",
    compile: bool = False,
    threads: int | str | None = "auto",
) -> Synthesizer:
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
            threads=threads,
            voices_home=user_home(),
            **load_settings(),
        )
