"""Weight-only int8 quantization of CSM's linear layers (per output channel, symmetric).

On the CPU the plain layout runs on torch's own int8 weight kernel (``torch._weight_int8pack_mm``,
the one gpt-fast uses), single rows of the wide matrices through the compiled int8 gemv of
:mod:`csmcli.gemv`, and prompts dequantized on the fly.  Multi-slot eager engines move every
projection into fbgemm's packed int8 layout (:meth:`Int8Linear.use_fbgemm`), whose dynamically
quantized linear reads the int8 weights at memory speed for a batch's rows too, where
``_weight_int8pack_mm`` is compute-bound.  Embeddings stay in the model's dtype.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from .gemv import gemv_int8
from .model import CSMModel

# from this many rows on (prefill), CPU products dequantize the weight and use the float GEMM
DEQUANTIZE_ROWS = 32


class Int8Linear(nn.Module):
    """``y = x @ (q * scale).T`` with ``q`` int8 ``[out, in]`` and one scale per output channel.

    A stack of same-shaped layers (``[n, out, in]``: the depth decoder's per-codebook heads) is one
    module called with the layer's ``index``, so compiled code indexes a tensor (one graph serves
    every codebook) rather than picking a module (one graph per codebook).

    The weights live in one of two layouts, never both (memory): the plain ``weight`` buffer, or
    after :meth:`use_fbgemm` fbgemm's packed matrices (``weight`` is then None).  Numerics: the
    plain kernels multiply the activations as they are (bf16 or float32) and accumulate in float32;
    fbgemm quantizes the activations of each call to 8 bits (7 with ``reduce_range``) with one
    scale and zero point per call, i.e. shared by all rows of a batch (a stream's result depends
    slightly on the others), and accumulates in int32.  That roughly triples int8's logit error
    against bf16; ``scripts/int8_kernels_fidelity.py`` measures it.
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
        self.traced = False  # compiled code reads the plain weights: they stay plain

    @property
    def gemv(self) -> bool:
        """True when single rows go through the compiled int8 gemv."""
        return self.gemv_fn is not None

    def use_fbgemm(self, reduce_range: bool) -> None:
        """Move the weights into fbgemm's packed layout (the plain buffer is dropped).

        ``reduce_range``: quantize activations to 7 bits, which CPUs without VNNI need (their int8
        multiply-add saturates in 16 bits with full-range activations)."""
        self.reduce_range = reduce_range
        if self.packed:
            return
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
        """Back to the plain int8 buffer (what the compiler traces): the exact weights :meth:`use_fbgemm` took."""
        if not self.packed:
            return
        stack = [torch.ops.quantized.linear_unpack(p)[0].int_repr() for p in self.packed]
        self.weight = torch.stack(stack) if self.scales.dim() == 2 else stack[0]
        self.packed = ()

    def forward(self, x: Tensor, index: int | None = None) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).contiguous()
        if self.packed:
            scales = self.scales
            packed = self.packed[0 if index is None else index]
            y = torch.ops.quantized.linear_dynamic(flat.float(), packed, self.reduce_range).to(scales.dtype)
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


QUANTIZATIONS = ("none", "int8")


def check_quantization(name: str) -> str:
    """``name`` if it is a known quantization, else a one-line :class:`OptionsError`."""
    from .errors import OptionsError

    if name not in QUANTIZATIONS:
        raise OptionsError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {name!r}")
    return name


def quantize_int8(model: CSMModel) -> CSMModel:
    """Replace every projection of both transformers and all heads by :class:`Int8Linear`, in place."""
    dtype = model.codebook0_head.weight.dtype
    for net in (model.backbone, model.decoder):
        for block in net.layers:
            for name in ("wqkv", "wo", "w13", "w2"):
                setattr(block, name, Int8Linear(getattr(block, name).weight, dtype))
    model.codebook0_head = Int8Linear(model.codebook0_head.weight, dtype)
    model.projection = Int8Linear(model.projection.weight, dtype)
    if model.head_layers is None:
        model.head_layers = Int8Linear(model.audio_head.transpose(1, 2), dtype)
        del model.audio_head
        model.register_parameter("audio_head", None)
    else:
        raise ValueError("quantize before preparing the model for a device")
    return model
