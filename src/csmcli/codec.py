"""Mimi codec: encode 24 kHz audio to CSM's codes and decode codes back, whole or streamed.

A thin wrapper around transformers' :class:`~transformers.MimiModel`.  Encoding is delegated to
``MimiModel.encode``.  Decoding runs our own stateful pass over the model's own weights
(:class:`StreamingDecoder`), so a stream of frames decodes to exactly the audio that
``MimiModel.decode`` gives for all the frames at once, with no seams and no extra latency:

* causal convolutions keep the last ``(kernel - 1) * dilation`` input samples as left context;
* transposed convolutions (the upsampler and the SEANet decoder's upsampling stages) carry the
  ``kernel - stride`` overlapping output samples they have only partly summed into the next push;
* the decoder transformer keeps, per layer, the keys/values of the last ``sliding_window - 1``
  positions (already rotated by RoPE at their absolute positions) and masks exactly as
  transformers' sliding-window causal mask does (a query at ``p`` sees keys in ``(p - window, p]``);
* dequantization is per frame and stateless.

No flush is needed: with ``trim_right_ratio == 1`` (Mimi's setting) ``MimiModel.decode`` trims
from every transposed convolution exactly the samples that the next frame would still add to,
so each frame's 1920 samples are final as soon as its codes arrive.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import MimiConfig, MimiModel
from transformers.models.mimi.modeling_mimi import (
    MimiConv1d,
    MimiConvTranspose1d,
    MimiResnetBlock,
    MimiRotaryEmbedding,
    MimiTransformerModel,
)

__all__ = ["Codec", "StreamingDecoder", "remap_mimi_key"]

#: Checkpoints (kyutai/mimi, CSM's ``codec_model.*``) use Mimi's original flat layout; transformers'
#: ``MimiModel`` nests the halves.  Prefix renames, first match wins.
_FLAT_TO_NESTED = (
    ("encoder.layers.", "encoder.encoder_seanet.layers."),
    ("encoder_transformer.", "encoder.encoder_transformer."),
    ("downsample.", "encoder.downsample."),
    ("upsample.", "decoder.upsample."),
    ("decoder_transformer.", "decoder.decoder_transformer."),
    ("decoder.layers.", "decoder.decoder_seanet.layers."),
)

#: Frames per internal chunk of :meth:`Codec.decode` (bounds peak memory on long audio; the result
#: does not depend on it because streaming is exact).
DECODE_CHUNK_FRAMES = 250


def remap_mimi_key(key: str) -> str:
    """Map a checkpoint key (flat layout, optionally ``codec_model.``-prefixed) to ``MimiModel``'s name."""
    key = key.removeprefix("codec_model.")
    for old, new in _FLAT_TO_NESTED:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


# --------------------------------------------------------------------------------------------------
# Decoder plan: the model's decoder layers as a flat list of steps, validated once.


@dataclass(frozen=True)
class _ConvStep:
    """A causal stride-1 ``MimiConv1d``; ``slot`` indexes its left-context state."""

    module: MimiConv1d
    context: int
    replicate: bool
    slot: int


@dataclass(frozen=True)
class _ConvTransposeStep:
    """A causal ``MimiConvTranspose1d`` trimmed fully on the right; ``slot`` holds its overlap tail."""

    module: MimiConvTranspose1d
    stride: int
    overlap: int
    slot: int


@dataclass(frozen=True)
class _EluStep:
    alpha: float


@dataclass(frozen=True)
class _ResidualStep:
    """A ``MimiResnetBlock``: ``body`` steps plus an identity or 1x1-conv shortcut."""

    body: tuple[Any, ...]
    shortcut: _ConvStep | None


class _PlanBuilder:
    """Turns decoder modules into steps, numbering stateful ones."""

    def __init__(self) -> None:
        self.slots = 0

    def _slot(self) -> int:
        self.slots += 1
        return self.slots - 1

    def conv(self, mod: MimiConv1d) -> _ConvStep:
        conv = mod.conv
        if not mod.causal:
            raise ValueError("streaming decode needs causal convolutions (use_causal_conv=True)")
        if conv.stride[0] != 1 or conv.padding[0] != 0:
            raise ValueError(f"unsupported decoder convolution: stride {conv.stride}, padding {conv.padding}")
        if mod.pad_mode not in ("constant", "replicate"):
            raise ValueError(f"unsupported pad_mode {mod.pad_mode!r} for streaming decode")
        context = (conv.kernel_size[0] - 1) * conv.dilation[0]
        return _ConvStep(mod, context, mod.pad_mode == "replicate", self._slot())

    def conv_transpose(self, mod: MimiConvTranspose1d) -> _ConvTransposeStep:
        conv = mod.conv
        stride, kernel = conv.stride[0], conv.kernel_size[0]
        if mod.padding_left != 0 or mod.padding_right != kernel - stride:
            raise ValueError("streaming decode needs causal transposed convs with trim_right_ratio=1.0")
        if conv.padding[0] != 0 or conv.output_padding[0] != 0 or conv.dilation[0] != 1:
            raise ValueError("unsupported transposed convolution settings in the Mimi decoder")
        return _ConvTransposeStep(mod, stride, kernel - stride, self._slot())

    def layer(self, mod: nn.Module) -> Any:
        if isinstance(mod, MimiConv1d):
            return self.conv(mod)
        if isinstance(mod, MimiConvTranspose1d):
            return self.conv_transpose(mod)
        if isinstance(mod, nn.ELU):
            return _EluStep(float(mod.alpha))
        if isinstance(mod, MimiResnetBlock):
            body = tuple(self.layer(m) for m in mod.block)
            shortcut = self.conv(mod.shortcut) if isinstance(mod.shortcut, MimiConv1d) else None
            if shortcut is None and not isinstance(mod.shortcut, nn.Identity):
                raise ValueError(f"unsupported residual shortcut {type(mod.shortcut).__name__}")
            return _ResidualStep(body, shortcut)
        raise ValueError(f"unsupported Mimi decoder layer {type(mod).__name__}")


# --------------------------------------------------------------------------------------------------


class FrameDecoder(Protocol):
    """Turns frames of codes into audio samples, piece by piece (:class:`StreamingDecoder`)."""

    def push(self, codes: Tensor | np.ndarray) -> np.ndarray:
        """Audio for ``codes`` ``[frames, codebooks]``, continuing what came before."""
        ...


class FrameCodec(Protocol):
    """What the engine needs from a codec (:class:`Codec` is one): its sample rate and a streaming
    decoder per job."""

    @property
    def sample_rate(self) -> int:
        """Output samples per second."""
        ...

    def stream(self) -> FrameDecoder:
        """A new decoder with its own state."""
        ...


class Codec:
    """Mimi at 24 kHz / 12.5 frames per second, using the first ``num_codebooks`` codebooks."""

    def __init__(self, model: MimiModel, num_codebooks: int = 32) -> None:
        cfg = model.config
        if cfg.audio_channels != 1:
            raise ValueError(f"csmcli's codec is mono; this Mimi has {cfg.audio_channels} channels")
        if not 1 <= num_codebooks <= cfg.num_quantizers:
            raise ValueError(f"num_codebooks must be in 1..{cfg.num_quantizers}, got {num_codebooks}")
        self.model = model.eval()
        self._num_codebooks = num_codebooks
        self._codebook_size = int(cfg.codebook_size)
        self._frame_size = int(cfg.frame_size)
        self._codebooks = [m for m in model.modules() if hasattr(m, "embed_sum") and hasattr(m, "_embed")]
        for book in self._codebooks:  # each caches embed_sum / cluster_usage on first use: start afresh
            book._embed = None
        self._decoder_plan: tuple[Any, ...] = ()
        self._num_slots = 0
        self._upsample_step: _ConvTransposeStep | None = None
        if model.decoder is not None:
            if not hasattr(model.decoder, "decoder_seanet"):
                raise ValueError(
                    "this transformers' MimiModel has no decoder.decoder_seanet: csmcli's codec "
                    "needs the layout with encoder/decoder halves (transformers 5.x)"
                )
            builder = _PlanBuilder()
            if model.decoder.upsample is not None:
                self._upsample_step = builder.conv_transpose(model.decoder.upsample)
            self._decoder_plan = tuple(builder.layer(m) for m in model.decoder.decoder_seanet.layers)
            self._num_slots = builder.slots

    # ---------------------------------------------------------------------------------- loading

    @classmethod
    def from_state_dict(
        cls,
        codec_config: Mapping[str, Any] | MimiConfig,
        state_dict: Mapping[str, Tensor],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        num_codebooks: int = 32,
    ) -> Codec:
        """Build Mimi from a config and its tensors without allocating the weights twice.

        Keys may use the checkpoint's flat layout (``decoder.layers.0.conv.weight`` ...) or
        ``MimiModel``'s own names; a ``codec_model.`` prefix is ignored.  The module is created on
        the meta device and the given tensors are assigned to it (moved/cast only if needed).
        A state dict without encoder weights gives a decode-only codec.
        """
        if isinstance(codec_config, MimiConfig):
            config = copy.deepcopy(codec_config)
        else:
            config = MimiConfig.from_dict(dict(codec_config))
        device = torch.device(device)
        state = {}
        for key, value in state_dict.items():
            value = value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
            state[remap_mimi_key(key)] = value
        if not any(k.startswith("encoder.") for k in state):
            config.encoder_config = None
        with torch.device("meta"):
            model = MimiModel(config)
        for key, buf in model.named_buffers():
            if key.endswith("codebook.initialized") and key not in state:
                state[key] = torch.ones_like(buf, device=device)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        persistent = set(model.state_dict())
        missing = [k for k in missing if k in persistent]
        if missing or unexpected:
            raise ValueError(
                f"Mimi weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        _materialize_buffers(model, device)
        model.requires_grad_(False)
        return cls(model.eval(), num_codebooks)

    @classmethod
    def from_pretrained(
        cls,
        path_or_dir: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        num_codebooks: int = 32,
    ) -> Codec:
        """Load a standalone ``kyutai/mimi``-style directory (``config.json`` + ``*.safetensors``).

        A hub id (not an existing directory) is resolved through :func:`csmcli.checkpoint.resolve`.
        """
        from safetensors.torch import load_file

        path = Path(path_or_dir).expanduser()
        if not path.is_dir():
            from .checkpoint import resolve

            path = resolve(str(path_or_dir))
        config = json.loads((path / "config.json").read_text())
        files = (
            [path / "model.safetensors"]
            if (path / "model.safetensors").is_file()
            else sorted(path.glob("*.safetensors"))
        )
        if not files:
            raise FileNotFoundError(f"no .safetensors weights in {path}")
        state: dict[str, Tensor] = {}
        for file in files:
            state.update(load_file(str(file)))
        return cls.from_state_dict(config, state, device, dtype, num_codebooks)

    # ------------------------------------------------------------------------------- properties

    @property
    def sample_rate(self) -> int:
        """Audio samples per second (24000)."""
        return int(self.model.config.sampling_rate)

    @property
    def frame_size(self) -> int:
        """Audio samples per code frame (1920)."""
        return self._frame_size

    @property
    def num_codebooks(self) -> int:
        """Codebooks per frame used by encode/decode (32 for CSM)."""
        return self._num_codebooks

    @property
    def device(self) -> torch.device:
        """Device of the model's weights."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the model's weights."""
        return next(self.model.parameters()).dtype

    # ------------------------------------------------------------------------------------- API

    @torch.inference_mode()
    def encode(self, audio: np.ndarray | Tensor) -> Tensor:
        """Mono float audio at 24 kHz ``[samples]`` -> codes ``[frames, num_codebooks]`` (CPU, long).

        Padding: the audio is passed unpadded to ``MimiModel.encode``, whose strided convolutions
        each zero-pad on the right just enough to complete their last window (transformers'
        ``_get_extra_padding_for_conv1d``), so the result has ``ceil(samples / 1920)`` frames
        (1 s -> 13 frames) and matches transformers / the HF feature-extractor path exactly.
        """
        if self.model.encoder is None:
            raise ValueError("this codec was loaded without encoder weights")
        x = torch.as_tensor(np.asarray(audio) if not isinstance(audio, Tensor) else audio)
        if x.dim() == 2 and 1 in x.shape:
            x = x.reshape(-1)
        if x.dim() != 1:
            raise ValueError(f"encode takes mono audio [samples], got shape {tuple(x.shape)}")
        if x.numel() == 0:
            raise ValueError("cannot encode empty audio")
        x = x.to(device=self.device, dtype=self.dtype)[None, None]
        self._sync_codebooks()
        codes = self.model.encode(x, num_quantizers=self._num_codebooks).audio_codes
        return codes[0].T.contiguous().long().cpu()

    def decode(self, codes: Tensor, chunk_frames: int = DECODE_CHUNK_FRAMES) -> np.ndarray:
        """Codes ``[frames, num_codebooks]`` -> float32 audio ``[frames * 1920]``.

        Runs the streaming decoder over the whole input (in chunks of ``chunk_frames`` to bound
        memory); the result equals ``MimiModel.decode`` on all frames at once.
        """
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        codes = self._check_codes(codes)
        stream = self.stream()
        parts = [stream.push(codes[i : i + chunk_frames]) for i in range(0, codes.shape[0], chunk_frames)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    def stream(self) -> StreamingDecoder:
        """A fresh streaming decoder for one utterance."""
        if self.model.decoder is None:
            raise ValueError("this codec was loaded without decoder weights")
        return StreamingDecoder(self)

    def _sync_codebooks(self) -> None:
        """Drop codebook caches left on another device/dtype (transformers' ``_embed`` ignores ``.to()``)."""
        for book in self._codebooks:
            cached, source = book._embed, book.embed_sum
            if cached is not None and (cached.device != source.device or cached.dtype != source.dtype):
                book._embed = None

    def _check_codes(self, codes: Tensor | np.ndarray) -> Tensor:
        codes = torch.as_tensor(codes)
        if codes.dim() != 2 or codes.shape[1] != self._num_codebooks:
            raise ValueError(f"codes must be [frames, {self._num_codebooks}], got {tuple(codes.shape)}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"codes must be integers, got {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self._codebook_size):
            raise ValueError(
                f"codes must be in 0..{self._codebook_size - 1} (got {int(codes.min())}..{int(codes.max())})"
            )
        return codes.to(device=self.device, dtype=torch.long)


def _materialize_buffers(model: MimiModel, device: torch.device) -> None:
    """Recreate the non-persistent buffers left on the meta device by meta-device construction."""
    for mod in model.modules():
        if isinstance(mod, MimiConv1d):
            conv = mod.conv
            stride = conv.stride[0]
            kernel = (conv.kernel_size[0] - 1) * conv.dilation[0] + 1
            mod.stride = torch.tensor(stride, dtype=torch.int64, device=device)
            mod.kernel_size = torch.tensor(kernel, dtype=torch.int64, device=device)
            mod.padding_total = torch.tensor(kernel - stride, dtype=torch.int64, device=device)
            mod.padding_right = mod.padding_total // 2
            mod.padding_left = mod.padding_total - mod.padding_right
        elif isinstance(mod, MimiTransformerModel):
            mod.rotary_emb = MimiRotaryEmbedding(mod.config).to(device)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise ValueError(f"Mimi tensors left uninitialized: {leftover[:5]}")


# --------------------------------------------------------------------------------------------------


class StreamingDecoder:
    """Stateful decoder for one utterance: ``push`` codes, get the final audio for exactly those frames.

    Every returned sample is final (no look-ahead, nothing to flush); concatenating the outputs
    of any sequence of pushes equals :meth:`Codec.decode` of all the codes.
    """

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self._slots: list[Tensor | None] = [None] * codec._num_slots
        tr = codec.model.decoder.decoder_transformer
        self._kv: list[tuple[Tensor, Tensor] | None] = [None] * len(tr.layers)
        self._position = 0  # decoder-transformer positions (25 Hz) seen so far
        self.frames = 0

    @torch.inference_mode()
    def push(self, codes: Tensor | np.ndarray) -> np.ndarray:
        """Decode ``codes`` ``[n, num_codebooks]`` (``n >= 0``) -> float32 audio ``[n * 1920]``."""
        codec = self.codec
        codes = codec._check_codes(codes)
        n = codes.shape[0]
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        model = codec.model
        codec._sync_codebooks()
        x = model.quantizer.decode(codes.T[None])  # [1, hidden, n]
        x = x.to(codec.dtype)
        if codec._upsample_step is not None:
            x = self._conv_transpose(codec._upsample_step, x)
        x = self._transformer(x.transpose(1, 2)).transpose(1, 2)
        x = self._run(codec._decoder_plan, x)
        self.frames += n
        return x[0, 0].float().cpu().numpy()

    # -------------------------------------------------------------------------------- internals

    def _run(self, steps: tuple[Any, ...], x: Tensor) -> Tensor:
        for step in steps:
            if isinstance(step, _ConvStep):
                x = self._conv(step, x)
            elif isinstance(step, _EluStep):
                x = F.elu(x, step.alpha)
            elif isinstance(step, _ConvTransposeStep):
                x = self._conv_transpose(step, x)
            else:
                residual = x if step.shortcut is None else self._conv(step.shortcut, x)
                x = residual + self._run(step.body, x)
        return x

    def _conv(self, step: _ConvStep, x: Tensor) -> Tensor:
        conv = step.module.conv
        if step.context:
            past = self._slots[step.slot]
            if past is None:
                past = (
                    x[..., :1].expand(-1, -1, step.context)
                    if step.replicate
                    else x.new_zeros(x.shape[0], x.shape[1], step.context)
                )
            x = torch.cat([past, x], dim=-1)
            self._slots[step.slot] = x[..., -step.context :].clone()
        return _conv1d(x, conv.weight, conv.bias, conv.dilation[0], conv.groups)

    def _conv_transpose(self, step: _ConvTransposeStep, x: Tensor) -> Tensor:
        conv = step.module.conv
        y = _conv_transpose1d(x, conv.weight, step.stride, conv.groups)  # [B, C, n * stride + overlap]
        keep = x.shape[-1] * step.stride  # samples no later frame can add to
        tail = self._slots[step.slot]
        if tail is not None:
            y[..., : step.overlap] += tail
        self._slots[step.slot] = y[..., keep:].clone()
        y = y[..., :keep]
        if conv.bias is not None:
            y = y + conv.bias[:, None]
        return y

    def _transformer(self, x: Tensor) -> Tensor:
        """The decoder transformer over new positions ``x`` ``[1, T, C]`` with a sliding-window KV cache."""
        tr = self.codec.model.decoder.decoder_transformer
        window = tr.config.sliding_window
        t = x.shape[1]
        start = self._position
        positions = torch.arange(start, start + t, device=x.device)
        cos, sin = tr.rotary_emb(x, positions[None])
        cos, sin = cos[:, None], sin[:, None]  # [1, 1, T, D]
        past = 0 if self._kv[0] is None else self._kv[0][0].shape[2]
        key_pos = torch.arange(start - past, start + t, device=x.device)
        allowed = key_pos[None, :] <= positions[:, None]
        if window is not None:
            allowed &= key_pos[None, :] > positions[:, None] - window
        mask = None if bool(allowed.all()) else allowed
        keep = (window - 1) if window is not None else None
        for i, layer in enumerate(tr.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(1, t, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(1, t, -1, attn.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(1, t, -1, attn.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            cached = self._kv[i]
            if cached is not None:
                k = torch.cat([cached[0], k], dim=2)
                v = torch.cat([cached[1], v], dim=2)
            if keep is None:
                self._kv[i] = (k, v)
            elif keep > 0:
                self._kv[i] = (k[:, :, -keep:], v[:, :, -keep:])
            else:
                self._kv[i] = (k[:, :, :0], v[:, :, :0])
            if attn.num_key_value_groups > 1:
                k = k.repeat_interleave(attn.num_key_value_groups, dim=1)
                v = v.repeat_interleave(attn.num_key_value_groups, dim=1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
            o = attn.o_proj(o.transpose(1, 2).reshape(1, t, -1))
            x = x + layer.self_attn_layer_scale(o)
            x = x + layer.mlp_layer_scale(layer.mlp(layer.post_attention_layernorm(x)))
        self._position += t
        return x


#: Below this many output positions a convolution runs as one matrix product: oneDNN/ATen's direct
#: kernels are several times slower for short inputs with many channels (the 1-frame case).
_SHORT = 64


def _conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, dilation: int, groups: int) -> Tensor:
    """Unpadded ``F.conv1d`` (``x`` already holds its left context), with faster paths for small shapes."""
    out_ch, in_ch, kernel = weight.shape
    n = x.shape[-1] - (kernel - 1) * dilation
    if groups != 1 or (n > _SHORT and out_ch > 1):
        return F.conv1d(x, weight, bias, dilation=dilation, groups=groups)
    if out_ch == 1 or kernel == 1:  # sum over taps: no im2col copy
        y = torch.matmul(weight[:, :, 0], x[..., :n])
        for j in range(1, kernel):
            y = y + torch.matmul(weight[:, :, j], x[..., j * dilation : j * dilation + n])
    else:  # im2col: [B, n, in*kernel] @ [in*kernel, out]
        cols = x.unfold(-1, (kernel - 1) * dilation + 1, 1)[..., ::dilation]  # [B, in, n, kernel]
        cols = cols.permute(0, 2, 1, 3).reshape(x.shape[0], n, in_ch * kernel)
        y = torch.matmul(cols, weight.reshape(out_ch, in_ch * kernel).t()).transpose(1, 2)
    return y if bias is None else y + bias[:, None]


def _conv_transpose1d(x: Tensor, weight: Tensor, stride: int, groups: int) -> Tensor:
    """``F.conv_transpose1d`` without bias or trimming: ``[B, in, n] -> [B, out, (n - 1) * stride + kernel]``.

    Short inputs and depthwise weights use one product per tap block plus an overlap-add, which is
    much faster on CPU than the direct kernel for the 1-frame case.
    """
    batch, in_ch, n = x.shape
    _, out_per_group, kernel = weight.shape
    depthwise = groups == in_ch and out_per_group == 1
    if not depthwise and (groups != 1 or n > _SHORT // 2):
        return F.conv_transpose1d(x, weight, None, stride=stride, groups=groups)
    blocks = -(-kernel // stride)
    if blocks * stride != kernel:
        weight = F.pad(weight, (0, blocks * stride - kernel))
    out_ch = out_per_group * groups
    if depthwise:  # z[b, c, k, i] = w[c, k] * x[b, c, i]
        z = weight.reshape(1, in_ch, blocks * stride, 1) * x[:, :, None, :]
        z = z.reshape(batch, out_ch, blocks, stride, n).transpose(3, 4)
    else:  # x^T @ W reads the weight row-major (W^T @ x is ~10x slower here for 1-2 columns)
        z = torch.matmul(x.transpose(1, 2), weight.reshape(in_ch, out_ch * blocks * stride))
        z = z.reshape(batch, n, out_ch, blocks, stride).permute(0, 2, 3, 1, 4)
    z = z.reshape(batch, out_ch, blocks, n * stride)
    y = z.new_zeros(batch, out_ch, (n + blocks - 1) * stride)
    for j in range(blocks):
        y[..., j * stride : j * stride + n * stride] += z[:, :, j]
    return y[..., : (n - 1) * stride + kernel]


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
