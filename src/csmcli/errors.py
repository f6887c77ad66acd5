"""User-facing errors: each carries one line that says what went wrong and how to fix it."""

from __future__ import annotations


class CsmError(Exception):
    """Base class for every error csmcli reports to a user (CLI message, HTTP 4xx/5xx body)."""

    #: HTTP status the server answers with when this error reaches it.
    http_status = 400
    #: Short machine-readable code for JSON error bodies.
    code = "invalid_request"


class OptionsError(CsmError, ValueError):
    """A generation option or request field is out of range or of the wrong type."""

    code = "invalid_option"


class InputError(CsmError, ValueError):
    """The text, context or another input cannot be synthesized as given."""

    code = "invalid_input"


class PromptTooLongError(InputError):
    """Prompt rows plus the frame budget do not fit the model's context."""

    code = "prompt_too_long"


class CheckpointError(CsmError):
    """The model could not be found, downloaded or loaded."""

    http_status = 500
    code = "checkpoint_error"


class AudioError(CsmError):
    """An audio file could not be read or written, or no audio device is usable."""

    code = "audio_error"
