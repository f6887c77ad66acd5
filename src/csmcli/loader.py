"""The one loader: device and dtype choice, weights, quantization, CPU kernels, compile, CUDA graphs
and the codec, each a parameter (nothing here reads the environment; the CLI does and passes it).

:meth:`csmcli.Synthesizer.load` and ``csm bench`` both load through :func:`load_parts` and
:func:`make_engine`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import checkpoint, cpu, quantcache
from .codec import Codec
from .engine import Engine
from .errors import CheckpointError, OptionsError
from .model import CSMModel, TransformerSpec
from .quant import INT4_GROUP, INT4_KEEP_INT8, check_quantization, load_quantized, quantize, quantized_tensors
from .threads import check_threads, resolve_threads

log = logging.getLogger("csmcli")

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU; asking for a missing one is an error."""
    if name not in DEVICES:
        raise OptionsError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if cuda else "mps" if mps else "cpu"
    if name == "cuda" and not cuda:
        raise OptionsError("device cuda requested but no CUDA GPU is usable by this torch build")
    if name == "mps" and not mps:
        raise OptionsError("device mps requested but Apple's MPS backend is not available")
    return torch.device(name)


def pick_dtype(
    name: str, device: torch.device, caps: cpu.CpuCaps | None = None, kernels: str | None = None
) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA, on CPUs with native bfloat16 (AVX512-BF16 or AMX) and on CPUs
    where csmcli's bf16 kernel runs (AVX2 and up: it reads half the bytes of float32 and multiplies
    in float32), float16 on MPS, float32 on other CPUs.  ``caps``: the CPU's
    capabilities (default: detected); ``kernels``: the CPU kernels asked for (see :mod:`csmcli.cpu`)."""
    if name == "auto":
        if device.type == "cpu":
            caps = caps or cpu.cpu_caps()
            if caps.native_bf16 or cpu.bf16_kernel(torch.bfloat16, caps, kernels) is not None:
                return torch.bfloat16
            return torch.float32
        return {"cuda": torch.bfloat16, "mps": torch.float16}.get(device.type, torch.float32)
    if name not in DTYPES:
        raise OptionsError(f"dtype must be one of auto, {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def build_model(config: dict, state: dict[str, Tensor], device: torch.device, dtype: torch.dtype) -> CSMModel:
    """Instantiate :class:`CSMModel` on ``device`` straight from a state dict (no random init pass)."""
    with torch.device("meta"):
        model = CSMModel(config)
    ours = checkpoint.to_model_state(state, config)
    ours = {k: v.to(device=device, dtype=dtype) for k, v in ours.items()}
    try:
        model.load_state_dict(ours, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint tensors do not fit its config: {str(exc).splitlines()[0]}") from None
    model.init_buffers(device)
    model.requires_grad_(False)
    return model.eval()


@dataclass
class Parts:
    """What :func:`load_parts` loaded: everything an engine and a synthesizer are built from, and the
    settings it checked (``max_batch_size``, ``quantize``, ``compile``: compile the engine, ``cpu_kernels``).
    ``quant_cache``: what the quantized-weight cache did (``off``, ``read``, ``written``)."""

    model: CSMModel
    codec: Codec
    device: torch.device
    dtype: torch.dtype
    cpu_caps: cpu.CpuCaps | None
    config: dict[str, Any]
    source: str
    max_batch_size: int = 1
    quantize: str = "none"
    compile: bool = False
    cpu_kernels: str = "auto"
    path: Path | None = None
    tokenizer: Any = None
    prompts_dir: Path | None = None
    state: dict[str, Tensor] | None = None
    quant_cache: str = "off"


def load_parts(
    model: str | None = checkpoint.DEFAULT_MODEL,
    *,
    device: str = "auto",
    dtype: str = "auto",
    local_files_only: bool = False,
    max_batch_size: int = 1,
    quantize: str = "none",
    compile: bool = False,
    cpu_kernels: str | None = None,
    cpu_isa: str | None = None,
    mimi: str = checkpoint.MIMI_MODEL,
    keep_state: bool = False,
    threads: int | str | None = None,
    cache_dir: Path | None = None,
) -> Parts:
    """Check the settings, then load ``model`` (hub id or directory; None: the full-size CSM-1B
    architecture with random weights and a random Mimi, for benchmarks) onto ``device``.

    ``mimi`` is where the codec comes from when the checkpoint has none.  ``keep_state`` keeps the
    source state dict (on the CPU) in :attr:`Parts.state`, e.g. for a reference model.  ``threads``:
    torch's CPU threads, a number or ``auto`` (:mod:`csmcli.threads`), set before anything compiles
    (inductor's CPU kernels may specialize on the count); None leaves torch's setting.  ``cache_dir``:
    where quantized weights are cached (see :mod:`csmcli.quantcache`; None: not cached).
    """
    check_threads(threads)
    torch_device = pick_device(device)
    caps = cpu.cpu_caps(cpu_isa) if torch_device.type == "cpu" else None
    cpu_kernels = cpu.check_cpu_kernels(cpu_kernels)
    torch_dtype = pick_dtype(dtype, torch_device, caps, cpu_kernels)
    if max_batch_size < 1:
        raise OptionsError(f"max_batch_size must be at least 1, got {max_batch_size}")
    check_quantization(quantize)
    if threads is not None:
        torch.set_num_threads(resolve_threads(threads))
    if compile and caps:
        cpu.check_compilable(quantize != "none", cpu_kernels, torch_dtype, caps, max_batch_size)
    ckpt = path = None
    if model is None:
        config = checkpoint.CSM_1B_CONFIG
    else:
        path = checkpoint.resolve(model, local_files_only=local_files_only)
        ckpt = checkpoint.inspect(path)
        config = ckpt.config
    if caps:
        specs = [TransformerSpec.from_config(config), TransformerSpec.from_config(config["depth_decoder_config"])]
        if cpu.needs_gemv(cpu_kernels, specs, max_batch_size, quantize != "none", caps, torch_dtype):
            cpu.warm_up_gemv(torch_dtype, caps)  # compiles while the weights load
    if ckpt is None:  # a GPU draws the random values in well under a second
        state, codec_state = random_state(config, device=torch_device if torch_device.type == "cuda" else None), None
    else:
        state, codec_state = checkpoint.read_tensors(ckpt)
    net = build_model(config, state, torch_device, torch_dtype)
    state = {k: v.cpu() for k, v in state.items()} if keep_state else None
    if torch_device.type == "cuda":  # the source tensors are off the GPU: peak memory is the engine's
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(torch_device)
    files = ckpt.weight_files if ckpt else None
    cached = quantize_cached(net, quantize, files, cache_dir, torch_dtype, Path(model or "model").name)
    if ckpt is None:
        codec = random_codec(torch_device)
    elif codec_state:
        codec = Codec.from_state_dict(config["codec_config"], codec_state, torch_device)
    else:
        codec = Codec.from_pretrained(checkpoint.resolve(mimi, local_files_only), torch_device)
    source = str(path) if path else "random weights, full-size CSM-1B architecture"
    parts = Parts(
        net, codec, torch_device, torch_dtype, caps, config, source, max_batch_size, quantize, compile, cpu_kernels
    )
    parts.path, parts.state, parts.quant_cache = path, state, cached
    if ckpt is not None:
        parts.tokenizer, parts.prompts_dir = _tokenizer(ckpt.tokenizer_file), ckpt.prompts_dir
    return parts


def quantize_cached(
    net: CSMModel,
    name: str,
    weight_files: list[Path] | None,
    cache_dir: Path | None,
    dtype: torch.dtype,
    label: str = "model",
) -> str:
    """Quantize ``net`` in place (:func:`csmcli.quant.quantize`), reading the quantized layers from
    the cache under ``cache_dir`` when it has them for these ``weight_files`` and writing them there
    when not (``label`` names the file).  Returns ``off`` (not cached: no quantization, cache or
    checkpoint), ``read`` or ``written``."""
    if name == "none":
        return "off"
    if weight_files is None or cache_dir is None:
        quantize(net, name)
        return "off"
    int4 = name == "int4"
    settings = quantcache.settings_of(name, INT4_GROUP if int4 else 0, INT4_KEEP_INT8 if int4 else (), dtype)
    file, key = quantcache.cache_file(cache_dir, weight_files, settings, label)
    tensors = quantcache.read(file, key)
    if tensors is not None:
        try:
            load_quantized(net, tensors)
            log.info("quantized weights read from %s", file)
            return "read"
        except ValueError as exc:
            quantcache.warn_unusable(file, exc)
    quantize(net, name)
    return "written" if quantcache.write(file, key, quantized_tensors(net)) else "off"


def random_state(config: dict[str, Any], seed: int = 0, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """A transformers-format CSM state dict with random weights (reserved codes never win).

    Drawn on ``device``: a GPU draws the 1.6 G values in well under a second (the CPU takes tens of
    seconds); the values then differ from the CPU's."""
    from transformers import CsmConfig, CsmForConditionalGeneration

    torch.manual_seed(seed)
    device = device or torch.device("cpu")
    cfg = CsmConfig(**{k: v for k, v in config.items() if k != "model_type"})
    with torch.device("meta"):
        ref = CsmForConditionalGeneration(cfg)
    state = {}
    for name, tensor in ref.state_dict().items():
        if name.startswith("codec_model."):
            continue
        t = torch.empty(tensor.shape, device=device)
        if name.endswith("norm.weight"):
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02)
        state[name] = t
    state["lm_head.weight"][2048:] = 0
    state["depth_decoder.codebooks_head.weight"][:, :, 2048:] = 0
    return state


def random_codec(device: torch.device) -> Codec:
    """Full-size Mimi with random weights (decoding cost does not depend on the values)."""
    from transformers import MimiConfig, MimiModel

    torch.manual_seed(0)
    return Codec(MimiModel(MimiConfig()).eval().to(device))


def _tokenizer(path: Path) -> Any:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise CheckpointError(f"{path} is not a valid tokenizer: {exc}") from None


def make_engine(
    model: CSMModel,
    codec: Codec,
    device: torch.device,
    dtype: torch.dtype,
    max_batch_size: int = 1,
    *,
    compile: bool = False,
    cuda_graphs: bool = True,
    cpu_kernels: str | None = None,
    cpu_caps: cpu.CpuCaps | None = None,
) -> Engine:
    """An :class:`Engine` on a loaded model: CPU kernels chosen, then compiled (``compile``: on a GPU
    the layers, on the CPU every depth-decoder step whole) and its frames captured as CUDA graphs
    (``cuda_graphs``, on CUDA only)."""
    engine = Engine(model, codec, device, dtype, max_batch=max_batch_size, cpu_kernels=cpu_kernels, cpu_caps=cpu_caps)
    if compile:
        engine.compile()
    if cuda_graphs and device.type == "cuda":
        engine.capture_graphs()
    return engine
