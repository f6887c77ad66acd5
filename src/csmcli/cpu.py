"""What this CPU gets: its capabilities, and the matrix kernels the CPU engine uses for each projection.

On a CPU a frame's speed is how fast the weights stream from memory.  Per matrix, the choice is:

* **packed**: weights reordered once into oneDNN's blocked layout
  (``torch.ops.mkldnn._reorder_linear_weight``, what ``torch.compile`` itself uses for frozen CPU
  linears).  Same results as ``F.linear`` and faster for 1 to 8 rows.  bfloat16 packing needs
  AVX-512 (BW/VL/DQ) or AVX-NE-CONVERT; :func:`cpu_caps` probes for it.
* **gemv** (:mod:`csmcli.gemv`, needs a C++ compiler): single rows as a compiled loop reading each
  weight once; used for the wide matrices (``in_features <= 2048``), where it beats packed, and for
  every bfloat16 matrix on CPUs that cannot pack bfloat16.
* **plain**: torch's defaults.
* int8 weights (:class:`~csmcli.quant.Int8Linear`): every product on the W8A8 kernel of
  :mod:`csmcli.qkernel` where it builds, in its own blocked layout, one row or a batch's at memory
  speed, with each transformer step in one call (:func:`fuse_steps`).  Without it, one-slot engines
  keep the plain layout (single rows on the int8 gemv, ``torch._weight_int8pack_mm`` elsewhere) and
  multi-slot engines move every projection to fbgemm's packed layout and dynamically quantized
  linear, which streams int8 weights at memory speed for several rows where
  ``torch._weight_int8pack_mm`` is compute-bound (its activations are quantized with one scale per
  call); compiled engines never use fbgemm, whose weights the compiler cannot read.
* bfloat16 weights: csmcli's bf16 kernel (:mod:`csmcli.bf16kernel`, AVX2 or AVX-512, needs a C++ compiler)
  keeps one re-laid-out bfloat16 copy and serves single rows and a batch's rows at memory speed,
  and each step of both transformers runs in one call around it (:func:`bf16_step`).  It runs on
  every CPU without AMX, those whose oneDNN has bf16 kernels too, where it is faster than them for
  one stream, a batch and prompts alike; with AMX oneDNN's tiles take prompts many times faster.
  Without it single rows take the gemv, and where oneDNN cannot pack bfloat16 multi-slot engines
  pack the weights once as float32 (twice the bytes) rather than converting them on every call.

``cpu_kernels`` picks ``auto`` (gemv where it helps and a compiler works, packed elsewhere),
``packed`` (no compiler) or ``plain``; ``cpu_isa`` limits the choice to what a CPU with a lesser
instruction set gets.  ``scripts/cpu_kernels.py`` times every choice on this machine's shapes.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import bf16kernel, hugepages, qkernel
from .errors import OptionsError
from .gemv import GemvKernels, compiled_gemv, gemv, warm_up
from .model import Transformer, TransformerSpec, held_weights
from .quant import Int4Linear, Int8Linear, int4_step, int8_step, kernel_group, projections

CPU_KERNELS = ("auto", "packed", "plain")
#: Vector instruction-set levels the CPU kernels distinguish, best first; ``avx_vnni`` is AVX2 with
#: AVX-VNNI's 256-bit integer dot products (laptops since Alder Lake, without AVX-512).
CPU_ISAS = ("avx512", "avx_vnni", "avx2", "default")


@dataclass(frozen=True)
class CpuCaps:
    """What this CPU gets: the vector instruction set the kernels target and which bf16 paths run.

    ``bf16_packed``: oneDNN's bfloat16 packed weights and matmuls work (they need AVX-512 BW/VL/DQ
    or AVX-NE-CONVERT); without them bfloat16 weights are read as bfloat16 and multiplied in float32.
    ``native_bf16``: bfloat16 arithmetic in hardware (AVX512-BF16 or AMX); ``amx``: AMX tiles.
    ``vnni``: AVX512-VNNI int8 multiply-adds: fbgemm's int8 products take 8-bit activations
    (without it they saturate, so activations are quantized to 7 bits), and the int4 kernel
    (:mod:`csmcli.qkernel`) takes its fastest path.  ``avx_vnni``: AVX-VNNI, the same instructions
    on 256-bit vectors, which that kernel uses below AVX-512 VNNI.  ``prefetch_rows``: from how many
    activation rows csmcli's kernels prefetch the weights in software (:func:`prefetch_rows`).
    """

    isa: str
    bf16_packed: bool
    native_bf16: bool
    vnni: bool = False
    amx: bool = False
    avx_vnni: bool = False
    prefetch_rows: int = 4

    @property
    def simdlen(self) -> int:
        """Vector width in bits for inductor's C++ code (0: none)."""
        return {"avx512": 512, "avx2": 256}.get(self.isa, 0)


@functools.cache
def detect_cpu_caps() -> CpuCaps:
    """This CPU's capabilities, probed once per process: torch's own vector-ISA choice (which honours
    ``ATEN_CPU_CAPABILITY``), and oneDNN's bfloat16 reorder and product tried on a tiny matrix (they
    raise on CPUs without the instructions they need)."""
    found = torch.backends.cpu.get_cpu_capability().lower()
    isa = found if found in CPU_ISAS else "default"
    packed = False
    if torch.backends.mkldnn.is_available():
        try:
            w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 8, dtype=torch.bfloat16), 1)
            y = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 8, dtype=torch.bfloat16), w, None, "none", [None], "")
            packed = bool(y.float().eq(8).all())
        except RuntimeError:
            packed = False
    amx = isa == "avx512" and torch.cpu._is_amx_tile_supported()
    native = isa == "avx512" and (torch.cpu._is_avx512_bf16_supported() or amx)
    vnni = isa == "avx512" and torch.cpu._is_vnni_supported()
    avx_vnni = isa in ("avx512", "avx2") and "avx_vnni" in _cpu_flags()
    prefetch = prefetch_rows(_cpu_info("vendor_id"))
    return CpuCaps(isa, packed, native, vnni=vnni, amx=amx, avx_vnni=avx_vnni, prefetch_rows=prefetch)


def prefetch_rows(vendor: str) -> int:
    """From how many activation rows csmcli's kernels prefetch their weights on a CPU of ``vendor``:
    every pass on Intel's (a lone row's weights read a quarter faster on a Xeon VM: the hardware
    prefetcher alone left memory idle), and only the compute-bound passes of four rows or more
    elsewhere (on an AMD EPYC the extra requests slowed a lone row)."""
    return 1 if vendor == "GenuineIntel" else 4


def _cpu_info(field: str) -> str:
    """A field of the first processor in Linux's ``/proc/cpuinfo`` (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.split(":")[0].strip() == field), "")
    except OSError:
        return ""


def _cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere: features torch does not probe
    are then taken as absent)."""
    return set(_cpu_info("flags").split())


def cpu_caps(isa: str | None = None) -> CpuCaps:
    """This CPU's capabilities, or those of a CPU with just the ``isa`` instruction set (``avx2``: an
    AVX2 + FMA CPU without AVX-NE-CONVERT, whose oneDNN cannot pack bfloat16; ``avx_vnni``: the same
    with AVX-VNNI), to run the paths such a CPU takes.  Asking for more than the CPU has is a
    one-line :class:`OptionsError`."""
    detected = detect_cpu_caps()
    if isa is None or isa == detected.isa == "avx512":
        return detected
    if isa not in CPU_ISAS:
        raise OptionsError(f"CPU ISA must be one of {', '.join(CPU_ISAS)}, got {isa!r}")
    prefetch = detected.prefetch_rows  # the same memory either way
    if isa == "avx_vnni":
        if not detected.avx_vnni:
            raise OptionsError("CPU ISA avx_vnni requested but this CPU lacks AVX-VNNI")
        return CpuCaps("avx2", bf16_packed=False, native_bf16=False, avx_vnni=True, prefetch_rows=prefetch)
    if CPU_ISAS.index(isa) < CPU_ISAS.index(detected.isa):
        raise OptionsError(f"CPU ISA {isa} requested but this CPU offers {detected.isa} at best")
    return CpuCaps(isa, bf16_packed=False, native_bf16=False, prefetch_rows=prefetch)  # no extensions


# gemv is used for single rows of matrices at least this large with in_features at most GEMV_MAX_IN
GEMV_MIN_ELEMENTS = 1 << 20
GEMV_MAX_IN = 2048


def _simdlen(caps: CpuCaps | None) -> int | None:
    """inductor's own vector width on an AVX-512 CPU; below that the ISA's width, stated (where torch
    was limited by ``ATEN_CPU_CAPABILITY``, inductor's own choice would still be AVX-512 and its
    code would not match torch's kernels: NaNs)."""
    caps = caps or detect_cpu_caps()
    return None if caps.isa == "avx512" else caps.simdlen


def gemv_kernels(dtype: torch.dtype, caps: CpuCaps | None = None) -> GemvKernels | None:
    """The compiled gemv kernels for ``dtype`` models on ``caps``' CPU; None where they cannot be built."""
    return compiled_gemv(dtype, _simdlen(caps))


def warm_up_gemv(dtype: torch.dtype, caps: CpuCaps | None = None) -> None:
    """Start building :func:`gemv_kernels` in the background (e.g. while the weights load)."""
    warm_up(dtype, _simdlen(caps))


def wants_gemv(out_features: int, in_features: int, any_width: bool = False) -> bool:
    """Single rows of this matrix go through the gemv: it is large enough, and (unless ``any_width``:
    bfloat16 without oneDNN's bf16 kernels, where gemv is the only path reading bf16) not too wide."""
    return (any_width or in_features <= GEMV_MAX_IN) and out_features * in_features >= GEMV_MIN_ELEMENTS


@functools.cache
def int8_fbgemm() -> bool:
    """Whether fbgemm's int8 kernels work in this torch (x86 builds; torch marks its quantized
    tensors deprecated, so a later torch may lack them), which eager int8 engines then use: probed
    once on a tiny matrix."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    try:
        layer = Int8Linear(torch.eye(8), torch.float32)
        layer.use_fbgemm(reduce_range=True)
        return bool(torch.allclose(layer(torch.ones(1, 8)), torch.ones(1, 8), atol=0.05))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def _upcasts(dtype: torch.dtype, caps: CpuCaps) -> bool:
    """bfloat16 weights on a CPU without oneDNN's bf16 kernels: several rows are multiplied in float32."""
    return dtype == torch.bfloat16 and not caps.bf16_packed


def bf16_kernel(dtype: torch.dtype, caps: CpuCaps, kernels: str | None = None) -> bf16kernel.Bf16Kernel | None:
    """csmcli's bf16 kernel where ``dtype`` weights are bfloat16, the CPU has no AMX, ``kernels`` is
    ``auto`` and the kernel builds and runs on ``caps``' instruction set; else None."""
    if dtype != torch.bfloat16 or caps.amx or check_cpu_kernels(kernels) != "auto":
        return None
    return bf16kernel.kernel(caps.isa)


def needs_gemv(
    kernels: str | None,
    specs: Iterable[TransformerSpec],
    max_batch: int,
    int8: bool,
    caps: CpuCaps | None = None,
    dtype: torch.dtype = torch.float32,
) -> bool:
    """Whether :func:`prepare_cpu` will want the compiled gemv for transformers shaped like
    ``specs``: ``auto`` kernels, a one-slot engine or int8 weights unless a multi-slot engine runs
    them on fbgemm or the W8A8 kernel, and some projection wide enough.
    Compiling such an engine builds it then (:func:`check_model_compilable`)."""
    caps = caps or cpu_caps()
    upcast = _upcasts(dtype, caps) and not int8
    if int8 and max_batch > 1 and (int8_fbgemm() or w8a8_kernel(check_cpu_kernels(kernels), caps)):
        return False
    if not int8 and bf16_kernel(dtype, caps, kernels) is not None:  # it serves single rows too
        return False
    if check_cpu_kernels(kernels) != "auto" or not (max_batch == 1 or int8):
        return False
    for s in specs:
        for out_f, in_f in (
            (2 * s.ffn_dim, s.dim),
            ((s.n_heads + 2 * s.n_kv_heads) * s.head_dim, s.dim),
            (s.dim, s.ffn_dim),
        ):
            if wants_gemv(out_f, in_f, upcast):
                return True
    return False


class CpuLinear(nn.Module):
    """A bias-free linear layer for the CPU: packed oneDNN weights, plain weights plus gemv, or the bf16 kernel.

    With ``gemv_fn`` (the compiled :func:`~csmcli.gemv.gemv`) the plain ``[out, in]`` weight is kept: single
    rows go through it, several rows (prefill) through ``F.linear``.  Otherwise the weight is packed
    once, unless it is bfloat16 and ``caps`` says oneDNN's bf16 kernels do not run here: then it
    stays plain and products run in float32, or with ``float32`` (multi-slot engines) it is packed
    once as float32, twice the bytes, so that several rows are not converted on every call.
    With ``kernel`` (:func:`bf16_kernel`) bfloat16 weights are kept only in its layout and every
    product runs on it (inside compiled code as the ``csmcli::bf16_mm`` operator).
    A stack of same-shaped layers (``[n, out, in]``, the depth decoder's heads) is one module
    called with the layer's ``index``, as for :class:`~csmcli.quant.Int8Linear`.
    """

    def __init__(
        self,
        weight: Tensor,
        gemv_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        caps: CpuCaps | None = None,
        float32: bool = False,
        kernel: bf16kernel.Bf16Kernel | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape[-2:]
        self.dtype = weight.dtype  # of the outputs
        self.kernel = kernel if weight.dtype == torch.bfloat16 else None
        if self.kernel is not None:
            gemv_fn, float32 = None, False
            weight = bf16kernel.pack(weight)  # [(n,) blocks, in, 16]: the only copy kept
        weight = weight.detach().float().contiguous() if float32 else weight.detach().contiguous()
        self.compute_dtype = weight.dtype
        self.gemv_fn = gemv_fn
        # several rows in float32: bfloat16 weights where oneDNN has no bf16 kernels
        self.upcast = _upcasts(weight.dtype, caps or cpu_caps()) and self.kernel is None
        self.packed_weights = gemv_fn is None and not self.upcast and self.kernel is None
        self.packed: tuple[Tensor, ...] = ()  # a stack's packed weights (opaque tensors cannot be stacked)
        if not self.packed_weights:
            self.weight = weight
        elif weight.dim() == 3:
            self.weight = None
            self.packed = tuple(torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weight)
        else:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1)

    @property
    def gemv(self) -> bool:
        """True when single rows go through the compiled gemv."""
        return self.gemv_fn is not None

    def fused_matrix(self, index: int | None = None) -> qkernel.Matrix | None:
        """The matrix (of a stack: layer ``index``) as fused calls multiply it: on the bf16 kernel
        only, else None."""
        if self.kernel is None:
            return None
        weight = self.weight if index is None else self.weight[index]
        return qkernel.Matrix(self.kernel.product, 0, self.out_features, weight)

    def forward(self, x: Tensor, index: int | None = None) -> Tensor:
        weight = self.weight if index is None else (self.packed or self.weight)[index]
        shape = x.shape
        flat = x.reshape(-1, self.in_features)
        if self.kernel is not None:
            y = self.kernel.matmul(flat, weight, self.out_features).to(self.dtype)
        elif self.gemv_fn is not None and flat.shape[0] == 1:
            y = (gemv if torch.compiler.is_compiling() else self.gemv_fn)(flat.float(), weight)
        elif self.packed_weights:
            flat = flat.to(self.compute_dtype).contiguous()
            y = torch.ops.mkldnn._linear_pointwise(flat, weight, None, "none", [None], "").to(self.dtype)
        elif self.upcast:
            y = F.linear(flat.float(), weight.float()).to(weight.dtype)
        else:
            y = F.linear(flat, weight)
        return y.reshape(*shape[:-1], self.out_features)


_CANNOT_COMPILE = (
    "compiling on the CPU needs quantized weights (--quantize int8 or int4), bf16 on a CPU without AMX, or "
    "CSM_CPU_KERNELS=plain: these float weights are packed for oneDNN, which the compiler cannot read"
)


def check_compilable(
    quantized: bool,
    kernels: str | None = None,
    dtype: torch.dtype = torch.float32,
    caps: CpuCaps | None = None,
    max_batch: int = 1,
) -> None:
    """Before loading: a one-line :class:`OptionsError` if a CPU model with these settings would
    have packed weights, which ``torch.compile`` cannot trace (:func:`check_model_compilable`);
    bf16 weights on the bf16 kernel are not packed, and without it those a CPU cannot pack stay
    plain in one-slot engines and are packed as float32 in multi-slot engines."""
    caps = caps or cpu_caps()
    packed = bf16_kernel(dtype, caps, kernels) is None and (not _upcasts(dtype, caps) or max_batch > 1)
    if not quantized and check_cpu_kernels(kernels) != "plain" and packed:
        raise OptionsError(_CANNOT_COMPILE)


def check_model_compilable(model: nn.Module, caps: CpuCaps | None = None) -> None:
    """The same rule on a prepared model: no :class:`CpuLinear` may hold packed weights.  int8
    layers on fbgemm move to the W8A8 kernel (or the plain layout, with the compiled gemv for the
    single rows of the wide matrices), which the compiler reads, and stay off fbgemm for later
    engines on this model."""
    if any(isinstance(m, CpuLinear) and m.packed_weights for m in model.modules()):
        raise OptionsError(_CANNOT_COMPILE)
    for m in model.modules():
        if isinstance(m, Int8Linear) and not m.traced:
            if m.packed:
                built = gemv_kernels(m.scales.dtype, caps) if wants_gemv(m.out_features, m.in_features) else None
                _int8_kernels(m, w8a8_kernel("auto", caps or cpu_caps()), built)
            m.traced = True


def w8a8_kernel(kernels: str, caps: CpuCaps) -> qkernel.QKernel | None:
    """The W8A8 kernel for int8 weights on ``caps``' instruction set where ``kernels`` is ``auto``
    (as for the compiled gemv it replaces) and it builds; else None."""
    return qkernel.kernel_for(caps.isa, caps.vnni, caps.avx_vnni) if kernels == "auto" else None


def _int8_kernels(layer: Int8Linear, fast: qkernel.QKernel | None, built: GemvKernels | None) -> None:
    """An int8 layer off fbgemm: every product on the W8A8 kernel where it runs, else the plain layout
    with single rows of the wide matrices on the compiled int8 gemv (``built``)."""
    layer.use_kernel(fast)
    wanted = layer.kernel is None and built is not None and wants_gemv(layer.out_features, layer.in_features)
    layer.gemv_fn = built.gemv_int8 if wanted else None


def check_cpu_kernels(name: str | None = None) -> str:
    """``name`` (default ``auto``) if it is a known kernel choice, else a one-line :class:`OptionsError`."""
    name = name or "auto"
    if name not in CPU_KERNELS:
        raise OptionsError(f"CPU kernels must be one of {', '.join(CPU_KERNELS)}, got {name!r}")
    return name


def prepare_int4(model: nn.Module, caps: CpuCaps, kernels: str) -> str:
    """Give every :class:`~csmcli.quant.Int4Linear` its CPU product; returns what it is (``""``
    without int4 layers): ``int4-avx512_vnni`` / ``int4-avx_vnni`` / ``int4-avx2``, the W4A8 kernel of
    :mod:`csmcli.qkernel` for the CPU's instruction set, or ``int4pack``, torch's own int4 kernel
    (``plain`` kernels, no C++ compiler, or a CPU with neither path)."""
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    if not layers:
        return ""
    fast = qkernel.kernel_for(caps.isa, caps.vnni, caps.avx_vnni) if kernels != "plain" else None
    for layer in layers:
        if layer.kernel is not None or layer.packed:  # prepared before
            continue
        if fast is None:
            layer.pack_for_cpu()
        else:
            layer.use_kernel(fast)
    done = {("int4pack" if m.packed else f"int4-{fast.path}") for m in layers}
    return "+".join(sorted(done))


def bf16_step(net: Transformer, kernel: bf16kernel.Bf16Kernel) -> qkernel.FusedStep | None:
    """A :class:`~csmcli.qkernel.FusedStep` over ``kernel``'s products for ``net`` when every
    projection of every layer is an unstacked :class:`CpuLinear` on it and the step's own code
    (:mod:`csmcli.qkernel`'s library, AVX2) builds here; else None."""
    layers = projections(net)
    if not layers or not all(isinstance(p, CpuLinear) and p.kernel is kernel for ps in layers for p in ps):
        return None
    weights = [p.weight for ps in layers for p in ps]
    if any(w.dim() != 3 for w in weights):  # [blocks, in, 16]: one matrix each
        return None
    step_lib = qkernel.kernel("avx2")
    return None if step_lib is None else qkernel.FusedStep(net, step_lib.lib, kernel.product, weights, (0, 0, 0, 0))


def fuse_steps(model: nn.Module) -> None:
    """Each transformer's whole step in one call where its projections allow: on the int4 or the
    W8A8 kernel (:func:`~csmcli.quant.int4_step`, :func:`~csmcli.quant.int8_step`) or the bf16
    kernel (:func:`bf16_step`); else none.  Then a frame's depth-decoder steps in one call where
    they allow (:func:`fuse_depth`)."""
    for net in (model.backbone, model.decoder):
        first = projections(net)[0][0] if net.layers else None
        kernel = getattr(first, "kernel", None)
        if isinstance(kernel, qkernel.QKernel):
            net.fused_step = (int8_step if isinstance(first, Int8Linear) else int4_step)(net, kernel)
        elif isinstance(kernel, bf16kernel.Bf16Kernel):
            net.fused_step = bf16_step(net, kernel)
        else:
            net.fused_step = None
    model.fused_depth = fuse_depth(model)


def fuse_depth(model: nn.Module) -> qkernel.FusedDepth | None:
    """A :class:`~csmcli.qkernel.FusedDepth` for ``model`` when its depth decoder has a fused step and
    its heads and projection are on csmcli's kernels (``fused_matrix``); else None."""
    step, heads = model.decoder.fused_step, model.head_layers
    if step is None or heads is None or not hasattr(heads, "fused_matrix"):
        return None
    matrices = [heads.fused_matrix(i) for i in range(model.num_codebooks - 1)]
    projection = getattr(model.projection, "fused_matrix", lambda: None)()
    if projection is None or any(m is None for m in matrices):
        return None
    embeddings = model.audio_embeddings.weight.detach()
    if embeddings.dtype not in (torch.float32, torch.bfloat16):
        return None
    return qkernel.FusedDepth(step, matrices, projection, embeddings, model.vocab)


def prepare_cpu(model: nn.Module, kernels: str | None = None, max_batch: int = 1, caps: CpuCaps | None = None) -> str:
    """Prepare ``model`` for CPU frames in place, in four stages: each projection on its kernel
    (:func:`use_kernels`, whose result this returns), the weights a frame streams into 2 MiB pages
    (:func:`csmcli.hugepages.adopt`), the fused steps (:func:`fuse_steps`), which hold the
    weights' addresses, then the kernels told from how many rows to prefetch (``caps``)."""
    caps = caps or cpu_caps()
    used = use_kernels(model, check_cpu_kernels(kernels), max_batch, caps)
    hugepages.adopt(t for part, _ in model.frame_parts() for t in held_weights(part))
    fuse_steps(model)
    for lib in kernel_libraries(model):
        lib.csm_prefetch_from(caps.prefetch_rows)
    return used


def kernel_libraries(model: nn.Module) -> set[ctypes.CDLL]:
    """The libraries of csmcli's kernels (:class:`~csmcli.qkernel.QKernel`,
    :class:`~csmcli.bf16kernel.Bf16Kernel`) that ``model``'s layers run on."""
    ours = (qkernel.QKernel, bf16kernel.Bf16Kernel)
    return {k.lib for m in model.modules() if isinstance(k := getattr(m, "kernel", None), ours)}


def use_kernels(model: nn.Module, kernels: str, max_batch: int, caps: CpuCaps) -> str:
    """Swap the model's projections for CPU kernels in place; returns what was used: ``plain``,
    ``bf16-avx2`` or ``bf16-avx512`` (bfloat16 weights on :func:`bf16_kernel`'s path, one row or several), or
    the several-rows path (``packed``; ``linear``: plain float weights; ``float32``: bf16 weights
    multiplied in float32; ``packed-float32``: bf16 weights packed as float32), preceded by
    ``gemv+`` when single rows take the compiled gemv.  Quantized weights' kernels lead it:
    ``int4-<path>`` and ``int8-<path>`` (:mod:`csmcli.qkernel`'s, alone when they serve every
    layer), ``fbgemm`` (int8 layers, every product).

    Float layers become :class:`CpuLinear`; :class:`~csmcli.quant.Int8Linear` layers keep their
    int8 weights; :class:`~csmcli.quant.Int4Linear` layers
    get :func:`prepare_int4`'s product, whose name leads the result.  With ``max_batch > 1`` float
    layers are packed even where gemv would be faster for one row (several rows at once need the packed layout,
    and keeping both would double the weights' memory).  bfloat16 weights go to :func:`bf16_kernel`
    where it runs (every engine, in bfloat16, with :func:`fuse_steps`' whole steps).  Otherwise, on a
    CPU without oneDNN's bf16 kernels (``caps``) they are not packed as bf16: a one-slot engine keeps
    them plain (single rows take the gemv, several rows float32), a multi-slot engine packs them as
    float32 (twice the weights' bytes, as a float32 model; converting them on each call of a batch
    made batch 8 slower than one stream).
    int8 layers move to the W8A8 kernel (:meth:`~csmcli.quant.Int8Linear.use_kernel`) where it
    builds and takes them; to fbgemm
    (:meth:`~csmcli.quant.Int8Linear.use_fbgemm`) in multi-slot engines without the kernel unless
    compiled code reads them; else one-slot engines keep (or return to) the plain layout with the
    gemv for single rows.
    """
    int4 = prepare_int4(model, caps, kernels)
    if kernels == "plain":
        return f"{int4}+plain" if int4 else "plain"
    fast = w8a8_kernel(kernels, caps)
    dtype = model.audio_embeddings.weight.dtype
    packable = torch.backends.mkldnn.is_available() and dtype in (torch.float32, torch.bfloat16)
    upcast = _upcasts(dtype, caps)
    bf16_fast = bf16_kernel(dtype, caps, kernels) if packable else None
    multi_upcast = upcast and max_batch > 1 and bf16_fast is None
    # compile (seconds, once per process) only where some matrix would use the gemv
    int8 = any(isinstance(m, Int8Linear) for m in model.modules())
    # several rows of int8 on fbgemm only where the W8A8 kernel cannot take them: on AVX2 fbgemm is
    # about as fast, but its 7-bit activations with one scale per call lose most of bf16's codes
    fbgemm = int8 and max_batch > 1 and int8_fbgemm()
    specs = (model.backbone.spec, model.decoder.spec)
    built = gemv_kernels(dtype, caps) if needs_gemv(kernels, specs, max_batch, int8, caps, dtype) else None
    use_gemv = built is not None

    def float_gemv(out_features: int, in_features: int):
        wanted = max_batch == 1 and wants_gemv(out_features, in_features, upcast)
        return built.gemv if use_gemv and wanted else None

    def swap(layer: nn.Module) -> nn.Module:
        if isinstance(layer, Int4Linear):  # packed above
            return layer
        if isinstance(layer, Int8Linear):
            layer.upcast = upcast
            if layer.traced:
                return layer
            if fbgemm and (fast is None or not kernel_group(layer.in_features)):
                layer.gemv_fn = None
                layer.use_kernel(None)
                layer.use_fbgemm(reduce_range=not caps.vnni)
            else:
                _int8_kernels(layer, fast, built if use_gemv else None)
            return layer
        if isinstance(layer, CpuLinear):  # prepared before: repack if several rows now need it
            if max_batch > 1 and not layer.packed_weights and layer.kernel is None:
                return CpuLinear(layer.weight, None, caps, float32=layer.upcast)
            return layer
        if not isinstance(layer, nn.Linear) or layer.bias is not None:
            raise TypeError(f"cannot prepare {type(layer).__name__} for the CPU")
        if not packable:  # e.g. float16, or a torch built without oneDNN: torch's defaults
            return layer
        return CpuLinear(layer.weight, float_gemv(*layer.weight.shape), caps, float32=multi_upcast, kernel=bf16_fast)

    for net in (model.backbone, model.decoder):
        for block in net.layers:
            for name in ("wqkv", "wo", "w13", "w2"):
                setattr(block, name, swap(getattr(block, name)))
    model.codebook0_head = swap(model.codebook0_head)
    model.projection = swap(model.projection)
    if model.head_layers is None and packable:
        heads = model.audio_head  # [codebooks - 1, in, out]
        gemv_fn = float_gemv(heads.shape[2], heads.shape[1])
        model.head_layers = CpuLinear(heads.transpose(1, 2), gemv_fn, caps, float32=multi_upcast, kernel=bf16_fast)
        del model.audio_head
        model.register_parameter("audio_head", None)
    elif model.head_layers is not None:
        model.head_layers = swap(model.head_layers)
    if not packable and not int8:
        return "plain"
    prefix = f"{int4}+" if int4 else ""
    int8_layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    if any(m.kernel for m in int8_layers):
        prefix += f"int8-{fast.path}+"
    if any(m.packed for m in int8_layers):
        return prefix + "fbgemm"
    if int8_layers and all(m.kernel for m in int8_layers):
        return prefix.removesuffix("+")
    if not int8 and any(isinstance(m, CpuLinear) and m.kernel is not None for m in model.modules()):
        return prefix + bf16_fast.name
    used = any(getattr(m, "gemv", False) for m in model.modules())
    packed = any(getattr(m, "packed_weights", False) for m in model.modules()) or int8
    rest = "packed" if packed else "float32" if upcast else "linear"  # what several rows run on
    if packed and multi_upcast:
        rest = "packed-float32"
    return prefix + (f"gemv+{rest}" if used else rest)
