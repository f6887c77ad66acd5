"""Server-wide settings (``csm serve``'s flags) with their checks."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import OptionsError
from ..options import GenerationOptions
from .requests import MAX_TEXT_CHARS
from .uploads import MAX_UPLOAD_BYTES

#: Most context clips one request may carry.
MAX_CONTEXT_CLIPS = 8


@dataclass(frozen=True)
class ServerConfig:
    """Server-wide settings; ``defaults`` are the generation options requests start from.

    ``keepalive_timeout`` closes a connection idle that long (also one whose first request's headers
    never finish); ``read_timeout`` bounds how long a request body may take to arrive;
    ``max_connections`` caps open connections (more get 503 and are closed); ``max_buffered_s`` is
    how much generated audio may wait for a slow reader before its request is cut;
    ``max_context_bytes`` is the largest body a request carrying context audio may send (a multipart
    form's files, or a JSON body with base64 clips), ``max_context_clips`` how many clips it may carry.
    """

    defaults: GenerationOptions = GenerationOptions()
    model_id: str = "csm-1b"
    max_queue: int = 32
    api_key: str | None = None
    request_timeout: float = 300.0
    grace_period: float = 10.0
    max_text_chars: int = MAX_TEXT_CHARS
    keepalive_timeout: float = 15.0
    read_timeout: float = 30.0
    max_connections: int = 256
    max_buffered_s: float = 60.0
    read_only_voices: bool = False
    max_voices: int = 100
    max_context_bytes: int = MAX_UPLOAD_BYTES
    max_context_clips: int = MAX_CONTEXT_CLIPS

    def __post_init__(self) -> None:
        if self.max_queue < 0:
            raise OptionsError(f"max_queue must be 0 or more, got {self.max_queue}")
        for name in ("request_timeout", "keepalive_timeout", "read_timeout", "max_buffered_s"):
            if not getattr(self, name) > 0:
                raise OptionsError(f"{name} must be more than 0 seconds, got {getattr(self, name)}")
        if not self.grace_period >= 0:
            raise OptionsError(f"grace_period must be 0 or more seconds, got {self.grace_period}")
        if self.max_text_chars < 1:
            raise OptionsError(f"max_text_chars must be at least 1, got {self.max_text_chars}")
        if self.max_voices < 0:
            raise OptionsError(f"max_voices must be 0 or more, got {self.max_voices}")
        if self.max_context_clips < 0 or self.max_context_bytes < 0:
            raise OptionsError("max_context_clips and max_context_bytes must be 0 or more")
        if self.max_connections < 1:
            raise OptionsError(f"max_connections must be at least 1, got {self.max_connections}")
        if self.api_key is not None and not self.api_key.isascii():
            raise OptionsError("the API key must be ASCII (it travels in an HTTP header)")
