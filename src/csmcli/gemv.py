"""Single-row matrix products (gemv) as fused multiply-and-sum loops compiled by inductor.

One CSM frame is ~600 matrix-vector products, so on a CPU its speed is how fast the weights stream
from memory.  Written as ``(w * x).sum(-1)``, a product becomes one vectorised C++ loop that reads
each weight once in its own dtype (bfloat16, float32, or int8 with per-channel scales) and
accumulates in float32.  :mod:`csmcli.cpu` decides which matrices use it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)


def gemv(x: Tensor, w: Tensor) -> Tensor:
    """``[1, K] x [N, K] -> [1, N]`` in the weight's dtype, accumulated in float32.

    Callers pass ``x`` already in float32: converting it inside would redo the work for every row.
    """
    return (w.float() * x.float()).sum(-1).to(w.dtype)[None]


def gemv_int8(x: Tensor, w: Tensor, scales: Tensor) -> Tensor:
    """``[1, K] x int8 [N, K] * scales [N] -> [1, N]`` in the scales' dtype, accumulated in float32.

    Callers pass ``x`` already in float32: converting it inside would redo the work for every row.
    """
    return ((w.float() * x.float()).sum(-1) * scales.float()).to(scales.dtype)[None]


@dataclass(frozen=True)
class GemvKernels:
    """The compiled :func:`gemv` and :func:`gemv_int8` for one vector width."""

    gemv: Callable[[Tensor, Tensor], Tensor]
    gemv_int8: Callable[[Tensor, Tensor, Tensor], Tensor]


class _Built:
    """Compiled kernels per vector width, the model dtypes each was checked for, and any failure."""

    kernels: dict[int | None, GemvKernels] = {}
    checked: set[tuple[torch.dtype, int | None]] = set()
    failed = False
    lock = threading.Lock()


def _agrees(k: GemvKernels, dtype: torch.dtype) -> bool:
    with torch.inference_mode():  # the engine's mode: the compiled graphs are reused as is
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 64, generator=g).to(dtype)
        w = torch.randn(256, 64, generator=g).to(dtype)
        q = torch.randint(-127, 128, (256, 64), dtype=torch.int8, generator=g)
        s = (torch.rand(256, generator=g) / 127).to(dtype)  # real scales: outputs of a few units
        tol = 1e-4 if dtype == torch.float32 else 0.1
        ok = torch.allclose(k.gemv(x.float(), w).float(), F.linear(x.float(), w.float()), atol=tol, rtol=1e-2)
        want = F.linear(x.float(), q.float()) * s.float()
        return ok and torch.allclose(k.gemv_int8(x.float(), q, s).float(), want, atol=tol * 10, rtol=1e-2)


def compiled_gemv(dtype: torch.dtype = torch.float32, simdlen: int | None = None) -> GemvKernels | None:
    """The kernels built and checked for ``dtype`` models (once per process and vector width), or
    None with one warning if that is impossible here (no C++ compiler, unsupported platform...).

    ``simdlen``: the vector width in bits inductor targets (None: its own choice for this CPU; a
    smaller one produces the code a lesser CPU runs).
    """
    with _Built.lock:
        if _Built.failed:
            return None
        if (dtype, simdlen) in _Built.checked:
            return _Built.kernels[simdlen]
        try:
            built = _Built.kernels.get(simdlen)
            if built is None:
                options = None if simdlen is None else {"cpp.simdlen": simdlen}
                compile_ = torch.compile
                built = GemvKernels(
                    compile_(gemv, dynamic=True, options=options), compile_(gemv_int8, dynamic=True, options=options)
                )
            if not _agrees(built, dtype):
                raise RuntimeError("compiled gemv disagrees with F.linear")
        except Exception as exc:  # the caller falls back to other kernels
            _Built.failed = True
            log.warning("CPU gemv kernels unavailable (%s); using packed kernels", str(exc).splitlines()[0][:200])
            return None
        _Built.kernels[simdlen] = built
        _Built.checked.add((dtype, simdlen))
        return built


def warm_up(dtype: torch.dtype, simdlen: int | None = None) -> threading.Thread:
    """Build the kernels in the background (a few seconds, more on a cold compile cache), e.g. while
    the weights load; a later :func:`compiled_gemv` waits for it."""
    thread = threading.Thread(target=compiled_gemv, args=(dtype, simdlen), name="csm-gemv-compile", daemon=True)
    thread.start()
    return thread
