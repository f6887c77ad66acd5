"""Find and read CSM checkpoints: a hub id through the standard cache, or a local directory.

Both weight formats are accepted and told apart by key names: transformers' (the sharded
``transformers-*.safetensors`` that ``config.json``'s ``transformers_weights`` points to, with
the Mimi codec as ``codec_model.*``) and Sesame's original (``model.safetensors`` / ``ckpt.pt``,
interleaved RoPE, converted on load).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import convert
from .errors import CheckpointError
from .options import DEFAULT_MODEL

if TYPE_CHECKING:  # finding and inspecting a checkpoint (``csm voices``) does not import torch
    from torch import Tensor

MIMI_MODEL = "kyutai/mimi"

#: What csmcli needs from the hub repository (about 7 GB of its 19 GB: the original-format
#: ``model.safetensors`` and ``ckpt.pt`` repeat the same weights and are skipped).
DOWNLOAD_PATTERNS = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "transformers.safetensors.index.json",
    "transformers-*.safetensors",
    "prompts/*",
)

#: The architecture of sesame/csm-1b, for original-format directories that carry no
#: transformers ``config.json`` (and for full-size random-weight benchmarks).
CSM_1B_CONFIG: dict[str, Any] = {
    "model_type": "csm",
    "num_codebooks": 32,
    "vocab_size": 2051,
    "text_vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 128000,
    "rope_parameters": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 0.125,
        "high_freq_factor": 0.5,
        "original_max_position_embeddings": 1024,
    },
    "depth_decoder_config": {
        "model_type": "csm_depth_decoder_model",
        "num_codebooks": 32,
        "backbone_hidden_size": 2048,
        "vocab_size": 2051,
        "hidden_size": 1024,
        "intermediate_size": 8192,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 128,
        "max_position_embeddings": 33,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 0.001953125,
            "high_freq_factor": 0.0078125,
            "original_max_position_embeddings": 16,
        },
    },
}

_HUB_HINT = "log in (`hf auth login` or HF_TOKEN), accept the licence on the model page, or pass --model DIR"


@dataclass
class Checkpoint:
    """A located checkpoint: its directory, config, weight files and their key format."""

    path: Path
    config: dict[str, Any]
    weight_files: list[Path]
    weight_format: str
    tokenizer_file: Path
    prompts_dir: Path | None = None


def resolve(model: str, local_files_only: bool = False) -> Path:
    """A local directory for ``model`` (a directory path, or a hub id fetched/read via the hub cache).

    A directory never touches the network.  A hub id is first looked up in the cache (so a cached
    model works offline); only if that fails is the hub asked.
    """
    local = Path(model).expanduser()
    if local.is_dir():
        return local
    if _looks_like_path(model):
        raise CheckpointError(f"model directory not found: {model}")
    try:
        return _snapshot(model, local_files_only=True)
    except CheckpointError:
        if local_files_only or _offline():
            raise CheckpointError(
                f"{model} is not in the local hub cache and the hub may not be contacted (offline): "
                "run `csm download` while online, or pass --model DIR"
            ) from None
    return _snapshot(model, local_files_only=False)


def download(model: str = DEFAULT_MODEL) -> Path:
    """Fetch what csmcli needs of ``model`` into the standard hub cache; returns the snapshot dir."""
    if _offline():
        raise CheckpointError("cannot download while HF_HUB_OFFLINE is set: unset it and try again")
    return _snapshot(model, local_files_only=False)


def _looks_like_path(model: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else that is not a directory is a bad path."""
    return model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _snapshot(repo_id: str, local_files_only: bool) -> Path:
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import snapshot_download

    try:
        path = Path(
            snapshot_download(repo_id, allow_patterns=list(DOWNLOAD_PATTERNS), local_files_only=local_files_only)
        )
    except hub_errors.GatedRepoError:
        raise CheckpointError(f"{repo_id} is gated: {_HUB_HINT}") from None
    except hub_errors.RepositoryNotFoundError:
        raise CheckpointError(f"no model repository {repo_id} on the hub (or it is private): {_HUB_HINT}") from None
    except hub_errors.HFValidationError:
        raise CheckpointError(f"{repo_id!r} is neither a directory nor a valid hub id") from None
    except hub_errors.LocalEntryNotFoundError:
        raise CheckpointError(
            f"{repo_id} is not cached and the hub cannot be reached: connect and run `csm download`, "
            "or pass --model DIR"
        ) from None
    except (hub_errors.HfHubHTTPError, OSError) as exc:
        raise CheckpointError(f"could not fetch {repo_id}: {_one_line(exc)}") from None
    if local_files_only and not (path / "config.json").is_file():
        raise CheckpointError(f"{repo_id} is only partly cached")
    return path


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def inspect(path: Path) -> Checkpoint:
    """Read a checkpoint directory's config and find its weights, tokenizer and prompts."""
    config_file = path / "config.json"
    raw: dict[str, Any] = {}
    if config_file.is_file():
        try:
            raw = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{config_file} is not valid JSON: {_one_line(exc)}") from None
    config = raw if raw.get("model_type") == "csm" else CSM_1B_CONFIG
    files = _weight_files(path, raw)
    keys = _keys(files)
    try:
        fmt = convert.detect_format(keys)
    except CheckpointError:
        raise CheckpointError(f"{path} is not a CSM checkpoint: its weights have no CSM tensor names") from None
    tokenizer = path / "tokenizer.json"
    if not tokenizer.is_file():
        raise CheckpointError(f"{path} has no tokenizer.json: it is not a complete CSM checkpoint")
    prompts = path / "prompts"
    return Checkpoint(
        path=path,
        config=config,
        weight_files=files,
        weight_format=fmt,
        tokenizer_file=tokenizer,
        prompts_dir=prompts if prompts.is_dir() else None,
    )


def _weight_files(path: Path, raw: dict[str, Any]) -> list[Path]:
    candidates = [raw["transformers_weights"]] if raw.get("transformers_weights") else []
    candidates += [
        "transformers.safetensors.index.json",
        "model.safetensors.index.json",
        "model.safetensors",
        "ckpt.pt",
    ]
    for name in candidates:
        file = path / name
        if not file.is_file():
            continue
        if name.endswith(".index.json"):
            try:
                weight_map = json.loads(file.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                raise CheckpointError(f"{file} is not a valid safetensors index: {_one_line(exc)}") from None
            shards = [path / shard for shard in dict.fromkeys(weight_map.values())]
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise CheckpointError(f"{path} is missing weight shards {', '.join(missing)}: download it again")
            return shards
        return [file]
    raise CheckpointError(f"{path} is not a CSM checkpoint: no weights (model.safetensors, ckpt.pt or a shard index)")


def _keys(files: list[Path]) -> list[str]:
    keys: list[str] = []
    for file in files:
        if file.suffix == ".pt":
            keys += list(_load_pickle(file))
            continue
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="numpy") as f:  # keys only: no torch needed
                keys += list(f.keys())
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{file} is corrupt or not a safetensors file: {_one_line(exc)}") from None
    return keys


def _load_pickle(file: Path) -> dict[str, Tensor]:
    import torch

    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for a bad pickle
        raise CheckpointError(f"{file} is corrupt or not a torch checkpoint: {_one_line(exc)}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} does not hold a state dict")
    return state


def read_tensors(ckpt: Checkpoint) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """All tensors in transformers naming, split into (CSM model, Mimi codec without prefix)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, Tensor] = {}
    for file in ckpt.weight_files:
        if file.suffix == ".pt":
            state.update(_load_pickle(file))
            continue
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{file} is corrupt: {_one_line(exc)}") from None
    codec = {k[len("codec_model.") :]: v for k, v in state.items() if k.startswith("codec_model.")}
    model = {k: v for k, v in state.items() if not k.startswith("codec_model.")}
    if ckpt.weight_format == "original":
        model = convert.original_to_transformers(model, ckpt.config)
    return model, codec


def to_model_state(sd: dict[str, Tensor], config: dict[str, Any]) -> dict[str, Tensor]:
    """Map transformers names onto :class:`csmcli.model.CSMModel`'s (fusing QKV and gate/up)."""
    import torch

    out: dict[str, Tensor] = {}
    try:
        out["text_embeddings.weight"] = sd["embed_text_tokens.weight"]
        # Tied with the depth decoder's table; a checkpoint may store either copy.
        tied = "backbone_model.embed_tokens.embed_audio_tokens.weight"
        out["audio_embeddings.weight"] = sd[tied] if tied in sd else sd["depth_decoder.model.embed_tokens.weight"]
        out["codebook0_head.weight"] = sd["lm_head.weight"]
        out["projection.weight"] = sd["depth_decoder.model.inputs_embeds_projector.weight"]
        out["audio_head"] = sd["depth_decoder.codebooks_head.weight"]
        for ours, theirs, n in (
            ("backbone", "backbone_model", config["num_hidden_layers"]),
            ("decoder", "depth_decoder.model", config["depth_decoder_config"]["num_hidden_layers"]),
        ):
            out[f"{ours}.norm.weight"] = sd[f"{theirs}.norm.weight"]
            for i in range(n):
                src, dst = f"{theirs}.layers.{i}", f"{ours}.layers.{i}"
                out[f"{dst}.attn_norm.weight"] = sd[f"{src}.input_layernorm.weight"]
                out[f"{dst}.ffn_norm.weight"] = sd[f"{src}.post_attention_layernorm.weight"]
                out[f"{dst}.wqkv.weight"] = torch.cat([sd[f"{src}.self_attn.{p}_proj.weight"] for p in "qkv"], dim=0)
                out[f"{dst}.wo.weight"] = sd[f"{src}.self_attn.o_proj.weight"]
                out[f"{dst}.w13.weight"] = torch.cat(
                    [sd[f"{src}.mlp.gate_proj.weight"], sd[f"{src}.mlp.up_proj.weight"]], dim=0
                )
                out[f"{dst}.w2.weight"] = sd[f"{src}.mlp.down_proj.weight"]
    except KeyError as exc:
        raise CheckpointError(f"checkpoint is missing tensor {exc.args[0]}: it is incomplete or not CSM") from None
    return out
