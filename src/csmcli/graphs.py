"""CUDA graphs of the whole frame: one per batch bucket, replayed instead of launching its kernels.

A frame is a few thousand small kernels; on a GPU launching them costs more than running them.
Recorded once as a graph (static shapes: a bucket's width and the full context length), a frame is
one launch.  Buckets are powers of two up to the engine's slot count, so a batch runs in the
smallest bucket that holds it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def frame_buckets(max_batch: int) -> list[int]:
    """Batch widths that get a graph: 1, 2, 4, ... and ``max_batch`` itself."""
    return sorted({min(2**i, max_batch) for i in range(max_batch.bit_length() + 1)})


def capture_frames(
    frame: Callable[[int], Tensor], buckets: list[int]
) -> tuple[dict[int, torch.cuda.CUDAGraph], dict[int, Tensor]]:
    """Record ``frame(width)`` (which returns the frame's codes) once per bucket, largest first, all
    in one memory pool; each is run twice on a side stream first (warm-up, as CUDA graphs need).
    Returns the graphs and the tensors their replays write the codes to."""
    graphs, outputs = {}, {}
    pool = torch.cuda.graph_pool_handle()
    for b in reversed(buckets):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                frame(b)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs[b] = frame(b)
        graphs[b] = graph
    torch.cuda.synchronize()
    return graphs, outputs


class EagerFrame:
    """A stand-in for a captured frame where there is no CUDA: :meth:`replay` runs the frame eagerly
    and puts its codes where a graph's replay leaves them (``outputs[width]``).  A fresh tensor each
    time: on the CPU the engine hands out views of it, which must not change under earlier frames."""

    def __init__(self, frame: Callable[[int], Tensor], width: int, outputs: dict[int, Tensor]) -> None:
        self.frame, self.width, self.outputs = frame, width, outputs

    def replay(self) -> None:
        """Run the frame for this bucket's width."""
        self.outputs[self.width] = self.frame(self.width)


def eager_frames(frame: Callable[[int], Tensor], buckets: list[int]) -> tuple[dict[int, EagerFrame], dict[int, Tensor]]:
    """What :func:`capture_frames` returns, without CUDA: one :class:`EagerFrame` per bucket, each run
    once.  For testing the graph-shaped path (static widths, the full context length) on a CPU."""
    outputs = {b: frame(b) for b in reversed(buckets)}
    return {b: EagerFrame(frame, b, outputs) for b in buckets}, outputs
