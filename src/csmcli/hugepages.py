"""Weights in 2 MiB pages.

A CPU frame streams every projection's weights from memory.  In 4 KiB pages each 4 KiB of that
stream is a TLB miss, and in a virtual machine a miss is a two-level page walk: csmcli's int4 kernel
then read about 60% as fast as from 2 MiB pages.  Linux backs anonymous memory advised
``MADV_HUGEPAGE`` with 2 MiB pages where transparent huge pages are ``always`` or ``madvise`` (the
usual defaults); elsewhere :func:`adopt` leaves everything as it is.
"""

from __future__ import annotations

import ctypes
import mmap
import weakref
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["PAGE", "adopt", "bytes_in_arenas", "supported"]

PAGE = 2 << 20
_ALIGN = 64  # of each tensor in an arena, as torch's own allocator
_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# (start, end, mapping) of each arena :func:`adopt` made; the mapping lives while a tensor uses it
_arenas: list[tuple[int, int, weakref.ref[mmap.mmap]]] = []


def supported() -> bool:
    """True where the kernel gives 2 MiB pages to memory advised to use them."""
    try:
        text = _MODE.read_text()
    except OSError:  # not Linux, or no transparent huge pages
        return False
    return "[never]" not in text and hasattr(mmap, "MADV_HUGEPAGE")


def _arena_of(address: int) -> bool:
    _arenas[:] = [a for a in _arenas if a[2]() is not None]
    return any(start <= address < end for start, end, _ in _arenas)


def _movable(t: object) -> bool:
    """A plain CPU tensor that alone owns its whole storage (not a view of a larger one, not opaque)."""
    if not isinstance(t, Tensor) or t.device.type != "cpu" or t.layout != torch.strided or t.is_mkldnn:
        return False
    if t.is_quantized or not t.is_contiguous() or t.storage_offset():
        return False
    size = t.numel() * t.element_size()
    return size > 0 and t.untyped_storage().nbytes() == size and not _arena_of(t.data_ptr())


def adopt(tensors: Iterable[object]) -> int:
    """Move ``tensors`` into one new mapping advised to use 2 MiB pages, in place (``t.data``): the
    same tensor objects, new memory.  Returns the bytes moved.

    Only plain CPU tensors that own their whole storage move (small ones too: they share the
    mapping's pages); tensors already in such a mapping, views, opaque packed weights and anything
    else stay.
    Tensors sharing one storage move together.  Where the mapping cannot be made or advised,
    nothing moves.  Code that holds a moved tensor's address (a
    :class:`~csmcli.qkernel.FusedStep`) must be built after this."""
    if not supported():
        return 0
    groups: dict[int, list[Tensor]] = {}  # aliases by address
    for t in tensors:
        if _movable(t):
            groups.setdefault(t.data_ptr(), []).append(t)
    if not groups:
        return 0
    sizes = [ts[0].numel() * ts[0].element_size() for ts in groups.values()]
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += -(-size // _ALIGN) * _ALIGN
    try:  # + PAGE: room to align the start
        arena = mmap.mmap(-1, total + PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        arena.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # no address space or no advice taken: the weights stay where they are
        return 0
    start = ctypes.addressof(ctypes.c_char.from_buffer(arena))
    pad = -start % PAGE
    for ts, offset, size in zip(groups.values(), offsets, sizes, strict=True):
        first = ts[0]
        window = (ctypes.c_char * size).from_buffer(arena, pad + offset)  # the tensor's own bytes
        weakref.finalize(window, _release, arena, pad + offset, size).atexit = False
        with torch.inference_mode(first.is_inference()):  # the weights stay what they were
            moved = torch.frombuffer(window, dtype=first.dtype).view(first.shape).copy_(first)
        for alias in ts:  # each alias keeps its own dtype and shape over the same bytes
            alias.data = moved.view(alias.dtype).view(alias.shape) if alias is not first else moved
    _arenas.append((start, start + len(arena), weakref.ref(arena)))
    _trim_heap()  # the old copies went back to malloc, which keeps freed heap memory
    return sum(sizes)


def _release(arena: mmap.mmap, offset: int, size: int) -> None:
    """Give the whole pages of a tensor that died back to the system (the arena lives on while
    others use it): a model that drops weights for another layout does not keep both."""
    lo, hi = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE, (offset + size) // mmap.PAGESIZE * mmap.PAGESIZE
    if hi > lo:
        arena.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _trim_heap() -> None:
    """Return freed heap memory to the system where the C library can (glibc's ``malloc_trim``)."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def bytes_in_arenas(tensors: Iterable[object]) -> int:
    """Bytes of the distinct ``tensors`` that live in a mapping :func:`adopt` made (other objects,
    such as opaque packed weights, count for nothing)."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor) and not t.is_mkldnn}
    return sum(size for address, size in seen.items() if _arena_of(address))
