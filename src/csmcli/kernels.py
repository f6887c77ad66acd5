"""Matrix products for the CPU engine, chosen per matrix to run near the memory-bandwidth floor.

One CSM frame is ~600 matrix-vector products (the backbone once, the depth decoder 31 times), so
on a CPU its speed is how fast the weights stream from memory.  torch's default ``F.linear`` reaches
about half of this machine's read bandwidth for one row; two better paths, both from torch itself:

* **packed** (no compiler needed): weights reordered once into oneDNN's blocked layout
  (``torch.ops.mkldnn._reorder_linear_weight``, what ``torch.compile`` itself uses for frozen CPU
  linears).  Same results as ``F.linear`` in bfloat16, about 2x its speed for 1 to 8 rows.
* **gemv** (needs a C++ compiler, as ``torch.compile`` on the CPU does): one row as a fused
  multiply-and-sum that inductor turns into a vectorised loop reading each weight once, in the
  weight's own dtype (bfloat16, float32 or int8 with per-channel scales).  Faster again than packed
  on the wide matrices (``in_features <= 2048``); not used for ``in_features`` 8192, where the
  packed / int8 kernels win.

``CSM_CPU_KERNELS`` (or the ``cpu_kernels`` argument) picks: ``auto`` (gemv where it helps and a
compiler works, packed elsewhere), ``packed`` (no compiler), ``plain`` (torch defaults).
``scripts/cpu_kernels.py`` measures every choice on this machine's shapes.
"""

from __future__ import annotations

import logging
import os
import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

CPU_KERNELS = ("auto", "packed", "plain")

# gemv is used for single rows of matrices at least this large with in_features at most _GEMV_MAX_IN
_GEMV_MIN_ELEMENTS = 1 << 20
_GEMV_MAX_IN = 2048


def _gemv(x: Tensor, w: Tensor) -> Tensor:
    """``[1, K] x [N, K] -> [1, N]`` in the weight's dtype, accumulated in float32.

    Callers pass ``x`` already in float32: converting it inside would redo the work for every row.
    """
    return (w.float() * x.float()).sum(-1).to(w.dtype)[None]


def _gemv_int8(x: Tensor, w: Tensor, scales: Tensor) -> Tensor:
    """``[1, K] x int8 [N, K] * scales [N] -> [1, N]`` in the scales' dtype, accumulated in float32.

    Callers pass ``x`` already in float32: converting it inside would redo the work for every row.
    """
    return ((w.float() * x.float()).sum(-1) * scales.float()).to(scales.dtype)[None]


class _Compiled:
    """The compiled gemv functions and which model dtypes they were built and checked for."""

    gemv = None
    gemv_int8 = None
    ready: set[torch.dtype] = set()
    failed = False
    lock = threading.Lock()


def compiled_gemv(dtype: torch.dtype = torch.float32) -> bool:
    """Build and check the gemv kernels for ``dtype`` models (once per process); False with one
    warning if that is impossible here (no C++ compiler, unsupported platform...)."""
    with _Compiled.lock:
        if _Compiled.failed:
            return False
        if dtype in _Compiled.ready:
            return True
        try:
            gemv = _Compiled.gemv or torch.compile(_gemv, dynamic=True)
            gemv_int8 = _Compiled.gemv_int8 or torch.compile(_gemv_int8, dynamic=True)
            with torch.inference_mode():  # the engine's mode: the compiled graphs are reused as is
                x = torch.randn(1, 64).to(dtype)
                w = torch.randn(256, 64).to(dtype)
                q = torch.randint(-127, 128, (256, 64), dtype=torch.int8)
                s = torch.rand(256).to(dtype)
                tol = 1e-4 if dtype == torch.float32 else 0.1
                ok = torch.allclose(gemv(x.float(), w).float(), F.linear(x.float(), w.float()), atol=tol, rtol=1e-2)
                want = F.linear(x.float(), q.float()) * s.float()
                ok = ok and torch.allclose(gemv_int8(x.float(), q, s).float(), want, atol=tol * 10, rtol=1e-2)
            if not ok:
                raise RuntimeError("compiled gemv disagrees with F.linear")
        except Exception as exc:  # fall back to the packed kernels
            _Compiled.failed = True
            log.warning("CPU gemv kernels unavailable (%s); using packed kernels", str(exc).splitlines()[0][:200])
            return False
        _Compiled.gemv, _Compiled.gemv_int8 = gemv, gemv_int8
        _Compiled.ready.add(dtype)
        return True


def warm_up(dtype: torch.dtype) -> threading.Thread:
    """Build the gemv kernels in the background (a few seconds, more on a cold compile cache), e.g.
    while the weights load; :func:`prepare_cpu` waits for it."""
    thread = threading.Thread(target=compiled_gemv, args=(dtype,), name="csm-gemv-compile", daemon=True)
    thread.start()
    return thread


def _wants_gemv(out_features: int, in_features: int) -> bool:
    return in_features <= _GEMV_MAX_IN and out_features * in_features >= _GEMV_MIN_ELEMENTS


def needs_gemv(kernels: str | None, specs, max_batch: int, int8: bool) -> bool:  # noqa: ANN001
    """Whether :func:`prepare_cpu` will want the compiled gemv for transformers shaped like
    ``specs``: ``auto`` kernels, a one-slot engine or int8 weights (whose layout serves both
    kernels), and some projection wide enough."""
    if pick_cpu_kernels(kernels) != "auto" or not (max_batch == 1 or int8):
        return False
    for s in specs:
        if _wants_gemv(2 * s.ffn_dim, s.dim) or _wants_gemv((s.n_heads + 2 * s.n_kv_heads) * s.head_dim, s.dim):
            return True
    return False


class CpuLinear(nn.Module):
    """A bias-free linear layer for the CPU: packed oneDNN weights, or plain weights plus gemv.

    ``gemv`` keeps the plain ``[out, in]`` weight: single rows go through the compiled gemv,
    several rows (prefill) through ``F.linear``.  Otherwise the weight is packed once.  A stack of
    same-shaped layers (``[n, out, in]``, the depth decoder's heads) is one module called with the
    layer's ``index``, as for :class:`~csmcli.quant.Int8Linear`.
    """

    def __init__(self, weight: Tensor, gemv: bool) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape[-2:]
        weight = weight.detach().contiguous()
        self.gemv = gemv
        self.packed: tuple[Tensor, ...] = ()  # a stack's packed weights (opaque tensors cannot be stacked)
        if gemv:
            self.weight = weight
        elif weight.dim() == 3:
            self.weight = None
            self.packed = tuple(torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weight)
        else:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1)

    def forward(self, x: Tensor, index: int | None = None) -> Tensor:
        weight = self.weight if index is None else (self.packed or self.weight)[index]
        shape = x.shape
        flat = x.reshape(-1, self.in_features)
        if self.gemv:
            if flat.shape[0] == 1:
                y = (_gemv if torch.compiler.is_compiling() else _Compiled.gemv)(flat.float(), weight)
            else:
                y = F.linear(flat, weight)
        else:
            y = torch.ops.mkldnn._linear_pointwise(flat.contiguous(), weight, None, "none", [None], "")
        return y.reshape(*shape[:-1], self.out_features)


_CANNOT_COMPILE = (
    "compiling on the CPU needs int8 weights (--quantize int8) or CSM_CPU_KERNELS=plain: "
    "float weights are packed for oneDNN, which the compiler cannot read"
)


def check_compilable(int8: bool, kernels: str | None = None) -> None:
    """Before loading: a one-line :class:`OptionsError` if a CPU model with these settings would
    have packed weights, which ``torch.compile`` cannot trace (:func:`check_model_compilable`)."""
    from .errors import OptionsError

    if not int8 and pick_cpu_kernels(kernels) != "plain":
        raise OptionsError(_CANNOT_COMPILE)


def check_model_compilable(model: nn.Module) -> None:
    """The same rule on a prepared model: no :class:`CpuLinear` may hold packed weights."""
    from .errors import OptionsError

    if any(isinstance(m, CpuLinear) and not m.gemv for m in model.modules()):
        raise OptionsError(_CANNOT_COMPILE)


def pick_cpu_kernels(name: str | None = None) -> str:
    """The kernel choice: ``name``, else ``CSM_CPU_KERNELS``, else ``auto``."""
    from .errors import OptionsError

    name = name or os.environ.get("CSM_CPU_KERNELS") or "auto"
    if name not in CPU_KERNELS:
        raise OptionsError(f"CPU kernels must be one of {', '.join(CPU_KERNELS)}, got {name!r}")
    return name


def prepare_cpu(model: nn.Module, kernels: str | None = None, max_batch: int = 1) -> str:
    """Swap the model's projections for CPU kernels in place; returns what was used.

    Float layers become :class:`CpuLinear`; :class:`~csmcli.quant.Int8Linear` layers keep their
    int8 weights and gain the gemv path for single rows.  With ``max_batch > 1`` float layers are
    packed even where gemv would be faster for one row (several rows at once need the packed layout,
    and keeping both would double the weights' memory).
    """
    from .quant import Int8Linear

    kernels = pick_cpu_kernels(kernels)
    if kernels == "plain":
        return "plain"
    dtype = model.audio_embeddings.weight.dtype
    packable = torch.backends.mkldnn.is_available() and dtype in (torch.float32, torch.bfloat16)
    # compile (seconds, once per process) only where some matrix would use the gemv
    int8 = any(isinstance(m, Int8Linear) for m in model.modules())
    specs = (model.backbone.spec, model.decoder.spec)
    use_gemv = needs_gemv(kernels, specs, max_batch, int8) and compiled_gemv(dtype)

    def float_gemv(out_features: int, in_features: int) -> bool:  # float weights keep one layout
        return use_gemv and max_batch == 1 and _wants_gemv(out_features, in_features)

    def swap(layer: nn.Module) -> nn.Module:
        if isinstance(layer, Int8Linear):
            layer.gemv = use_gemv and _wants_gemv(layer.out_features, layer.in_features)
            return layer
        if isinstance(layer, CpuLinear):  # prepared before: repack if several rows now need it
            return CpuLinear(layer.weight, False) if layer.gemv and max_batch > 1 else layer
        if not isinstance(layer, nn.Linear) or layer.bias is not None:
            raise TypeError(f"cannot prepare {type(layer).__name__} for the CPU")
        if not packable:  # e.g. float16, or a torch built without oneDNN: torch's defaults
            return layer
        return CpuLinear(layer.weight, float_gemv(*layer.weight.shape))

    for net in (model.backbone, model.decoder):
        for block in net.layers:
            for name in ("wqkv", "wo", "w13", "w2"):
                setattr(block, name, swap(getattr(block, name)))
    model.codebook0_head = swap(model.codebook0_head)
    model.projection = swap(model.projection)
    if model.head_layers is None and packable:
        heads = model.audio_head  # [codebooks - 1, in, out]
        model.head_layers = CpuLinear(heads.transpose(1, 2), float_gemv(heads.shape[2], heads.shape[1]))
        del model.audio_head
        model.register_parameter("audio_head", None)
    elif model.head_layers is not None:
        model.head_layers = swap(model.head_layers)
    if not packable and not int8:
        return "plain"
    used = any(getattr(m, "gemv", False) for m in model.modules())
    return "gemv+packed" if used else "packed"
