"""The quantized-weight cache: a checkpoint is quantized once and its quantized layers are kept as a
safetensors file under the user's cache directory, which the caller passes in (the CLI picks it).

A file is keyed by the checkpoint's identity (resolved weight files with their sizes and
modification times), the quantization, its int4 group and int8-kept parts, the model dtype and
:data:`FORMAT_VERSION`; the key is also stored in the file and checked on reading.  Files are
written to a temporary name and renamed, so a reader never sees a partial one; a file that cannot
be read or does not fit is ignored with one warning (the caller quantizes again and rewrites it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("csmcli")

#: bump when the stored layout changes, so older files are not read
FORMAT_VERSION = 1


def cache_file(cache_dir: Path, weight_files: list[Path], settings: dict) -> tuple[Path, str]:
    """Where the quantized layers of the checkpoint made of ``weight_files`` are cached, and the key
    stored in that file; ``settings``: the quantization settings (JSON-serializable)."""
    files = []
    for f in weight_files:
        st = f.resolve().stat()
        files.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    key = json.dumps({"format": FORMAT_VERSION, "files": files, **settings}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    name = weight_files[0].resolve().parent.name or "model"
    return cache_dir / "quantized" / f"{name}-{settings.get('quantize', 'q')}-{digest}.safetensors", key


def read(file: Path, key: str) -> dict[str, Tensor] | None:
    """The tensors cached in ``file`` (None if there is none; a corrupt or foreign one: a warning too)."""
    from safetensors import safe_open

    if not file.is_file():
        return None
    try:
        with safe_open(str(file), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                raise ValueError("written for other weights or settings")
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as exc:  # safetensors raises its own error types for truncated or corrupt files
        warn_unusable(file, exc)
        return None


def warn_unusable(file: Path, exc: BaseException) -> None:
    """The one warning for a cache file that is not used (it is rewritten)."""
    log.warning("ignoring the quantized-weight cache %s (%s); quantizing again", file, str(exc).splitlines()[0])


def write(file: Path, key: str, tensors: dict[str, Tensor]) -> bool:
    """Save ``tensors`` to ``file`` atomically; False (with a warning) where the cache cannot be written."""
    from safetensors.torch import save_file

    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"key": key})
        os.replace(tmp, file)
        return True
    except OSError as exc:
        log.warning("cannot write the quantized-weight cache %s: %s", file, exc)
        tmp.unlink(missing_ok=True)
        return False


def settings_of(quantize: str, group: int, keep_int8: tuple[str, ...], dtype: torch.dtype) -> dict:
    """The quantization settings a cache file is keyed by."""
    return {"quantize": quantize, "group": group, "keep_int8": list(keep_int8), "dtype": str(dtype)}
