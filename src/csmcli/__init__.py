"""csmcli: fast, streaming speech synthesis with Sesame's CSM-1B.

The public API is imported lazily so that ``csm --help`` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

__all__ = ["Audio", "AudioChunk", "CsmError", "GenerationOptions", "History", "Segment", "Synthesizer", "Utterance"]
try:
    __version__ = version("csmcli")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

_WHERE = {
    "Audio": "synthesizer",
    "AudioChunk": "engine",
    "CsmError": "errors",
    "GenerationOptions": "options",
    "History": "utterance",
    "Segment": "prompt",
    "Synthesizer": "synthesizer",
    "Utterance": "utterance",
}

if TYPE_CHECKING:
    from .engine import AudioChunk
    from .errors import CsmError
    from .options import GenerationOptions
    from .prompt import Segment
    from .synthesizer import Audio, Synthesizer
    from .utterance import History, Utterance


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
