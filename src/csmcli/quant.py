"""Weight-only quantization of CSM's linear layers: int8 (per output channel, symmetric) and int4
(groups of input columns, asymmetric).

int8: on the CPU the plain layout runs on torch's own int8 weight kernel
(``torch._weight_int8pack_mm``, the one gpt-fast uses), single rows of the wide matrices through
the compiled int8 gemv of :mod:`csmcli.gemv`, and prompts dequantized on the fly.  Multi-slot
eager engines move every projection into fbgemm's packed int8 layout (:meth:`Int8Linear.use_fbgemm`),
whose dynamically quantized linear reads the int8 weights at memory speed for a batch's rows too,
where ``_weight_int8pack_mm`` is compute-bound.

int4 (:class:`Int4Linear`): the canonical form is :func:`quantize_int4_weight`'s; on the CPU the
products run on csmcli's W4A8 kernel (:mod:`csmcli.qkernel`) or, where it cannot run, torch's
CPU int4 kernel (``_weight_int4pack_mm_for_cpu``); elsewhere the weights are dequantized on the
fly.  ``--quantize int4`` keeps the layers named in :data:`INT4_KEEP_INT8` at int8 (chosen with
``scripts/quant_fidelity.py``).

Embeddings stay in the model's dtype.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gemv import gemv_int8
from .model import CSMModel, Transformer
from .qkernel import FusedStep, Matrix, QKernel, int8_weight, pack, pack_int8, unpack_int8

# from this many rows on (prefill), CPU products dequantize the weight and use the float GEMM
DEQUANTIZE_ROWS = 32

QUANTIZATIONS = ("none", "int8", "int4")
#: int4 group size (input columns sharing a scale and minimum); see scripts/cpu_kernels.py and
#: scripts/quant_fidelity.py for the measurements behind it
INT4_GROUP = 64
INT4_GROUPS = (32, 64, 128)
#: the parts of the model that ``--quantize int4`` keeps at int8 (names from :data:`PARTS`)
INT4_KEEP_INT8 = ("codebook0_head", "projection", "heads")
#: the quantized parts: the two transformers' projections, the first codebook's head, the
#: backbone-to-decoder projection and the depth decoder's per-codebook heads
PARTS = ("backbone", "decoder", "codebook0_head", "projection", "heads")
PROJECTIONS = ("wqkv", "wo", "w13", "w2")


class Int8Linear(nn.Module):
    """``y = x @ (q * scale).T`` with ``q`` int8 ``[out, in]`` and one scale per output channel.

    A stack of same-shaped layers (``[n, out, in]``: the depth decoder's per-codebook heads) is one
    module called with the layer's ``index``, so compiled code indexes a tensor (one graph serves
    every codebook) rather than picking a module (one graph per codebook).

    The weights live in one of three layouts, never two at once (memory): the plain ``weight``
    buffer; after :meth:`use_kernel` csmcli's W8A8 kernel's blocks (``kernel_weights``); or after
    :meth:`use_fbgemm` fbgemm's packed matrices (``weight`` is None in the last two).  Numerics:
    the plain kernels multiply the activations as they are (bf16 or float32) and accumulate in
    float32; the W8A8 kernel quantizes each row's activations to 8 bits per group of
    :func:`kernel_group` columns (a row's result does not depend on the others); fbgemm quantizes
    them to 8 bits (7 with ``reduce_range``) with one scale and zero point per call, i.e. shared by
    all rows of a batch (a stream's result depends slightly on the others).  Both accumulate in
    int32; ``scripts/int8_kernels_fidelity.py`` measures what that costs against bf16.
    """

    def __init__(self, weight: Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        w = weight.detach().float().contiguous()
        scales = w.abs().amax(dim=-1).clamp(min=1e-8) / 127.0
        self.register_buffer("weight", (w / scales[..., None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(dtype))
        self.out_features, self.in_features = w.shape[-2:]
        # set by cpu.prepare_cpu: single rows through this compiled int8 gemv, and prompt rows in
        # float32 (bfloat16 models on a CPU without oneDNN's bf16 kernels)
        self.gemv_fn = None
        self.upcast = False
        self.packed: tuple = ()  # fbgemm's packed weights, one per stacked layer (use_fbgemm)
        self.reduce_range = False
        self.traced = False  # compiled code reads these weights: they stay out of fbgemm's opaque layout
        self.kernel: QKernel | None = None  # use_kernel: csmcli's W8A8 kernel on its own blocks
        self.kernel_weights: Tensor | None = None
        self.kernel_group = 0
        self.kernel_scales: Tensor | None = None

    @classmethod
    def from_quantized(cls, weight: Tensor, scales: Tensor) -> Int8Linear:
        """The layer holding already quantized ``weight`` (int8) and ``scales`` (the model's dtype)."""
        layer = cls(torch.empty(weight.shape, device="meta"), scales.dtype)
        layer.weight, layer.scales = weight, scales
        return layer

    @property
    def gemv(self) -> bool:
        """True when single rows go through the compiled int8 gemv."""
        return self.gemv_fn is not None

    def use_kernel(self, kernel: QKernel | None) -> None:
        """Run every product on ``kernel``'s W8A8 product (activations quantized to int8 per row and
        group of :func:`kernel_group` columns: about 0.6% relative error per product, at memory speed
        for one row, and with VNNI for a batch's), on its blocks (:func:`~csmcli.qkernel.pack_int8`), which
        replace the plain weights; None, or a width no group divides, returns to the plain layout."""
        group = kernel_group(self.in_features) if kernel is not None else None
        if self.kernel is not None and kernel == self.kernel and group == self.kernel_group:
            return
        self.use_plain()
        if not group:
            return
        w = self.weight
        packed = [pack_int8(m, group) for m in w] if w.dim() == 3 else [pack_int8(w, group)]
        self.kernel_weights = torch.stack(packed) if w.dim() == 3 else packed[0]
        self.kernel, self.kernel_group = kernel, group
        self.kernel_scales = self.scales.float().contiguous()
        self.weight = None

    def use_fbgemm(self, reduce_range: bool) -> None:
        """Move the weights into fbgemm's packed layout (the plain buffer is dropped).

        ``reduce_range``: quantize activations to 7 bits, which CPUs without VNNI need (their int8
        multiply-add saturates in 16 bits with full-range activations)."""
        self.reduce_range = reduce_range
        if self.packed:
            return
        self.use_plain()
        stack = self.weight if self.weight.dim() == 3 else self.weight[None]
        scales = self.scales.reshape(stack.shape[0], -1).double()
        zeros = torch.zeros(stack.shape[1], dtype=torch.long)
        with warnings.catch_warnings():  # torch marks its quantized tensors deprecated
            warnings.simplefilter("ignore")
            self.packed = tuple(
                torch.ops.quantized.linear_prepack(torch._make_per_channel_quantized_tensor(w, s, zeros, 0), None)
                for w, s in zip(stack, scales, strict=True)
            )
        self.weight = None

    def use_plain(self) -> None:
        """Back to the plain int8 buffer (what the compiled gemv reads): the exact weights the other
        layouts took."""
        if self.packed:
            stack = [torch.ops.quantized.linear_unpack(p)[0].int_repr() for p in self.packed]
            self.weight = torch.stack(stack) if self.scales.dim() == 2 else stack[0]
            self.packed = ()
        if self.kernel_weights is not None:
            blocks, n, g = self.kernel_weights, self.out_features, self.kernel_group
            stack = blocks if blocks.dim() == 3 else blocks[None]
            plain = [unpack_int8(b, n, g) for b in stack]
            self.weight = torch.stack(plain) if blocks.dim() == 3 else plain[0]
            self.kernel_weights = None
        self.kernel, self.kernel_group, self.kernel_scales = None, 0, None

    def fused_matrix(self, index: int | None = None) -> Matrix | None:
        """The matrix (of a stack: layer ``index``) as fused calls multiply it: on the W8A8 kernel
        only, else None."""
        if self.kernel is None:
            return None
        blocks, scales = (self.kernel_weights, self.kernel_scales) if index is None else (
            self.kernel_weights[index], self.kernel_scales[index])  # fmt: skip
        return Matrix(self.kernel.int8_product, self.kernel_group, self.out_features, int8_weight(blocks, scales))

    def forward(self, x: Tensor, index: int | None = None) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).contiguous()
        if self.packed:
            scales = self.scales
            packed = self.packed[0 if index is None else index]
            y = torch.ops.quantized.linear_dynamic(flat.float(), packed, self.reduce_range).to(scales.dtype)
            return y.reshape(*shape[:-1], self.out_features)
        if self.kernel is not None:
            blocks, scales = (self.kernel_weights, self.kernel_scales) if index is None else (
                self.kernel_weights[index], self.kernel_scales[index])  # fmt: skip
            y = self.kernel.int8_matmul(flat, blocks, scales, self.kernel_group).to(self.scales.dtype)
            return y.reshape(*shape[:-1], self.out_features)
        weight, scales = (self.weight, self.scales) if index is None else (self.weight[index], self.scales[index])
        if self.gemv_fn is not None and flat.shape[0] == 1:
            gemv = gemv_int8 if torch.compiler.is_compiling() else self.gemv_fn
            y = gemv(flat.float(), weight, scales)
        elif flat.device.type == "cpu" and flat.shape[0] < DEQUANTIZE_ROWS:
            y = torch._weight_int8pack_mm(flat, weight, scales)
        elif self.upcast:  # prompts on a CPU without bfloat16 matmuls
            y = (nn.functional.linear(flat.float(), weight.float()) * scales.float()).to(scales.dtype)
        else:  # GPUs, and prompts on the CPU (compute-bound: the float GEMM is faster there)
            y = nn.functional.linear(flat, weight.to(flat.dtype)) * scales
        return y.reshape(*shape[:-1], self.out_features)


def kernel_group(in_features: int) -> int | None:
    """Activation group of the W8A8 kernel for a matrix with ``in_features`` columns: 128, or 64 for
    narrow test models; None where neither divides them."""
    return next((g for g in (128, 64) if in_features % g == 0), None)


def quantize_int4_weight(w: Tensor, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """The canonical int4 form of ``w`` (``[..., N, K]``, K divisible by ``group``).

    Per output row and each run of ``group`` input columns, asymmetric: ``scale = (max - min) / 15``,
    ``q = round((w - min) / scale)`` in 0..15, so ``w ~ q * scale + min``.  Returns ``qweight``
    (uint8 ``[..., N, K/2]``: byte j holds ``q[2j]`` in its low nibble and ``q[2j+1]`` in its high
    nibble) and ``scales``, ``mins`` (float32 ``[..., N, K/group]``).
    """
    *lead, n, k = w.shape
    if group not in INT4_GROUPS or k % group:
        raise ValueError(f"int4 groups of {group} do not divide {k} input columns (groups: {INT4_GROUPS})")
    g = w.detach().float().reshape(*lead, n, k // group, group)
    mins = g.amin(dim=-1)
    scales = ((g.amax(dim=-1) - mins) / 15).clamp(min=1e-8)
    q = ((g - mins[..., None]) / scales[..., None]).round_().clamp_(0, 15).to(torch.uint8).reshape(*lead, n, k)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous(), scales, mins


def unpack_int4(qweight: Tensor) -> Tensor:
    """The 4-bit codes of a canonical ``qweight``: uint8 ``[..., N, K]`` in 0..15."""
    return torch.stack([qweight & 15, qweight >> 4], dim=-1).reshape(*qweight.shape[:-1], -1)


def dequantize_int4(qweight: Tensor, scales: Tensor, mins: Tensor) -> Tensor:
    """``q * scale + min`` for a canonical int4 weight: float32 ``[..., N, K]``."""
    q = unpack_int4(qweight)
    *lead, n, k = q.shape
    groups = scales.shape[-1]
    w = q.reshape(*lead, n, groups, k // groups).float() * scales[..., None] + mins[..., None]
    return w.reshape(*lead, n, k)


def int4_group(in_features: int, group: int = INT4_GROUP) -> int | None:
    """The group size for a matrix with ``in_features`` columns: ``group``, halved while it does not
    divide them (small test models); None where no allowed group does (the layer stays int8)."""
    while group >= INT4_GROUPS[0]:
        if in_features % group == 0:
            return group
        group //= 2
    return None


class Int4Linear(nn.Module):
    """``y = x @ W.T`` with ``W`` held as 4-bit codes (the canonical form of :func:`quantize_int4_weight`).

    Stacks of layers (``[n, out, in]``) are called with ``index`` as :class:`Int8Linear` is.  Which
    form it holds depends on the backend :func:`csmcli.cpu.prepare_cpu` picks:

    * canonical (``qweight``, ``scales``, ``mins``): dequantized on the fly (GPUs, other devices);
    * :meth:`pack_for_cpu`: torch's CPU int4 layout (``packed``, ``scales_zeros``; the canonical
      tensors are freed), every product on ``_weight_int4pack_mm_for_cpu`` in bfloat16;
    * :meth:`use_kernel`: csmcli's W4A8 CPU kernel (:class:`csmcli.qkernel.QKernel`) for every
      product, on its own packed copy (``kernel_weights``, ``[n, ...]`` for a stack); the canonical
      tensors are freed.
    """

    def __init__(self, qweight: Tensor, scales: Tensor, mins: Tensor) -> None:
        super().__init__()
        if scales.shape != mins.shape or qweight.shape[:-1] != scales.shape[:-1] or qweight.dtype != torch.uint8:
            raise ValueError("int4 weight, scales and minimums do not fit together")
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales.float())
        self.register_buffer("mins", mins.float())
        self.out_features, self.in_features = qweight.shape[-2], 2 * qweight.shape[-1]
        self.group = self.in_features // scales.shape[-1]
        self.stacked = qweight.dim() == 3
        self.packed: tuple[Tensor, ...] = ()  # torch's CPU layout, one per layer of a stack
        self.scales_zeros: Tensor | None = None
        self.kernel: QKernel | None = None
        self.kernel_weights: Tensor | None = None

    @classmethod
    def from_weight(cls, weight: Tensor, group: int = INT4_GROUP) -> Int4Linear:
        """Quantize a float ``weight`` (``[out, in]`` or a stack ``[n, out, in]``)."""
        return cls(*quantize_int4_weight(weight, group))

    def canonical(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(qweight, scales, mins)``, or None once :meth:`pack_for_cpu` freed them."""
        return None if self.qweight is None else (self.qweight, self.scales, self.mins)

    def pack_for_cpu(self) -> None:
        """Repack into torch's CPU int4 layout and free the canonical tensors.

        torch's kernel wants ``w = (q - 8) * scale + zero``, so ``zero = min + 8 * scale``, and output
        rows in multiples of 16 (zero rows pad the heads' 2051)."""
        if self.packed:
            return
        pad = -self.out_features % 16
        codes = unpack_int4(self.qweight).to(torch.int32)
        stack = codes if self.stacked else codes[None]
        convert = torch.ops.aten._convert_weight_to_int4pack_for_cpu
        self.packed = tuple(convert(F.pad(m, (0, 0, 0, pad)), 1) for m in stack)
        sz = torch.stack([self.scales, self.mins + 8 * self.scales], dim=-1)  # [..., N, K/G, 2]
        self.scales_zeros = F.pad(sz, (0, 0, 0, 0, 0, pad)).transpose(-3, -2).to(torch.bfloat16).contiguous()
        self.qweight = self.scales = self.mins = None

    def use_kernel(self, kernel: QKernel) -> None:
        """Run every product on ``kernel``, which gets its own packed copy; the canonical tensors are freed."""
        if self.kernel is not None:
            return
        canon = (self.qweight, self.scales, self.mins)
        if self.stacked:
            self.kernel_weights = torch.stack([pack(*(p[i] for p in canon), self.group) for i in range(len(canon[0]))])
        else:
            self.kernel_weights = pack(*canon, self.group)
        self.kernel = kernel
        self.qweight = self.scales = self.mins = None

    def fused_matrix(self, index: int | None = None) -> Matrix | None:
        """The matrix (of a stack: layer ``index``) as fused calls multiply it: on the kernel only, else None."""
        if self.kernel is None:
            return None
        packed = self.kernel_weights if index is None else self.kernel_weights[index]
        return Matrix(self.kernel.product, self.group, self.out_features, packed)

    def forward(self, x: Tensor, index: int | None = None) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if self.kernel is not None:
            packed = self.kernel_weights if index is None else self.kernel_weights[index]
            y = self.kernel.matmul(flat, packed, self.out_features, self.group).to(flat.dtype)
        elif self.packed:
            sz = self.scales_zeros if index is None else self.scales_zeros[index]
            rows = flat.to(torch.bfloat16).contiguous()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed[index or 0], self.group, sz)
            y = y[:, : self.out_features].to(x.dtype)
        else:
            parts = (self.qweight, self.scales, self.mins)
            w = dequantize_int4(*(parts if index is None else (p[index] for p in parts)))
            y = F.linear(flat, w.to(flat.dtype))
        return y.reshape(*shape[:-1], self.out_features)


def projections(net: Transformer) -> list[list[nn.Module]]:
    """Each block's projections, in :data:`PROJECTIONS` order."""
    return [[getattr(block, a) for a in PROJECTIONS] for block in net.layers]


def int4_step(net: Transformer, kernel: QKernel) -> FusedStep | None:
    """A :class:`~csmcli.qkernel.FusedStep` over ``kernel``'s int4 products for ``net`` when every
    projection of every layer is an unstacked :class:`Int4Linear` on ``kernel`` with the same groups
    layer to layer; else None."""
    layers = projections(net)
    ok = layers and all(isinstance(p, Int4Linear) and p.kernel == kernel and not p.stacked for ps in layers for p in ps)
    groups = _step_args(layers, "group") if ok else None
    if groups is None:
        return None
    weights = [p.kernel_weights for ps in layers for p in ps]
    return FusedStep(net, kernel.lib, kernel.product, weights, groups)


def _step_args(layers: list[list[nn.Module]], attr: str) -> list[int] | None:
    """Each projection's ``attr`` (its product's argument in a fused step), when every layer has the
    same ones; else None."""
    args = [getattr(p, attr) for p in layers[0]]
    return args if all([getattr(p, attr) for p in ps] == args for ps in layers) else None


def int8_step(net: Transformer, kernel: QKernel) -> FusedStep | None:
    """A :class:`~csmcli.qkernel.FusedStep` over ``kernel``'s W8A8 products for ``net`` when every
    projection of every layer is an unstacked :class:`Int8Linear` on ``kernel`` with the same
    activation groups layer to layer; else None."""
    layers = projections(net)
    flat = [p for ps in layers for p in ps]
    ok = flat and all(isinstance(p, Int8Linear) and p.kernel == kernel and p.kernel_weights.dim() == 2 for p in flat)
    groups = _step_args(layers, "kernel_group") if ok else None
    if groups is None:
        return None
    held = [t for p in flat for t in (p.kernel_weights, p.kernel_scales)]
    pairs = [int8_weight(p.kernel_weights, p.kernel_scales) for p in flat]
    return FusedStep(net, kernel.lib, kernel.int8_product, pairs, groups, held)


def check_quantization(name: str) -> str:
    """``name`` if it is a known quantization, else a one-line :class:`OptionsError`."""
    from .errors import OptionsError

    if name not in QUANTIZATIONS:
        raise OptionsError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {name!r}")
    return name


def _slots(model: CSMModel) -> Iterator[tuple[str, nn.Module, str, str]]:
    """Every quantized slot: ``(key, parent module, attribute, part)``."""
    for part, net in (("backbone", model.backbone), ("decoder", model.decoder)):
        for i, block in enumerate(net.layers):
            for attr in PROJECTIONS:
                yield f"{part}.{i}.{attr}", block, attr, part
    yield "codebook0_head", model, "codebook0_head", "codebook0_head"
    yield "projection", model, "projection", "projection"
    yield "heads", model, "head_layers", "heads"


def _replace(model: CSMModel, make: Callable[[str, str, Tensor], nn.Module]) -> CSMModel:
    """Put ``make(key, part, float weight)`` in every slot; all are made before any is replaced."""
    if model.head_layers is not None:
        raise ValueError("quantize before preparing the model for a device")
    made = []
    for key, parent, attr, part in _slots(model):
        weight = model.audio_head.transpose(1, 2) if attr == "head_layers" else getattr(parent, attr).weight
        made.append((parent, attr, make(key, part, weight)))
    for parent, attr, layer in made:
        setattr(parent, attr, layer)
    del model.audio_head
    model.register_parameter("audio_head", None)
    return model


def quantize(
    model: CSMModel, name: str, group: int = INT4_GROUP, keep_int8: tuple[str, ...] = INT4_KEEP_INT8
) -> CSMModel:
    """Quantize every slot of ``model`` in place: ``int8``, or ``int4`` with the ``keep_int8`` parts
    (and matrices no allowed group divides) at int8."""
    check_quantization(name)
    if name == "none":
        return model
    dtype = model.codebook0_head.weight.dtype

    def make(key: str, part: str, weight: Tensor) -> nn.Module:
        g = int4_group(weight.shape[-1], group)
        if name == "int8" or part in keep_int8 or g is None:
            return Int8Linear(weight, dtype)
        return Int4Linear.from_weight(weight, g)

    return _replace(model, make)


def quantized_tensors(model: CSMModel) -> dict[str, Tensor]:
    """The quantized weights of a :func:`quantize`d model (canonical forms, on the CPU), by slot key."""
    out = {}
    for key, parent, attr, _ in _slots(model):
        layer = getattr(parent, attr)
        if isinstance(layer, Int8Linear) and layer.weight is not None:
            out.update({f"{key}.weight": layer.weight, f"{key}.scales": layer.scales})
        elif isinstance(layer, Int4Linear) and layer.canonical() is not None:
            out.update(zip((f"{key}.qweight", f"{key}.scales", f"{key}.mins"), layer.canonical(), strict=True))
        else:
            raise ValueError(f"{key} is not quantized in its canonical form")
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def load_quantized(model: CSMModel, tensors: dict[str, Tensor]) -> CSMModel:
    """Put the layers :func:`quantized_tensors` saved back into an unquantized ``model`` (in place).
    Tensors that do not fit the model raise :class:`ValueError` before anything is replaced."""
    dtype, device = model.codebook0_head.weight.dtype, model.codebook0_head.weight.device

    def get(name: str, dtypes: tuple[torch.dtype, ...], shape: tuple[int, ...]) -> Tensor:
        t = tensors.get(name)
        if t is None or t.dtype not in dtypes or tuple(t.shape) != shape:
            raise ValueError(f"quantized weights: {name} is missing or does not fit the model")
        return t.to(device)

    def make(key: str, part: str, weight: Tensor) -> nn.Module:
        *lead, n, k = weight.shape
        if f"{key}.qweight" in tensors:
            groups = tensors[f"{key}.scales"].shape[-1] if f"{key}.scales" in tensors else 0
            g = k // groups if groups and k % groups == 0 else 0
            if g not in INT4_GROUPS:
                raise ValueError(f"quantized weights: {key} has a bad int4 group")
            q = get(f"{key}.qweight", (torch.uint8,), (*lead, n, k // 2))
            s, m = (get(f"{key}.{x}", (torch.float32,), (*lead, n, k // g)) for x in ("scales", "mins"))
            return Int4Linear(q, s, m)
        q = get(f"{key}.weight", (torch.int8,), (*lead, n, k))
        return Int8Linear.from_quantized(q, get(f"{key}.scales", (dtype,), (*lead, n)))

    return _replace(model, make)
