"""Text and context segments -> prompt rows of 33 columns (32 audio codebooks + 1 text) with a mask.

A text segment is ``<|begin_of_text|>[{speaker}]{text}<|end_of_text|>``, one row per token with
only the text column live.  A context segment adds its Mimi frames (one row per frame, the 32
audio columns live) and then one all-zero audio frame that marks its end.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .errors import InputError
from .options import check_speaker, check_text

BOS_TOKEN, EOS_TOKEN = "<|begin_of_text|>", "<|end_of_text|>"
BOS_ID, EOS_ID = 128000, 128001


@dataclass
class Segment:
    """One utterance of a conversation: what was said, by which speaker, and optionally how it sounded.

    ``audio`` is float32 mono at 24 kHz; ``codes`` (``[frames, 32]``) may be given instead, or is
    filled in once the audio has been encoded so the work is not repeated.
    """

    text: str
    speaker: int = 0
    audio: np.ndarray | None = None
    codes: Tensor | None = field(default=None, repr=False)


@dataclass
class Prompt:
    """Prompt rows ``tokens`` ``[T, 33]`` (long) and ``mask`` ``[T, 33]`` (bool).

    The first ``prefix_len`` rows (the context segments) form a reusable prefix: the engine keeps
    their KV cache under ``prefix_key`` so the next prompt with the same context skips them.
    """

    tokens: Tensor
    mask: Tensor
    prefix_len: int = 0

    @property
    def prefix_key(self) -> str | None:
        """A digest of the prefix rows, or None without a prefix."""
        if not self.prefix_len:
            return None
        digest = hashlib.sha256(self.tokens[: self.prefix_len].numpy().tobytes())
        digest.update(self.mask[: self.prefix_len].numpy().tobytes())
        return digest.hexdigest()

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @staticmethod
    def concat(parts: Sequence[Prompt]) -> Prompt:
        """Rows of several prompts one after another."""
        return Prompt(torch.cat([p.tokens for p in parts]), torch.cat([p.mask for p in parts]))


class PromptBuilder:
    """Tokenizes text and lays out segments as rows; audio is encoded with ``encode`` when needed."""

    def __init__(self, tokenizer, encode, num_codebooks: int = 32) -> None:
        self.tokenizer = tokenizer
        self.encode = encode
        self.num_codebooks = num_codebooks
        self.bos = tokenizer.token_to_id(BOS_TOKEN)
        self.eos = tokenizer.token_to_id(EOS_TOKEN)
        self.bos = BOS_ID if self.bos is None else self.bos
        self.eos = EOS_ID if self.eos is None else self.eos

    def text_ids(self, text: str, speaker: int) -> list[int]:
        """Token ids of one text segment, with begin/end markers."""
        ids = self.tokenizer.encode(f"[{speaker}]{text}", add_special_tokens=False).ids
        return [self.bos, *ids, self.eos]

    def text_rows(self, text: str, speaker: int) -> Prompt:
        """Rows for a text segment (text column only)."""
        ids = torch.tensor(self.text_ids(text, speaker), dtype=torch.long)
        tokens = torch.zeros(len(ids), self.num_codebooks + 1, dtype=torch.long)
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        tokens[:, -1] = ids
        mask[:, -1] = True
        return Prompt(tokens, mask)

    def audio_rows(self, codes: Tensor) -> Prompt:
        """Rows for Mimi frames ``[F, 32]`` plus the all-zero end frame (audio columns only)."""
        frames = torch.cat([codes.long().cpu(), torch.zeros(1, self.num_codebooks, dtype=torch.long)])
        tokens = torch.zeros(len(frames), self.num_codebooks + 1, dtype=torch.long)
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        tokens[:, :-1] = frames
        mask[:, :-1] = True
        return Prompt(tokens, mask)

    def segment_rows(self, segment: Segment) -> Prompt:
        """Rows for a context segment: its text, its audio frames, the end frame."""
        check_text(segment.text)
        check_speaker(segment.speaker)
        if segment.codes is None:
            if segment.audio is None:
                raise InputError("a context segment needs audio (or codes) as well as text")
            segment.codes = self.encode(segment.audio)
        return Prompt.concat([self.text_rows(segment.text, segment.speaker), self.audio_rows(segment.codes)])

    def build(self, text: str, speaker: int, context: Sequence[Segment] = ()) -> Prompt:
        """The whole prompt: context segments in order, then the text to speak."""
        check_text(text)
        check_speaker(speaker)
        parts = [self.segment_rows(s) for s in context]
        prefix_len = sum(len(p) for p in parts)
        parts.append(self.text_rows(text, speaker))
        prompt = Prompt.concat(parts)
        prompt.prefix_len = prefix_len
        return prompt
