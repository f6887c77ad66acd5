"""The hand-written CPU kernel for bfloat16 weights (``bf16kernel.cpp``).

On an AVX2 CPU (no AVX-512 BW/VL, no AVX-NE-CONVERT) oneDNN cannot multiply bfloat16 weights, and
the alternatives either convert them on every call or keep a float32 copy (twice the bytes).  This
kernel reads the bfloat16 weights once per call, widens them in registers and multiplies in float32
with AVX2 + FMA, for one row or a batch's few rows, so a product runs at memory speed; on AVX-512
CPUs without AMX it is also faster than oneDNN's bf16 products (:func:`csmcli.cpu.bf16_kernel`),
and its AVX-512 path multiplies a batch's rows up to twice as fast as AVX2 can, adding in the
same order (the same floats, so the same codes, on either kind of CPU).  It is a small
C++ file compiled with the system's C++ compiler (:mod:`csmcli.ckernels`) and called through ctypes,
or as the ``csmcli::bf16_mm`` operator inside compiled code; without a compiler :func:`kernel`
returns None and callers use torch's kernels.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import ckernels
from .qkernel import Product

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("bf16kernel.cpp")
#: Output rows per packed block.
BLOCK_ROWS = 16
#: The kernel's paths by csmcli.cpu's instruction-set names, as the C code numbers them.
PATHS = {"avx2": 1, "avx512": 2}


def pack(weight: Tensor) -> Tensor:
    """The kernel's layout (see ``bf16kernel.cpp``) of a bfloat16 ``[..., N, K]`` weight (a stack of
    layers keeps its leading dimension): ``[..., blocks, K, 16]`` bfloat16, rows padded to a multiple
    of 16 with zeros, where element ``2j`` of column ``k`` of block ``b`` is ``W[16b + j, k]`` and
    element ``2j + 1`` is ``W[16b + 8 + j, k]``."""
    if weight.dtype != torch.bfloat16:
        raise ValueError(f"the bf16 kernel packs bfloat16 weights, got {weight.dtype}")
    *lead, n, k = weight.shape
    pad = -n % BLOCK_ROWS
    w = torch.nn.functional.pad(weight.detach(), (0, 0, 0, pad)) if pad else weight.detach()
    blocks = (n + pad) // BLOCK_ROWS
    w = w.reshape(*lead, blocks, 2, 8, k)  # [..., block, half h, lane j, column]
    w = w.movedim(-1, -3).transpose(-1, -2)  # [..., block, column, lane j, half h]
    return w.reshape(*lead, blocks, k, BLOCK_ROWS).contiguous()


def _check(x: Tensor, packed: Tensor, out_features: int) -> None:
    blocks, k = -(-out_features // BLOCK_ROWS), x.shape[-1]
    if x.dim() != 2 or packed.shape != (blocks, k, BLOCK_ROWS) or packed.dtype != torch.bfloat16:
        raise ValueError(f"packed weight {tuple(packed.shape)} does not fit {k} inputs and {out_features} outputs")


def _product(lib: ctypes.CDLL, path: int, x: Tensor, packed: Tensor, out_features: int) -> Tensor:
    x, packed = x.float().contiguous(), packed.contiguous()
    rows, k = x.shape
    y = torch.empty(rows, out_features)
    if rows:
        status = lib.csm_bf16_matmul(path, x.data_ptr(), rows, k, packed.data_ptr(), out_features, y.data_ptr())
        if status:
            raise RuntimeError(f"bf16 kernel: {'this CPU cannot run its path' if status == -1 else 'out of memory'}")
    return y


def _bf16_mm(x: Tensor, packed: Tensor, out_features: int, path: int) -> Tensor:
    lib = _library(None)
    if lib is None:
        raise RuntimeError("the bf16 CPU kernel is not built")
    return _product(lib, path, x, packed, out_features)


#: ``csmcli::bf16_mm(x, packed, out_features, path)``: ``x [M, K] @ W.T -> [M, out_features]`` in float32.
ckernels.operator(
    "bf16_mm(Tensor x, Tensor packed, int out_features, int path) -> Tensor",
    _bf16_mm,
    lambda x, packed, out_features, path: x.new_empty(x.shape[0], out_features, dtype=torch.float32),
)


@dataclass(frozen=True)
class Bf16Kernel:
    """The built kernel, bound to one path (``avx2`` or ``avx512``)."""

    lib: ctypes.CDLL
    path: str

    @property
    def name(self) -> str:
        """What csmcli.cpu.prepare_cpu reports for layers using it: ``bf16-avx2`` or ``bf16-avx512``."""
        return f"bf16-{self.path}"

    def matmul(self, x: Tensor, packed: Tensor, out_features: int) -> Tensor:
        """``x [M, K] @ W.T -> [M, out_features]`` in float32, ``W`` as :func:`pack` wrote it.
        Eager calls go straight to the library; compiled code calls ``csmcli::bf16_mm``."""
        _check(x, packed, out_features)
        if torch.compiler.is_compiling():
            return torch.ops.csmcli.bf16_mm(x, packed, out_features, PATHS[self.path])
        return _product(self.lib, PATHS[self.path], x, packed, out_features)

    @property
    def product(self) -> Product:
        """This kernel's product for :class:`csmcli.qkernel.FusedStep` (its path, no argument)."""
        return Product(ctypes.cast(self.lib.csm_bf16_product, ctypes.c_void_p).value, PATHS[self.path])


_ARGTYPES = {
    "csm_bf16_cpu_has": [ctypes.c_int],
    "csm_prefetch_from": [ctypes.c_int],
    "csm_bf16_matmul": [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    + [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p],
}


@functools.cache
def _library(build_dir: Path | None) -> ctypes.CDLL | None:
    return ckernels.load(SOURCE, build_dir, _ARGTYPES)


@functools.cache
def _built(path: str, build_dir: Path | None) -> Bf16Kernel | None:
    lib = _library(build_dir)
    if lib is None:
        return None
    if not lib.csm_bf16_cpu_has(PATHS[path]):
        log.warning("this CPU lacks the instructions of the bf16 kernel's %s path; using torch's kernels", path)
        return None
    return Bf16Kernel(lib, path)


def kernel(isa: str, build_dir: Path | None = None) -> Bf16Kernel | None:
    """The kernel for a CPU offering ``isa`` (csmcli.cpu's names: its AVX-512 path on ``avx512``, its
    AVX2 path on ``avx2``, and on ``avx512`` where this CPU lacks AVX-512F), built on first use; None
    (with one warning where it cannot be built or the CPU lacks AVX2) below AVX2."""
    if isa not in PATHS:
        return None
    lib = _library(build_dir)
    if isa == "avx512" and lib is not None and not lib.csm_bf16_cpu_has(PATHS[isa]):
        isa = "avx2"
    return _built(isa, build_dir)
