"""CSM's two transformers (backbone and depth decoder) with static KV caches and a one-frame step.

The weights use transformers' layout (rotate-half RoPE); Sesame's original checkpoints are
converted on load (see :mod:`csmcli.convert`).  Q/K/V and gate/up projections are fused at load
time, caches are allocated once per (batch, length), and every step works on a whole batch of
slots in lock step, each slot at its own position.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .sampling import FrameSampler

if TYPE_CHECKING:
    from .qkernel import FusedDepth


@dataclass(frozen=True)
class TransformerSpec:
    """Shape of one Llama-style transformer."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float
    max_len: int
    rope: dict[str, Any]

    @classmethod
    def from_config(cls, cfg: dict[str, Any], max_len: int | None = None) -> TransformerSpec:
        """Read a transformers CsmConfig / CsmDepthDecoderConfig dict."""
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        return cls(
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            ffn_dim=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            max_len=max_len or cfg.get("max_position_embeddings", 2048),
            rope=rope_parameters(cfg),
        )


def rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings from either the new (``rope_parameters``) or old (``rope_scaling``) config form."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    params.setdefault("rope_theta", cfg.get("rope_theta", 500000.0))
    if params["rope_type"] == "llama3":
        params.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings", 2048))
    return params


def rope_inv_freq(head_dim: int, rope: dict[str, Any]) -> Tensor:
    """Inverse frequencies, with Llama-3 frequency scaling when the config asks for it."""
    base = float(rope["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = rope["rope_type"]
    if kind == "default":
        return inv_freq
    if kind != "llama3":
        raise ValueError(f"unsupported RoPE type {kind!r}")
    factor = rope["factor"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, as the reference does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class Block(nn.Module):
    """One pre-norm Llama block with fused QKV and gate/up projections."""

    def __init__(self, spec: TransformerSpec) -> None:
        super().__init__()
        self.spec = spec
        q_dim, kv_dim = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
        self.attn_norm = RMSNorm(spec.dim, spec.norm_eps)
        self.wqkv = nn.Linear(spec.dim, q_dim + 2 * kv_dim, bias=False)
        self.wo = nn.Linear(q_dim, spec.dim, bias=False)
        self.ffn_norm = RMSNorm(spec.dim, spec.norm_eps)
        self.w13 = nn.Linear(spec.dim, 2 * spec.ffn_dim, bias=False)
        self.w2 = nn.Linear(spec.ffn_dim, spec.dim, bias=False)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        cache: tuple[Tensor, Tensor],
        write: tuple,
        kv_len: int,
        mask: Tensor | None,
        layer_fns: LayerFns,
    ) -> Tensor:
        b, t, _ = x.shape
        # compiled functions serve the steps (one or two rows); prompts are compute-bound, eager is as fast
        fns = layer_fns if t <= 2 else EAGER_LAYERS
        q, k, v = fns.attn_in(self, x, *rope)
        k_cache, v_cache = cache
        k_cache[write] = k.to(k_cache.dtype)
        v_cache[write] = v.to(v_cache.dtype)
        keys, values = k_cache[:b, :, :kv_len], v_cache[:b, :, :kv_len]
        if t == 1 and mask is None and kv_len <= SHORT_ATTENTION_KEYS:
            attn = short_attention(q, keys, values)
        elif mask is None and t > 1:  # a branch, not is_causal=t > 1: t can be symbolic under torch.compile
            attn = F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=True)
        else:
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        return fns.attn_out_ffn(self, x, attn)


# one query over at most this many keys (the depth decoder) skips SDPA's fixed cost
SHORT_ATTENTION_KEYS = 64


def short_attention(q: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """One query per head (``[B, H, 1, D]``) attending to every key (``[B, KV, L, D]``), plain ops.

    On the CPU the two products are written as multiply-and-sum where that is faster: compiled
    (inductor fuses them into the step's other loops) and in bfloat16 (for a handful of keys
    oneDNN's batched matmul is mostly fixed cost).  Eager float32 matmuls are faster as they are.
    """
    b, h, _, d = q.shape
    kv = keys.shape[1]
    grouped = q.reshape(b, kv, h // kv, d)
    cpu_sums = q.device.type == "cpu" and (q.dtype != torch.float32 or torch.compiler.is_compiling())
    if cpu_sums:  # products and sums in float32, as the matmuls accumulate
        scores = (grouped.float()[:, :, :, None, :] * keys.float()[:, :, None]).sum(-1) * (1.0 / math.sqrt(d))
        weights = scores.softmax(dim=-1).to(values.dtype).float()
        return (weights[..., None] * values.float()[:, :, None]).sum(-2).to(values.dtype).view(b, h, 1, d)
    scores = (grouped @ keys.transpose(-1, -2)).float() * (1.0 / math.sqrt(d))
    return (scores.softmax(dim=-1).to(values.dtype) @ values).view(b, h, 1, d)


def _attn_in(block: Block, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Norm, fused QKV projection and RoPE: queries ``[B, H, T, D]``, keys and values ``[B, T, KV, D]``.

    ``sin`` carries rotate-half's sign (see :meth:`Transformer.rope_tables`), so one ``roll`` per
    layer rotates the query and key heads together.
    """
    s = block.spec
    b, t, _ = x.shape
    heads = block.wqkv(block.attn_norm(x)).view(b, t, s.n_heads + 2 * s.n_kv_heads, s.head_dim)
    qk = heads[:, :, : s.n_heads + s.n_kv_heads]
    qk = qk * cos + qk.roll(s.head_dim // 2, dims=-1) * sin
    return qk[:, :, : s.n_heads].transpose(1, 2), qk[:, :, s.n_heads :], heads[:, :, s.n_heads + s.n_kv_heads :]


def _attn_out_ffn(block: Block, x: Tensor, attn: Tensor) -> Tensor:
    """Output projection and residual, then the SwiGLU feed-forward and its residual."""
    b, t, _ = x.shape
    x = x + block.wo(attn.transpose(1, 2).reshape(b, t, -1))
    gate, up = block.w13(block.ffn_norm(x)).chunk(2, dim=-1)
    return x + block.w2(F.silu(gate) * up)


@dataclass(frozen=True)
class LayerFns:
    """The per-layer functions a transformer step runs: eager (:data:`EAGER_LAYERS`), or compiled
    ones an engine made with :func:`compile_layers` and passes to the model's step functions."""

    attn_in: Callable[..., tuple[Tensor, Tensor, Tensor]]
    attn_out_ffn: Callable[..., Tensor]


EAGER_LAYERS = LayerFns(_attn_in, _attn_out_ffn)

#: inductor options for CPU code: materialise every computed input of a reduction once.  By
#: default inductor folds small pointwise producers (an RMSNorm) into the reduction that reads
#: them, and a matrix-vector product then recomputes its input vector for every output row: a
#: compute-bound loop instead of one that streams the weights.
CPU_COMPILE_OPTIONS = {"realize_opcount_threshold": 1}

#: Compiled graphs each compiled function may keep: backbone and depth decoder differ in width, and
#: prefill, depth and frame steps in length.
RECOMPILE_LIMIT = 32


def compile_layers(options: dict[str, Any] | None = None) -> LayerFns:
    """Each layer's pointwise work fused with ``torch.compile`` (fewer, larger kernels: what CUDA
    graphs of the frame then replay).  The attention itself and its cache writes stay eager, so
    one compiled graph per shape family serves every layer, step and batch size.  The compiled
    functions serve single-row steps; prompts keep the eager ones.  ``options`` go to inductor
    (:data:`CPU_COMPILE_OPTIONS` for the CPU).

    dynamo's recompile limit is process-wide; it is raised (never lowered) to :data:`RECOMPILE_LIMIT`,
    which changes nothing for code that needs fewer graphs.
    """
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    return LayerFns(
        torch.compile(_attn_in, dynamic=True, options=options),
        torch.compile(_attn_out_ffn, dynamic=True, options=options),
    )


#: rows from which a transformer's calls take its layers rather than its fused step, whose attention
#: is a plain loop per row and head (SDPA serves prompts better)
FUSED_STEP_ROWS = 32


class Transformer(nn.Module):
    """A stack of blocks plus final norm; attends over a caller-owned static KV cache."""

    def __init__(self, spec: TransformerSpec) -> None:
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleList(Block(spec) for _ in range(spec.n_layers))
        self.norm = RMSNorm(spec.dim, spec.norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(spec.head_dim, spec.rope), persistent=False)
        self._rope: dict[str, Any] = {}
        # a whole step in one call, where the CPU preparation made one (csmcli.qkernel.FusedStep)
        self.fused_step: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None

    def rope_tables(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """RoPE cosines and signed sines ``[max_len, head_dim]`` for every position, once per dtype.

        Rotate-half RoPE is ``x * cos + cat(-x2, x1) * sin``; ``cat(-x2, x1)`` is ``roll(x, D/2)``
        with the first half negated, so the sines come with that sign folded in (exact: only signs
        change).
        """
        key = (dtype, self.inv_freq.device)
        if self._rope.get("key") != key:
            pos = torch.arange(self.spec.max_len, device=self.inv_freq.device).float()
            freqs = pos[:, None] * self.inv_freq
            sign = torch.ones(self.spec.head_dim, device=pos.device)
            sign[: self.spec.head_dim // 2] = -1
            emb = torch.cat((freqs, freqs), dim=-1)
            self._rope = {"key": key, "tables": (emb.cos().to(dtype), (emb.sin() * sign).to(dtype))}
        return self._rope["tables"]

    def new_cache(self, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> list[Tensor]:
        """Keys and values for every layer: ``[layers, 2, batch, kv_heads, length, head_dim]``."""
        s = self.spec
        return torch.zeros(s.n_layers, 2, batch, s.n_kv_heads, length, s.head_dim, dtype=dtype, device=device)

    def forward(
        self,
        x: Tensor,
        pos: Tensor,
        cache: Tensor,
        kv_len: int,
        mask: Tensor | None,
        layer_fns: LayerFns = EAGER_LAYERS,
    ) -> Tensor:
        """Run ``x`` ``[B, T, dim]`` at positions ``pos`` ``[B, T]``, using rows ``0..B-1`` of ``cache``.

        ``mask`` is a boolean ``[B, 1, T, kv_len]`` (True = may attend), or None for causal attention
        over exactly the ``T`` new rows starting at position 0 (``T == kv_len``).  ``layer_fns``:
        the per-layer functions (compiled ones from the engine).  Either way each row attends to
        positions up to its own, which is all :attr:`fused_step` needs to know; it serves the
        eager steps (fewer than :data:`FUSED_STEP_ROWS` rows).
        """
        fused = self.fused_step is not None and x.shape[0] * x.shape[1] < FUSED_STEP_ROWS
        if fused and not torch.compiler.is_compiling():
            return self.fused_step(x, pos, cache)
        cos, sin = self.rope_tables(x.dtype)
        rope = (cos[pos][:, :, None, :], sin[pos][:, :, None, :])
        rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(pos)
        write = (rows, slice(None), pos)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, (cache[i, 0], cache[i, 1]), write, kv_len, mask, layer_fns)
        return self.norm(x)


def held_weights(part: nn.Module | Tensor) -> list[Tensor | torch.ScriptObject]:
    """The weights a module and its children hold: parameters, persistent buffers (int8 scales; not
    RoPE frequencies), and matrices kept as plain attributes (packed CPU weights, some in tuples,
    fbgemm's opaque ones included); a tensor is its own."""
    if isinstance(part, Tensor):
        return [part]
    found: list[Tensor | torch.ScriptObject] = []
    for m in part.modules():
        buffers = [t for name, t in m._buffers.items() if name not in m._non_persistent_buffers_set]
        found += [t for t in (*m._parameters.values(), *buffers) if t is not None]
        for value in vars(m).values():
            items = value if isinstance(value, tuple | list) else (value,)
            found += [t for t in items if isinstance(t, Tensor) and t.dim() >= 2 or isinstance(t, torch.ScriptObject)]
    return found


class CSMModel(nn.Module):
    """Backbone, depth decoder, embeddings and heads of CSM, in transformers' weight layout."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        depth_cfg = config["depth_decoder_config"]
        self.num_codebooks = config.get("num_codebooks", 32)
        self.vocab = config.get("vocab_size", 2051)
        self.text_vocab = config.get("text_vocab_size", 128256)
        self.backbone_spec = TransformerSpec.from_config(config)
        self.depth_spec = TransformerSpec.from_config(depth_cfg, max_len=self.num_codebooks + 1)
        dim, ddim = self.backbone_spec.dim, self.depth_spec.dim
        self.text_embeddings = nn.Embedding(self.text_vocab, dim)
        self.audio_embeddings = nn.Embedding(self.num_codebooks * self.vocab, dim)
        self.backbone = Transformer(self.backbone_spec)
        self.codebook0_head = nn.Linear(dim, self.vocab, bias=False)
        self.projection = nn.Linear(dim, ddim, bias=False)
        self.decoder = Transformer(self.depth_spec)
        self.audio_head = nn.Parameter(torch.empty(self.num_codebooks - 1, ddim, self.vocab))
        # the heads as one module called with (x, index) once quantized or prepared for the CPU
        # (quant.Int8Linear, cpu.CpuLinear); until then audio_head is used
        self.head_layers: nn.Module | None = None
        # a frame's depth-decoder steps in one call, where the CPU preparation made one (csmcli.qkernel.FusedDepth)
        self.fused_depth: FusedDepth | None = None
        self.register_buffer("audio_offsets", torch.arange(self.num_codebooks) * self.vocab, persistent=False)

    def init_buffers(self, device: torch.device) -> None:
        """(Re)compute the non-persistent buffers, e.g. after building on the meta device."""
        self.audio_offsets = torch.arange(self.num_codebooks, device=device) * self.vocab
        for net in (self.backbone, self.decoder):
            net.inv_freq = rope_inv_freq(net.spec.head_dim, net.spec.rope).to(device)
            net._rope = {}

    @property
    def max_len(self) -> int:
        """Positions the backbone can hold (prompt rows plus generated frames)."""
        return self.backbone_spec.max_len

    def frame_parts(self) -> list[tuple[nn.Module | Tensor, int]]:
        """The weights one frame reads, with how many times: the backbone and the codebook-0 head
        once, the depth decoder once per codebook after the first, the projection once per codebook
        (the backbone state, then each new code), and each codebook's depth head once (the heads
        all together count once)."""
        steps = self.num_codebooks - 1
        heads = self.head_layers if self.head_layers is not None else self.audio_head
        parts = [(self.backbone, 1), (self.codebook0_head, 1), (self.projection, steps + 1), (self.decoder, steps)]
        return [*parts, (heads, 1)]

    def embed_rows(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Masked sum of the live columns of prompt rows ``[T, 33]`` -> ``[T, dim]``."""
        text = self.text_embeddings(tokens[:, -1]) * mask[:, -1:].to(self.text_embeddings.weight.dtype)
        audio = self.audio_embeddings(tokens[:, :-1] + self.audio_offsets)
        audio = (audio * mask[:, :-1, None].to(audio.dtype)).sum(dim=1)
        return text + audio

    def embed_frames(self, codes: Tensor) -> Tensor:
        """Sum of the 32 codebook embeddings of frames ``[B, 32]`` -> ``[B, dim]``."""
        return self.audio_embeddings(codes + self.audio_offsets).sum(dim=1)

    def prefill(
        self, embeds: Tensor, start: int, cache: Tensor, slot: int, layer_fns: LayerFns = EAGER_LAYERS
    ) -> Tensor:
        """Run prompt rows ``[T, dim]`` for one slot from position ``start``; returns the last hidden state."""
        t = embeds.shape[0]
        end = start + t
        pos = torch.arange(start, end, device=embeds.device)[None]
        if start == 0:
            mask = None
        else:
            keys = torch.arange(end, device=embeds.device)
            mask = (keys[None, :] <= pos[0, :, None])[None, None]
        h = self.backbone(embeds[None], pos, cache[:, :, slot : slot + 1], end, mask, layer_fns)
        return h[0, -1]

    def backbone_step(
        self, codes: Tensor, pos: Tensor, cache: Tensor, kv_len: int, layer_fns: LayerFns = EAGER_LAYERS
    ) -> Tensor:
        """Feed one frame per slot (``[B, 32]`` codes at positions ``[B]``); returns hidden states ``[B, dim]``."""
        b = codes.shape[0]
        keys = torch.arange(kv_len, device=codes.device)
        mask = (keys[None, :] <= pos[:, None])[:, None, None, :]
        h = self.backbone(self.embed_frames(codes)[:, None], pos[:, None], cache[:, :, :b], kv_len, mask, layer_fns)
        return h[:, 0]

    def head(self, index: int, x: Tensor) -> Tensor:
        """Logits of codebook ``index + 1`` from depth-decoder states ``x`` ``[B, dim]``."""
        if self.head_layers is not None:
            return self.head_layers(x, index)
        return x @ self.audio_head[index]

    def decode_frame(
        self,
        h: Tensor,
        sample: SampleFn,
        cache: Tensor,
        step: DepthStep | None = None,
        layer_fns: LayerFns = EAGER_LAYERS,
    ) -> Tensor:
        """Codebook 0 from backbone states ``h`` ``[B, dim]``, then 31 depth-decoder steps -> ``[B, 32]``.

        ``sample(logits [B, vocab], codebook)`` picks one code per row.  The depth decoder's cache
        ``cache`` is simply overwritten from position 0 every frame.  ``step`` replaces
        :meth:`depth_step` (the engine passes a compiled one); otherwise the depth step's layers run
        ``layer_fns``, or all 31 steps run in :attr:`fused_depth` where there is one and ``sample``
        is a :class:`~csmcli.sampling.FrameSampler` (whose state it reads; codebook 0 is then
        sampled by its C code too).
        """
        b = h.shape[0]
        fused = self.fused_depth is not None and step is None and isinstance(sample, FrameSampler)
        fused = fused and 2 * b < FUSED_STEP_ROWS and not torch.compiler.is_compiling()
        logits = self.codebook0_head(h)
        code = self.fused_depth.sample(logits, sample, 0) if fused else sample(logits, 0)
        x = self.projection(torch.stack([h, self.audio_embeddings(code)], dim=1))
        if fused:
            return self.fused_depth(x, cache, code, sample)
        step = step or functools.partial(self.depth_step, layer_fns=layer_fns)
        codes = [code]
        pos = torch.arange(2, device=h.device).repeat(b, 1)  # contiguous like the later steps' positions
        for i in range(1, self.num_codebooks):
            code, x = step(x, pos, cache, i, sample)
            codes.append(code)
            pos = torch.full((b, 1), i + 1, device=h.device)
        return torch.stack(codes, dim=1)

    def depth_step(
        self,
        x: Tensor,
        pos: Tensor,
        cache: Tensor,
        index: int,
        sample: SampleFn,
        layer_fns: LayerFns = EAGER_LAYERS,
    ) -> tuple[Tensor, Tensor]:
        """Depth-decoder step ``index`` (1..31): codes of codebook ``index`` ``[B]`` and the next step's input.

        ``x`` ``[B, T, ddim]`` holds the new rows at positions ``pos`` ``[B, T]`` (two rows at step 1,
        one after).  Everything a step does is in here, so :meth:`Engine.compile` can hand the whole
        step (attention, head, sampling, next embedding) to ``torch.compile`` as one graph.
        """
        out = self.decoder(x, pos, cache, index + 1, None, layer_fns)
        code = sample(self.head(index - 1, out[:, -1]), index)
        return code, self.projection(self.audio_embeddings(code + index * self.vocab))[:, None]


SampleFn = Callable[[Tensor, int], Tensor]
DepthStep = Callable[[Tensor, Tensor, Tensor, int, SampleFn], tuple[Tensor, Tensor]]
