"""csmcli's hand-written CPU kernels for quantized weights (``qkernel.cpp``), built once per machine.

* int4 (W4A8): torch's own CPU int4 product dequantizes every weight to floating point and is
  compute-bound at about two thirds of memory speed for one row, and slower still for several.
  This kernel quantizes the few activation rows to int8 per group and multiplies with the CPU's
  integer dot-product instructions (AVX-512 VNNI, AVX-VNNI or AVX2), so it reads the 4-bit weights at
  memory speed for one row and serves several rows for little more.
* int8 (W8A8, :meth:`QKernel.int8_matmul`): the same activation quantization over int8 weights in
  the same 16-row blocks (:func:`pack_int8`), so that one row reads them at memory speed (the
  float gemv over int8 weights is compute-bound on one core) and 8 rows cost one multiply-add
  instruction per 64 weights and row with VNNI (as fast as fbgemm's packed int8, and inside a
  fused step).
* a whole transformer step (:class:`FusedStep`): norms, RoPE, attention over the cache and SwiGLU in
  C++ around the products of a matrix kernel (this int4 one, or :mod:`csmcli.bf16kernel`), one
  call per step instead of ~30 eager operations per layer.
* a frame's 31 depth-decoder steps (:class:`FusedDepth`): each fused step with its head, sampling
  and the next step's embedding and projection, one call per frame instead of ~30 eager operations
  per step around the fused ones.

All of it lives in one small C++ file, built by :mod:`csmcli.ckernels` and called through ctypes (or, in
compiled code, as torch operators); without a compiler :func:`kernel` returns None and callers use
torch's kernels.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import ckernels

if TYPE_CHECKING:
    from .model import Transformer
    from .sampling import FrameSampler

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("qkernel.cpp")
#: Kernel paths by name, as the C code numbers them.
PATHS = {"avx2": 1, "avx512_vnni": 2, "avx_vnni": 3}
#: Output rows per packed block, and bytes of scales and minimums per block and group.
BLOCK_ROWS = 16
HEADER_BYTES = 64


def path_for(isa: str, vnni: bool, avx_vnni: bool = False) -> str | None:
    """The kernel path for a CPU offering ``isa`` (csmcli.cpu's names), on AVX-512 VNNI, and
    AVX-VNNI; None where no path runs (the caller then uses torch's int4 kernel)."""
    if isa == "avx512" and vnni:
        return "avx512_vnni"
    if isa in ("avx512", "avx2"):
        return "avx_vnni" if avx_vnni else "avx2"
    return None


def packed_bytes(out_features: int, in_features: int, group: int) -> int:
    """Size of :func:`pack`'s output for an ``out_features x in_features`` weight."""
    blocks = -(-out_features // BLOCK_ROWS)
    return blocks * (in_features // group) * (HEADER_BYTES + 8 * group)


def pack(qweight: Tensor, scales: Tensor, mins: Tensor, group: int) -> Tensor:
    """The kernel's layout (see ``qkernel.cpp``) from csmcli's canonical int4 form: ``qweight``
    uint8 ``[N, K/2]`` (low nibble: even column), ``scales`` and ``mins`` ``[N, K/group]``.  Rows
    are padded to a multiple of 16 with zeros.  Returns uint8 ``[blocks, bytes per block]``."""
    n, half = qweight.shape
    k = 2 * half
    if group % 8 or k % group:
        raise ValueError(f"group {group} must divide {k} input features and be a multiple of 8")
    codes = torch.stack((qweight & 15, qweight >> 4), dim=-1).reshape(n, k)
    pad = -n % BLOCK_ROWS
    if pad:
        codes = torch.cat((codes, codes.new_zeros(pad, k)))
        scales = torch.cat((scales, scales.new_zeros(pad, scales.shape[1])))
        mins = torch.cat((mins, mins.new_zeros(pad, mins.shape[1])))
    blocks, groups = (n + pad) // BLOCK_ROWS, k // group
    # [block, row c, group, chunk j, half h, i] with column = group * G + 8 * j + 4 * h + i
    codes = codes.reshape(blocks, BLOCK_ROWS, groups, group // 8, 2, 4)
    codes = codes.permute(0, 2, 3, 1, 5, 4)  # [block, group, chunk, row, i, half]
    data = (codes[..., 0] | (codes[..., 1] << 4)).reshape(blocks, groups, 8 * group)

    def header(t: Tensor) -> Tensor:  # [N, groups] -> [block, group, 16 fp16 as 32 bytes]
        t = t.to(torch.float16).reshape(blocks, BLOCK_ROWS, groups).transpose(1, 2).contiguous()
        return t.view(torch.uint8).reshape(blocks, groups, 2 * BLOCK_ROWS)

    return torch.cat((header(scales), header(mins), data), dim=-1).reshape(blocks, -1).contiguous()


def pack_int8(weight: Tensor, group: int) -> Tensor:
    """The kernel's int8 layout (see ``qkernel.cpp``) of an int8 ``weight`` ``[N, K]``: rows padded
    to a multiple of 16 with zeros; per block and ``group`` of inputs, 16 int32 (-128 times each
    row's sum in the group), then the codes 16 rows by 4 inputs a 64-byte chunk.  Returns uint8
    ``[blocks, bytes per block]``."""
    n, k = weight.shape
    if weight.dtype != torch.int8 or group % 8 or k % group:
        raise ValueError(f"int8 groups of {group} (a multiple of 8) do not divide {k} input columns")
    pad = -n % BLOCK_ROWS
    if pad:
        weight = torch.cat((weight, weight.new_zeros(pad, k)))
    blocks, groups = (n + pad) // BLOCK_ROWS, k // group
    rows = weight.reshape(blocks, BLOCK_ROWS, groups, group)
    offsets = (-128 * rows.sum(dim=-1, dtype=torch.int32)).to(torch.int32).transpose(1, 2).contiguous()
    codes = rows.reshape(blocks, BLOCK_ROWS, groups, group // 4, 4).permute(0, 2, 3, 1, 4)
    data = codes.reshape(blocks, groups, 4 * BLOCK_ROWS * (group // 4)).view(torch.uint8)
    header = offsets.view(torch.uint8).reshape(blocks, groups, HEADER_BYTES)
    return torch.cat((header, data), dim=-1).reshape(blocks, -1).contiguous()


def unpack_int8(packed: Tensor, out_features: int, group: int) -> Tensor:
    """The int8 ``[out_features, K]`` weight :func:`pack_int8` packed with ``group``."""
    blocks = packed.shape[0]
    body = packed.reshape(blocks, -1, HEADER_BYTES + BLOCK_ROWS * group)[..., HEADER_BYTES:]
    groups = body.shape[1]
    codes = body.reshape(blocks, groups, group // 4, BLOCK_ROWS, 4).permute(0, 3, 1, 2, 4)
    return codes.reshape(blocks * BLOCK_ROWS, groups * group)[:out_features].view(torch.int8).contiguous()


def _product(lib: ctypes.CDLL, path: int, x: Tensor, packed: Tensor, out_features: int, group: int) -> Tensor:
    x = x.float().contiguous()
    rows, k = x.shape
    y = torch.empty(rows, out_features)
    if lib.csm_int4_matmul(path, x.data_ptr(), rows, k, group, packed.data_ptr(), out_features, y.data_ptr()):
        raise RuntimeError(f"int4 kernel path {path} cannot run on this CPU")
    return y


def _product8(lib: ctypes.CDLL, path: int, x: Tensor, packed: Tensor, scales: Tensor, group: int) -> Tensor:
    x = x.float().contiguous()
    rows, k = x.shape
    y = torch.empty(rows, scales.shape[0])
    status = lib.csm_int8_matmul(
        path, x.data_ptr(), rows, k, group, packed.data_ptr(), scales.data_ptr(), scales.shape[0], y.data_ptr()
    )
    if status:
        raise RuntimeError(f"int8 kernel path {path} cannot run on this CPU")
    return y


def _built() -> ctypes.CDLL:
    lib = _library(None)
    if lib is None:
        raise RuntimeError("the CPU kernels for quantized weights are not built")
    return lib


def _rows_of(x: Tensor, out_features: int) -> Tensor:
    return x.new_empty(x.shape[0], out_features, dtype=torch.float32)


ckernels.operator(
    "int4_mm(Tensor x, Tensor packed, int out_features, int group, int path) -> Tensor",
    lambda x, packed, n, group, path: _product(_built(), path, x, packed, n, group),
    lambda x, packed, n, group, path: _rows_of(x, n),
)
ckernels.operator(
    "int8_mm(Tensor x, Tensor packed, Tensor scales, int group, int path) -> Tensor",
    lambda x, packed, scales, group, path: _product8(_built(), path, x, packed, scales, group),
    lambda x, packed, scales, group, path: _rows_of(x, scales.shape[0]),
)


@dataclass(frozen=True)
class QKernel:
    """The built kernel, bound to one path (``avx512_vnni``, ``avx_vnni`` or ``avx2``)."""

    lib: ctypes.CDLL
    path: str

    def matmul(self, x: Tensor, packed: Tensor, out_features: int, group: int) -> Tensor:
        """``x [M, K] @ W.T -> [M, out_features]`` in float32, ``W`` as :func:`pack` wrote it (contiguous).
        Eager calls go straight to the library; compiled code calls the operator (``csmcli::int4_mm``)."""
        if torch.compiler.is_compiling():
            return torch.ops.csmcli.int4_mm(x, packed, out_features, group, PATHS[self.path])
        return _product(self.lib, PATHS[self.path], x, packed, out_features, group)

    @property
    def product(self) -> Product:
        """This kernel's int4 product for :class:`FusedStep` (its weights' argument: the input group)."""
        return Product(ctypes.cast(self.lib.csm_int4_matmul, _PTR).value, PATHS[self.path])

    @property
    def int8_product(self) -> Product:
        """This kernel's W8A8 product for :class:`FusedStep`: its weights are :func:`int8_weight`
        pairs, its argument the activation group."""
        return Product(ctypes.cast(self.lib.csm_int8_product, _PTR).value, PATHS[self.path])

    def int8_matmul(self, x: Tensor, packed: Tensor, scales: Tensor, group: int) -> Tensor:
        """``(x [M, K] @ W.T) * scales -> [M, N]`` in float32 for an int8 ``W [N, K]`` as
        :func:`pack_int8` wrote it with ``group``, and float32 ``scales [N]``; activations are
        quantized per row and ``group``."""
        if torch.compiler.is_compiling():
            return torch.ops.csmcli.int8_mm(x, packed, scales, group, PATHS[self.path])
        return _product8(self.lib, PATHS[self.path], x, packed, scales, group)


_INT = ctypes.c_int
_PTR = ctypes.c_void_p


def int8_weight(packed: Tensor, scales: Tensor) -> Tensor:
    """The C ``Int8Weight`` csm_int8_product reads: the addresses of :func:`pack_int8`'s contiguous
    blocks for ``N`` output rows and their float32 ``scales`` ``[N]``, which must outlive it."""
    n = scales.shape[0] if scales.dim() == 1 else -1
    if packed.dtype != torch.uint8 or packed.dim() != 2 or scales.dtype != torch.float32 or n < 0:
        raise ValueError("an int8 weight needs pack_int8's blocks [blocks, bytes] and float32 scales [N]")
    if packed.shape[0] != -(-n // BLOCK_ROWS):
        raise ValueError(f"{packed.shape[0]} blocks of 16 rows do not hold {n} output rows")
    if not (packed.is_contiguous() and scales.is_contiguous()):
        raise ValueError("int8 weights and scales must be contiguous")
    return torch.tensor([packed.data_ptr(), scales.data_ptr()], dtype=torch.int64)


@dataclass(frozen=True)
class Product:
    """A matrix kernel as :class:`FusedStep` calls it: the address of a C function with
    ``csm_int4_matmul``'s signature and the path it is given."""

    address: int
    path: int


@dataclass(frozen=True)
class Matrix:
    """One matrix as a fused call multiplies it: ``product`` with its argument, the output rows, and
    ``weight``, the tensor whose address the product reads (layers give theirs: ``fused_matrix``)."""

    product: Product
    arg: int
    out_features: int
    weight: Tensor


@dataclass(frozen=True)
class StackShape:
    """What ``csm_step`` needs to know of a transformer besides its weights."""

    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float


_ARGTYPES = {
    "csm_int4_cpu_has": [_INT],
    "csm_int4_matmul": [_INT, _PTR, _INT, _INT, _INT, _PTR, _INT, _PTR],
    "csm_int8_matmul": [_INT, _PTR, _INT, _INT, _INT, _PTR, _PTR, _INT, _PTR],
    "csm_step": [_PTR] + [_INT] * 7 + [ctypes.c_float] + [_PTR] * 5 + [_PTR, _INT, _INT, _PTR, _PTR, _INT, _PTR],
    "csm_prefetch_from": [_INT],
    "csm_pair_from": [_INT],
    "csm_sample": [_PTR, _PTR, ctypes.c_int64, _INT, _INT, _PTR],
    "csm_depth": [_PTR, _PTR, _PTR, _INT, _PTR, _INT, _PTR, _PTR, ctypes.c_int64],
}


def _library(build_dir: Path | None) -> ctypes.CDLL | None:
    return ckernels.load(SOURCE, build_dir, _ARGTYPES)


def kernel(path: str | None, build_dir: Path | None = None) -> QKernel | None:
    """The kernel for ``path`` (see :func:`path_for`), built on first use; None with one warning
    when it cannot be built or the CPU lacks the path's instructions."""
    if path is None:
        return None
    lib = _library(build_dir)
    if lib is None:
        return None
    if not lib.csm_int4_cpu_has(PATHS[path]):
        log.warning("this CPU lacks the instructions of the %s kernels for quantized weights; using torch's", path)
        return None
    return QKernel(lib, path)


def kernel_for(isa: str, vnni: bool, avx_vnni: bool = False) -> QKernel | None:
    """The kernel on :func:`path_for`'s path for such a CPU, or on the AVX2 path where the compiler
    that built the library does not know AVX-VNNI (the CPU runs both)."""
    path = path_for(isa, vnni, avx_vnni)
    lib = _library(None) if path == "avx_vnni" else None
    if lib is not None and not lib.csm_int4_cpu_has(PATHS[path]):
        path = "avx2"
    return kernel(path)


class FusedStep:
    """A whole step of ``net`` (a few rows) in one C++ call (``csm_step``): norms, RoPE, attention
    over the cache and SwiGLU around ``product``'s four products per layer, the residual stream in
    float32.  A depth-decoder step's ~120 eager operations cost about as much as its int4 weights
    take to read.  ``weights``: per layer wqkv, wo, w13, w2 in ``product``'s layout, ``args`` the
    four values it gets with them (the same for every layer), ``holds`` what the weights point into.
    :meth:`Transformer.forward` calls it for steps; :func:`csmcli.quant.int4_step`,
    :func:`csmcli.quant.int8_step` and :func:`csmcli.cpu.bf16_step` make one."""

    def __init__(
        self,
        net: Transformer,
        lib: ctypes.CDLL,
        product: Product,
        weights: Sequence[Tensor],
        args: Sequence[int],
        holds: Sequence[Tensor] = (),
    ) -> None:
        s = net.spec
        self.lib, self.product = lib, product
        self.shape = StackShape(s.n_layers, s.dim, s.n_heads, s.n_kv_heads, s.head_dim, s.ffn_dim, s.norm_eps)
        if len(weights) != 4 * s.n_layers or len(args) != 4:
            raise ValueError(f"a step of {s.n_layers} layers needs 4 weights a layer and 4 arguments")
        self.tensors = list(weights)  # the kernel reads these through raw pointers: keep them referenced,
        self.holds = list(holds)  # and what they point into (int8_weight pairs)
        self.norms_f32 = [n.weight.detach().float().contiguous() for b in net.layers for n in (b.attn_norm, b.ffn_norm)]
        self.norms_f32.append(net.norm.weight.detach().float().contiguous())
        self.rope = tuple(t.float().contiguous() for t in net.rope_tables(torch.float32))
        self.weights = (_PTR * len(self.tensors))(*(t.data_ptr() for t in self.tensors))
        self.args = (_INT * 4)(*args)
        self.norms = (_PTR * len(self.norms_f32))(*(t.data_ptr() for t in self.norms_f32))

    def stack(self) -> _Stack:
        """The stack as C code that runs its steps reads it (``csm_depth``: csm_step's arguments
        but the rows and the cache); it points into this object."""
        s = self.shape
        return _Stack(self.product.address, self.product.path, s.n_layers, s.dim, s.n_heads, s.n_kv_heads,
                      s.head_dim, s.ffn_dim, s.norm_eps, ctypes.cast(self.weights, _PTR),
                      ctypes.cast(self.args, _PTR), ctypes.cast(self.norms, _PTR), self.rope[0].data_ptr(),
                      self.rope[1].data_ptr())  # fmt: skip

    def __call__(self, x: Tensor, pos: Tensor, cache: Tensor) -> Tensor:
        """``net(x, pos, cache, ...)`` for rows ``x`` ``[B, T, dim]`` at positions ``pos`` (``[B, T]``),
        each attending to its slot's positions up to its own (the rule of every mask csmcli builds);
        keys and values go into ``cache`` (float32 or bfloat16 ``[layers, 2, B, kv_heads, length,
        head_dim]``, any strides but the last)."""
        if cache.dtype not in (torch.float32, torch.bfloat16) or cache.stride(-1) != 1:
            raise ValueError("the fused step needs a float32 or bfloat16 cache with contiguous rows")
        s, (b, t, d) = self.shape, x.shape
        # the C++ code indexes rows, cache and tables unchecked: anything out of range is an error here
        if d != s.dim or pos.shape != (b, t) or cache.shape[2] < b:
            raise IndexError(f"rows {tuple(x.shape)} do not fit positions {tuple(pos.shape)} and the cache")
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= min(cache.shape[-2], self.rope[0].shape[0])):
            raise IndexError(f"positions {pos.tolist()} are outside the cache ({cache.shape[-2]} positions)")
        rows = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True).view(b * t, d)
        pos = pos.to(torch.int64).contiguous()
        strides = (ctypes.c_int64 * 5)(*cache.stride()[:5])
        status = self.lib.csm_step(
            self.product.address, self.product.path, s.n_layers, s.dim, s.n_heads, s.n_kv_heads, s.head_dim,
            s.ffn_dim, s.norm_eps, self.weights, self.args, self.norms, self.rope[0].data_ptr(),
            self.rope[1].data_ptr(), rows.data_ptr(), b, t, pos.data_ptr(), cache.data_ptr(),
            int(cache.dtype == torch.bfloat16), strides,
        )  # fmt: skip
        if status:
            raise RuntimeError("the fused step's kernels cannot run on this CPU")
        return rows.view(b, t, d).to(x.dtype)


class _Matrix(ctypes.Structure):
    _fields_ = [("product", _PTR), ("path", _INT), ("arg", _INT), ("out_features", _INT), ("weight", _PTR)]

    @classmethod
    def of(cls, m: Matrix) -> _Matrix:
        return cls(m.product.address, m.product.path, m.arg, m.out_features, m.weight.data_ptr())


class _Stack(ctypes.Structure):
    _fields_ = [(name, _PTR if i == 0 else _INT) for i, name in enumerate(
        ("product", "path", "n_layers", "dim", "n_heads", "n_kv", "head_dim", "ffn"))]  # fmt: skip
    _fields_ += [("eps", ctypes.c_float)] + [(name, _PTR) for name in ("weights", "args", "norms", "cos", "sin")]


class _Sampling(ctypes.Structure):
    _fields_ = [(name, _PTR) for name in ("temperature", "top_k", "top_p", "penalty", "keys")]
    _fields_ += [("keys_stride", ctypes.c_int64), ("hashes", _PTR), ("recent", _PTR)]
    _fields_ += [("recent_strides", ctypes.c_int64 * 3)]
    _fields_ += [(name, _INT) for name in ("window", "k", "num_codes", "top_p_rule", "greedy_rule")]


class _Depth(ctypes.Structure):
    _fields_ = [("stack", _Stack), ("heads", _PTR), ("projection", _Matrix), ("embeddings", _PTR)]
    _fields_ += [(name, _INT) for name in ("embeddings_bf16", "embedding_dim", "vocab", "codebooks", "round_bf16")]


def sampling_struct(sampler: FrameSampler, rows: int, codebooks: int) -> _Sampling:
    """``sampler``'s state as the C code reads it (``csm_sample``, ``csm_depth``) for its first ``rows``
    rows and ``codebooks`` codebooks; the tensors must outlive the call."""
    p, keys, recent = sampler.params, sampler.keys, sampler.recent
    settings = (p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.hashes)
    dtypes = (torch.float32, torch.int64, torch.float32, torch.float32, torch.int64)
    if any(t.dtype != d or not t.is_contiguous() or t.is_cuda for t, d in zip(settings, dtypes, strict=True)):
        raise ValueError("sampling settings must be contiguous CPU tensors of their usual dtypes")
    if keys.dtype != torch.int64 or keys.stride(1) != 1 or keys.shape[0] < rows or p.temperature.shape[0] < rows:
        raise ValueError(f"the frame's keys and settings do not cover {rows} rows")
    if recent is not None and (recent.dtype != torch.int64 or recent.shape[0] < rows):
        raise ValueError(f"recent codes must be int64 for at least {rows} rows")
    if keys.shape[1] < codebooks or (recent is not None and recent.shape[2] < codebooks):
        raise ValueError(f"the frame's keys and recent codes do not cover {codebooks} codebooks")
    if sampler.num_codes > p.hashes.shape[0]:
        raise ValueError("fewer code hashes than codes")
    out = _Sampling(*(t.data_ptr() for t in settings[:4]), keys.data_ptr(), keys.stride(0), p.hashes.data_ptr())
    if recent is not None:
        out.recent = recent.data_ptr()
        out.recent_strides = (ctypes.c_int64 * 3)(*recent.stride())
        out.window = recent.shape[1]
    out.k = sampler.num_codes if sampler.k_max is None else sampler.k_max
    out.num_codes, out.top_p_rule, out.greedy_rule = sampler.num_codes, int(sampler.top_p), int(sampler.greedy)
    return out


class FusedDepth:
    """A frame's depth-decoder steps 1..31 in one C++ call (``csm_depth``): each step is ``step``'s
    (:class:`FusedStep`), then the codebook's head (``heads[i - 1]``), sampling by the frame's
    :class:`~csmcli.sampling.FrameSampler` (its rules, in C), the code's row of ``embeddings`` and
    ``projection``, as :meth:`csmcli.model.CSMModel.depth_step` does.  A bfloat16 model
    (``embeddings``' dtype) has its values rounded where that step's tensors are bfloat16, so the
    codes are the eager step's (but for ties within a rounding of the sampling's logarithms and
    exponentials).  :func:`csmcli.cpu.fuse_depth` makes one."""

    def __init__(self, step: FusedStep, heads: Sequence[Matrix], projection: Matrix, embeddings: Tensor, vocab: int):
        s = step.shape
        codebooks = len(heads) + 1
        if embeddings.dtype not in (torch.float32, torch.bfloat16) or not embeddings.is_contiguous():
            raise ValueError("the embeddings must be a contiguous float32 or bfloat16 table")
        if embeddings.shape[0] != codebooks * vocab or projection.out_features != s.dim:
            raise ValueError(f"{codebooks} codebooks' embeddings and projection do not fit the depth decoder")
        if len({m.out_features for m in heads}) != 1:
            raise ValueError("the heads must all give the same logits")
        if step.rope[0].shape[0] < codebooks:
            raise ValueError("the depth decoder's RoPE tables are shorter than a frame's steps")
        self.lib, self.step, self.codebooks = step.lib, step, codebooks
        self.matrices = [*heads, projection]  # what the structure's addresses point into
        self.embeddings = embeddings
        self.heads = (_Matrix * len(heads))(*(_Matrix.of(m) for m in heads))
        bf16 = int(embeddings.dtype == torch.bfloat16)
        self.depth = _Depth(step.stack(), ctypes.cast(self.heads, _PTR), _Matrix.of(projection), embeddings.data_ptr(),
                            bf16, embeddings.shape[1], vocab, codebooks, bf16)  # fmt: skip

    def sample(self, logits: Tensor, sampler: FrameSampler, codebook: int) -> Tensor:
        """:func:`csmcli.sampling.sample`'s codes for ``logits`` ``[B, vocab]`` (float32 or bfloat16,
        rows contiguous) in C (``csm_sample``), as the steps sample."""
        b = logits.shape[0]
        logits = logits.float()
        if logits.stride(1) != 1 or logits.shape[1] < sampler.num_codes:
            raise ValueError("logits must be rows with every code, each contiguous")
        codes = torch.empty(b, dtype=torch.int64)
        sampling = sampling_struct(sampler, b, codebook + 1)
        self.lib.csm_sample(ctypes.byref(sampling), logits.data_ptr(), logits.stride(0), b, codebook, codes.data_ptr())
        return codes

    def __call__(self, x: Tensor, cache: Tensor, first: Tensor, sampler: FrameSampler) -> Tensor:
        """Every codebook's codes ``[B, codebooks]`` from step 1's rows ``x`` ``[B, 2, dim]`` (the backbone
        state and the first code's embedding, projected), with ``first`` (``[B]``) as codebook 0's;
        the cache as :meth:`FusedStep.__call__` takes it."""
        b = x.shape[0]
        if cache.dtype not in (torch.float32, torch.bfloat16) or cache.stride(-1) != 1:
            raise ValueError("the fused depth decoder needs a float32 or bfloat16 cache with contiguous rows")
        if x.shape[1:] != (2, self.step.shape.dim) or cache.shape[2] < b or cache.shape[-2] < self.codebooks:
            raise IndexError(f"rows {tuple(x.shape)} do not fit the depth decoder's cache")
        if sampler.num_codes > self.heads[0].out_features:
            raise IndexError(f"the heads give {self.heads[0].out_features} logits, not {sampler.num_codes}")
        rows = x.to(torch.float32, memory_format=torch.contiguous_format)
        codes = torch.empty(b, self.codebooks, dtype=torch.int64)
        codes[:, 0] = first
        sampling = sampling_struct(sampler, b, self.codebooks)
        strides = (ctypes.c_int64 * 5)(*cache.stride()[:5])
        status = self.lib.csm_depth(
            ctypes.byref(self.depth), ctypes.byref(sampling), rows.data_ptr(), b, cache.data_ptr(),
            int(cache.dtype == torch.bfloat16), strides, codes.data_ptr(), codes.stride(0),
        )  # fmt: skip
        if status:
            raise RuntimeError("the fused depth decoder's kernels cannot run on this CPU")
        return codes
