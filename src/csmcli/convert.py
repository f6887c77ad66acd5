"""Convert CSM-1B weights between Sesame's original key format and the transformers key format.

The two formats hold the same tensors under different names, with one real difference: the
original model applies RoPE to adjacent channel pairs (torchtune's interleaved layout) while
transformers rotates the two halves of each head (``rotate_half``). The rows of every q_proj and
k_proj are therefore permuted per head, exactly like Meta's Llama weights are for transformers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch import Tensor

from .errors import CheckpointError

Format = Literal["transformers", "original"]

#: Wrapper prefixes that torch.compile, DDP or a training harness put in front of original names.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "model.")

#: Per-layer renames: original suffix -> transformers suffix.
_LAYER_NAMES = {
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.output_proj.weight": "self_attn.o_proj.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
    "sa_norm.scale": "input_layernorm.weight",
    "mlp_norm.scale": "post_attention_layernorm.weight",
}

#: Stacks: original prefix -> transformers prefix.
_STACKS = {"backbone": "backbone_model", "decoder": "depth_decoder.model"}

#: Tensors outside the layer stacks: original name -> transformers name.
_GLOBAL_NAMES = {
    "backbone.norm.scale": "backbone_model.norm.weight",
    "decoder.norm.scale": "depth_decoder.model.norm.weight",
    "text_embeddings.weight": "embed_text_tokens.weight",
    "audio_embeddings.weight": "backbone_model.embed_tokens.embed_audio_tokens.weight",
    "projection.weight": "depth_decoder.model.inputs_embeds_projector.weight",
    "codebook0_head.weight": "lm_head.weight",
    "audio_head": "depth_decoder.codebooks_head.weight",
}

#: transformers' depth decoder keeps its own (tied) copy of the audio embedding table.
_TIED_AUDIO_EMBEDDINGS = "depth_decoder.model.embed_tokens.weight"

#: Non-weight buffers some original checkpoints carry (KV-cache masks); they are dropped.
_ORIGINAL_IGNORED = re.compile(r"^(backbone_causal_mask|decoder_causal_mask)$")

#: Top-level original names that only a CSM checkpoint has (Mimi's own ``decoder.layers`` does not count).
_ORIGINAL_MARKERS = ("text_embeddings.weight", "codebook0_head.weight", "audio_head")

_ORIGINAL_LAYER = re.compile(r"^(backbone|decoder)\.layers\.(\d+)\.(.+)$")
_TRANSFORMERS_LAYER = re.compile(r"^(backbone_model|depth_decoder\.model)\.layers\.(\d+)\.(.+)$")


def _strip_wrappers(key: str) -> str:
    """Remove torch.compile's ``_orig_mod.`` segments and leading ``model.``/``module.`` prefixes."""
    key = key.replace("_orig_mod.", "")
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                changed = True
    return key


def _config_dict(cfg: Any) -> Mapping[str, Any]:
    """Accept a CsmConfig dict (config.json content) or a transformers config object."""
    if isinstance(cfg, Mapping):
        return cfg
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    raise CheckpointError(f"expected a CSM config dict, got {type(cfg).__name__}")


def _attention_dims(cfg: Mapping[str, Any], stack: str) -> tuple[int, int, int]:
    """Return (num_attention_heads, num_key_value_heads, head_dim) of the original ``stack``."""
    sub = cfg if stack == "backbone" else cfg.get("depth_decoder_config")
    where = "config" if stack == "backbone" else "config.depth_decoder_config"
    if not isinstance(sub, Mapping) or not sub.get("num_attention_heads"):
        raise CheckpointError(f"{where} lacks num_attention_heads; cannot convert attention weights")
    heads = int(sub["num_attention_heads"])
    kv_heads = int(sub.get("num_key_value_heads") or heads)
    head_dim = sub.get("head_dim") or (int(sub["hidden_size"]) // heads if sub.get("hidden_size") else None)
    if not head_dim:
        raise CheckpointError(f"{where} lacks head_dim and hidden_size; cannot convert attention weights")
    return heads, kv_heads, int(head_dim)


def _interleaved_to_halves(weight: Tensor, heads: int, head_dim: int, name: str) -> Tensor:
    """Permute q/k rows per head from adjacent RoPE pairs (2i, 2i+1) to halves (i, i + head_dim/2)."""
    _check_rows(weight, heads, head_dim, name)
    cols = weight.shape[1]
    return weight.reshape(heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(heads * head_dim, cols)


def _halves_to_interleaved(weight: Tensor, heads: int, head_dim: int, name: str) -> Tensor:
    """Inverse of :func:`_interleaved_to_halves`."""
    _check_rows(weight, heads, head_dim, name)
    cols = weight.shape[1]
    return weight.reshape(heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(heads * head_dim, cols)


def _check_rows(weight: Tensor, heads: int, head_dim: int, name: str) -> None:
    """Raise if a q/k projection does not have heads * head_dim rows."""
    if weight.dim() != 2 or weight.shape[0] != heads * head_dim or head_dim % 2:
        shape = tuple(weight.shape)
        raise CheckpointError(f"{name} has shape {shape}, expected ({heads} x {head_dim}, ...) per the config")


def _layer_counts(cfg: Mapping[str, Any], keys: Iterable[str], pattern: re.Pattern[str]) -> dict[str, int]:
    """Layers per original stack: from the config, else one more than the highest index in ``keys``."""
    found: dict[str, int] = {stack: 0 for stack in _STACKS}
    stack_of = {**{s: s for s in _STACKS}, **{v: k for k, v in _STACKS.items()}}
    for key in keys:
        match = pattern.match(key)
        if match:
            stack = stack_of[match.group(1)]
            found[stack] = max(found[stack], int(match.group(2)) + 1)
    counts = {}
    for stack, highest in found.items():
        sub = cfg if stack == "backbone" else cfg.get("depth_decoder_config") or {}
        declared = sub.get("num_hidden_layers")
        counts[stack] = int(declared) if declared is not None else highest
    return counts


def _name_pairs(counts: Mapping[str, int]) -> dict[str, str]:
    """Every original tensor name mapped to its transformers name, for the given layer counts."""
    pairs = dict(_GLOBAL_NAMES)
    for stack, count in counts.items():
        for index in range(count):
            for old, new in _LAYER_NAMES.items():
                pairs[f"{stack}.layers.{index}.{old}"] = f"{_STACKS[stack]}.layers.{index}.{new}"
    return pairs


def _check_keys(present: Iterable[str], expected: Iterable[str], source: str) -> None:
    """Raise CheckpointError on the first missing or unexpected key."""
    present, expected = list(present), list(expected)
    known = set(present)
    for key in expected:
        if key not in known:
            raise CheckpointError(f"{source}-format CSM checkpoint is missing key {key}")
    wanted = set(expected)
    for key in present:
        if key not in wanted:
            raise CheckpointError(f"unexpected key {key} in a {source}-format CSM checkpoint")


def _permute_qk(name: str, tensor: Tensor, dims: Mapping[str, tuple[int, int, int]], to_halves: bool) -> Tensor:
    """Permute the rows of an original-named q_proj/k_proj tensor; return other tensors unchanged."""
    match = _ORIGINAL_LAYER.match(name)
    if not match or match.group(3) not in ("attn.q_proj.weight", "attn.k_proj.weight"):
        return tensor
    heads, kv_heads, head_dim = dims[match.group(1)]
    count = heads if match.group(3) == "attn.q_proj.weight" else kv_heads
    permute = _interleaved_to_halves if to_halves else _halves_to_interleaved
    return permute(tensor, count, head_dim, name)


def original_to_transformers(sd: Mapping[str, Tensor], cfg: Any) -> dict[str, Tensor]:
    """Rename Sesame's original CSM weights to transformers names and permute q/k rows for rotate-half RoPE.

    ``cfg`` is a CsmConfig dict (``config.json``): the backbone attention sizes are read from its top
    level and the depth decoder's from ``depth_decoder_config``. Wrapper prefixes (``_orig_mod.``,
    ``model.``) are stripped. The output carries the tied copy of the audio embeddings under
    ``depth_decoder.model.embed_tokens.weight`` and no ``codec_model.*`` keys.
    """
    cfg = _config_dict(cfg)
    dims = {stack: _attention_dims(cfg, stack) for stack in _STACKS}
    named: dict[str, Tensor] = {}
    for raw_key, tensor in sd.items():
        key = _strip_wrappers(raw_key)
        if _ORIGINAL_IGNORED.match(key):
            continue
        if key in named:
            raise CheckpointError(f"key {raw_key} appears twice once wrapper prefixes are stripped")
        named[key] = tensor
    pairs = _name_pairs(_layer_counts(cfg, named, _ORIGINAL_LAYER))
    _check_keys(named, pairs, "original")
    out = {pairs[key]: _permute_qk(key, tensor, dims, to_halves=True) for key, tensor in named.items()}
    out[_TIED_AUDIO_EMBEDDINGS] = out[_GLOBAL_NAMES["audio_embeddings.weight"]]
    return out


def transformers_to_original(sd: Mapping[str, Tensor], cfg: Any) -> dict[str, Tensor]:
    """Exact inverse of :func:`original_to_transformers`.

    ``codec_model.*`` keys (Mimi) are dropped, since original checkpoints do not carry the codec, and
    so is the tied ``depth_decoder.model.embed_tokens.weight`` (a copy of the audio embeddings).
    """
    cfg = _config_dict(cfg)
    dims = {stack: _attention_dims(cfg, stack) for stack in _STACKS}
    named = {k: v for k, v in sd.items() if not k.startswith("codec_model.") and k != _TIED_AUDIO_EMBEDDINGS}
    audio_key = _GLOBAL_NAMES["audio_embeddings.weight"]
    if audio_key not in named and _TIED_AUDIO_EMBEDDINGS in sd:
        named[audio_key] = sd[_TIED_AUDIO_EMBEDDINGS]
    pairs = _name_pairs(_layer_counts(cfg, named, _TRANSFORMERS_LAYER))
    _check_keys(named, pairs.values(), "transformers")
    inverse = {new: old for old, new in pairs.items()}
    return {inverse[key]: _permute_qk(inverse[key], tensor, dims, to_halves=False) for key, tensor in named.items()}


def detect_format(keys: Iterable[str], source: str = "checkpoint") -> Format:
    """Tell the two CSM key formats apart by tensor names (never by file names).

    Returns ``"transformers"`` when backbone keys are named ``backbone_model.*`` and ``"original"``
    when they are Sesame's ``backbone.layers.*``/``text_embeddings``/``codebook0_head`` (wrapper
    prefixes such as ``_orig_mod.`` or ``model.`` are ignored). Raises CheckpointError otherwise.
    """
    transformers_like = original_like = False
    for raw in keys:
        key = _strip_wrappers(raw)
        if raw.startswith(("backbone_model.", "depth_decoder.", "embed_text_tokens.")):
            transformers_like = True
        elif key.startswith("backbone.layers.") or key in _ORIGINAL_MARKERS:
            original_like = True
    if transformers_like and original_like:
        raise CheckpointError(f"{source} mixes original and transformers CSM key names; cannot load it")
    if transformers_like:
        return "transformers"
    if original_like:
        return "original"
    raise CheckpointError(f"{source} is not a CSM checkpoint (no backbone/text-embedding weights found)")
