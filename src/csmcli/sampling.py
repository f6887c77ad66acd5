"""Batched sampling: temperature, top-k, top-p and a windowed repetition penalty, per row.

Randomness comes from a counter-based hash of (seed, frame, codebook, code) computed with
tensor ops on the model's device, so each row's draws depend only on its own seed: a request
gives the same audio alone or in any batch, nothing is synchronised with the host, and the
whole step can be captured in a CUDA graph.  Reserved codes (>= ``num_codes``) are never drawn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors holding values in [0, 2**32)."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def code_hashes(n: int, device: torch.device) -> Tensor:
    """The per-code half of the hash, ``[n]``: constant, so computed once."""
    idx = torch.arange(n, device=device, dtype=torch.int64)
    return _mix32(idx * 0x9E3779B9 + 0x632BE5AB)


def frame_keys(seed: Tensor, frame: Tensor, codebooks: Tensor | int) -> Tensor:
    """Each row's key for its current frame and each of ``codebooks`` (indices ``[C]``, or one int):
    ``[B, C]`` (``[B, 1]``), a pure function of (seed, frame, codebook).  An engine computes a
    frame's keys for all codebooks at once (a few dozen operations fewer per codebook)."""
    return _mix32(seed[:, None] ^ _mix32(frame[:, None] * 64 + codebooks + 1))


def uniform(key: Tensor, hashes: Tensor) -> Tensor:
    """Uniform floats in (0, 1), one per code hash, a pure function of each row's ``key`` ``[B]``
    (from :func:`frame_keys`).

    ``hashes`` is ``[n]`` (the same codes for every row) or ``[B, n]`` (each row's own codes).
    """
    bits = _mix32(key[:, None] ^ hashes)
    return ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))


@dataclass
class SamplingParams:
    """Per-row sampling settings as device tensors of shape ``[B]``."""

    temperature: Tensor
    top_k: Tensor
    top_p: Tensor
    repetition_penalty: Tensor
    seed: Tensor
    frame: Tensor
    hashes: Tensor

    @classmethod
    def empty(cls, batch: int, device: torch.device, num_codes: int = 2048) -> SamplingParams:
        """Greedy defaults for ``batch`` rows; rows are filled in as requests join."""
        return cls(
            temperature=torch.zeros(batch, device=device),
            top_k=torch.ones(batch, dtype=torch.int64, device=device),
            top_p=torch.ones(batch, device=device),
            repetition_penalty=torch.ones(batch, device=device),
            seed=torch.zeros(batch, dtype=torch.int64, device=device),
            frame=torch.zeros(batch, dtype=torch.int64, device=device),
            hashes=code_hashes(num_codes, device),
        )

    def set_row(self, row: int, temperature: float, top_k: int, top_p: float, penalty: float, seed: int) -> None:
        """Load one request's settings into row ``row`` and reset its frame counter."""
        self.temperature[row] = temperature
        self.top_k[row] = top_k
        self.top_p[row] = top_p
        self.repetition_penalty[row] = penalty
        self.seed[row] = seed
        self.frame[row] = 0


def sample(
    logits: Tensor,
    params: SamplingParams,
    codebook: int,
    num_codes: int,
    recent: Tensor | None = None,
    k_max: int | None = None,
    keys: Tensor | None = None,
    top_p: bool = True,
    greedy: bool = True,
) -> Tensor:
    """Pick one code per row from ``logits`` ``[B, vocab]``.

    ``keys``: the frame's :func:`frame_keys` for every codebook (``[B or more, codebooks]``), or
    None to compute this codebook's here.  ``top_p=False`` / ``greedy=False`` tell that no row
    keeps less than all its top-k mass / takes the argmax, and skip those operations (a third of an
    eager call on a CPU); the codes of the rows that obey are the same.

    ``recent`` (``[B, window]`` codes of this codebook from recent frames, -1 = empty) feeds the
    repetition penalty; None skips it (every row's penalty is 1).  Only the ``k_max`` best codes
    of each row are candidates (None: all codes), so ``k_max`` must be at least every row's
    ``top_k``; the result does not depend on it.  Rows with temperature 0 or top_k 1 take the argmax.
    """
    b = logits.shape[0]
    logits = logits[:, :num_codes].float()
    if recent is not None:
        logits = penalize(logits, recent, params.repetition_penalty[:b])
    scores = logits / params.temperature[:b, None].clamp(min=1e-5)
    k = num_codes if k_max is None else max(1, min(k_max, num_codes))
    ordered, order = scores.topk(k, dim=-1)
    keep = torch.arange(k, device=logits.device)[None] < params.top_k[:b, None]
    if top_p:
        probs = ordered.masked_fill(~keep, float("-inf")).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        mass = params.top_p[:b, None]
        keep = keep & ((mass_before < mass) | (mass >= 1))
    if keys is None:
        keys, codebook = frame_keys(params.seed[:b], params.frame[:b], codebook), 0
    # a slice, not an index: a symbolic codebook then needs no guard on its value (one graph)
    u = uniform(keys[:b, codebook : codebook + 1][:, 0], params.hashes[order])
    gumbel = -torch.log(-torch.log(u))
    pick = (ordered + gumbel).masked_fill(~keep, float("-inf")).argmax(dim=-1, keepdim=True)
    sampled = order.gather(1, pick)[:, 0]
    if not greedy:
        return sampled
    is_greedy = (params.temperature[:b] == 0) | (params.top_k[:b] == 1)
    return torch.where(is_greedy, order[:, 0], sampled)


@dataclass
class FrameSampler:
    """One frame's sampling for rows ``0..B-1``, called as ``(logits, codebook) -> codes``: the rows'
    settings, the frame's :func:`frame_keys` for every codebook, their recent codes ``[rows, window,
    codebooks]`` (None: no row has a penalty), ``k_max`` and which rules apply (see :func:`sample`).
    ``fn`` is :func:`sample` or a compiled form of it; a fused depth decoder
    (:class:`csmcli.qkernel.FusedDepth`) reads the same state and applies the same rules itself."""

    fn: Callable[..., Tensor]
    params: SamplingParams
    keys: Tensor
    recent: Tensor | None
    k_max: int | None
    top_p: bool
    greedy: bool
    num_codes: int

    def __call__(self, logits: Tensor, codebook: int) -> Tensor:
        b = logits.shape[0]
        # a slice, not an index: a symbolic codebook then needs no guard on its value (one graph)
        recent = None if self.recent is None else self.recent[:b, :, codebook : codebook + 1][..., 0]
        return self.fn(
            logits, self.params, codebook, self.num_codes, recent, self.k_max, self.keys, self.top_p, self.greedy
        )


def penalize(logits: Tensor, recent: Tensor, penalty: Tensor) -> Tensor:
    """Divide positive / multiply negative logits of recently used codes (``recent``: ``[B, window]``,
    -1 for none) by the row's penalty."""
    b, n = logits.shape
    seen = torch.zeros(b, n + 1, dtype=torch.bool, device=logits.device)
    seen.scatter_(1, torch.where(recent < 0, n, recent), True)
    seen = seen[:, :n]
    p = penalty[:, None]
    return torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
