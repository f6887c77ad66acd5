"""Building csmcli's hand-written C++ CPU kernels (``*.cpp`` beside this file), once per machine.

Each source is compiled with the system's C++ compiler (the one ``torch.compile`` uses) into a
shared library named by a digest of the source, the compiler and torch's version, and loaded with
ctypes after torch, so its OpenMP pragmas bind to torch's OpenMP runtime and thread count.  Without
a compiler :func:`load` returns None and logs one warning; callers then use torch's own kernels.
:func:`operator` makes a kernel a ``csmcli::`` torch operator, which compiled code can call.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_lock = threading.Lock()
#: Per source: the loaded library, or the one-line reason it could not be built.
_loaded: dict[Path, ctypes.CDLL | str] = {}


def default_build_dir() -> Path:
    """Where compiled libraries are kept between runs when the caller names no directory."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"csmcli-kernels-{uid}"


def _compiler() -> str | None:
    return next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)


def _build(source: Path, build_dir: Path) -> ctypes.CDLL:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found")
    text = source.read_bytes()
    digest = hashlib.sha256(text + compiler.encode() + torch.__version__.encode()).hexdigest()[:16]
    target = build_dir / f"{source.stem}-{digest}.so"
    if not target.exists():
        build_dir.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        cmd = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-fno-math-errno", str(source)]
        done = subprocess.run([*cmd, "-o", str(tmp)], capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise RuntimeError(f"{compiler} failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:200]}")
        os.replace(tmp, target)
    return ctypes.CDLL(str(target))


def load(source: Path, build_dir: Path | None = None, argtypes: dict[str, list] | None = None) -> ctypes.CDLL | None:
    """The library built from ``source`` (compiled on first use in this process, or found from an
    earlier run), its functions given ``argtypes`` (name: ctypes argument types) once; None, with
    one warning per source and process, when it cannot be built."""
    with _lock:
        if source not in _loaded:
            try:
                lib = _build(source, build_dir or default_build_dir())
                for name, types in (argtypes or {}).items():
                    getattr(lib, name).argtypes = types
                _loaded[source] = lib
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                _loaded[source] = str(exc).splitlines()[0][:200]
                log.warning("CPU kernel %s unavailable (%s); using torch's kernels", source.stem, _loaded[source])
        found = _loaded[source]
    return found if isinstance(found, ctypes.CDLL) else None


#: The ``csmcli::`` operators (one library per namespace).
_OPS = torch.library.Library("csmcli", "DEF")


def operator(schema: str, impl: Callable[..., Tensor], shape: Callable[..., Tensor]) -> None:
    """Register ``csmcli::<schema>`` with the CPU implementation ``impl`` and ``shape`` (its output
    for the compiler's fake tensors), so that ``torch.compile`` keeps a kernel as one call in its
    graphs (a ctypes call cannot be traced).  The plain operator API: its dispatch costs about a
    microsecond, ``torch.library.custom_op``'s several, and a frame makes hundreds of calls."""
    name = schema.split("(", 1)[0]
    _OPS.define(schema)
    _OPS.impl(name, impl, "CPU")
    torch.library.register_fake(f"csmcli::{name}", shape, lib=_OPS)
