"""Split long text into pieces that each fit one generation: sentences, then clauses, then words."""

from __future__ import annotations

import re

#: Default longest piece, in characters (about 15-20 s of speech).
MAX_PIECE_CHARS = 280

_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"'”’)\]]*\s+")
_CLAUSE_END = re.compile(r"(?<=[,;:—–])\s+|\s+(?=[—–]\s)")


def split_text(text: str, max_chars: int = MAX_PIECE_CHARS) -> list[str]:
    """Pieces of at most ``max_chars`` characters, broken at the strongest boundary available.

    Whole sentences are packed together while they fit; a sentence that is too long is broken at
    clause punctuation, and a clause that is still too long at word boundaries (a single word
    longer than ``max_chars`` is cut).  Whitespace runs become single spaces.
    """
    if max_chars < 1:
        raise ValueError("max_chars must be positive")
    text = " ".join(text.split())
    if not text:
        return []
    units: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        units += _fit(sentence, max_chars, 0)
    return _pack(units, max_chars)


def _fit(text: str, max_chars: int, level: int) -> list[str]:
    """Break ``text`` into parts no longer than ``max_chars``, using clause then word boundaries."""
    text = text.strip()
    if len(text) <= max_chars:
        return [text] if text else []
    if level == 0:
        parts = [p for p in _CLAUSE_END.split(text) if p.strip()]
        if len(parts) > 1:
            return _pack([q for p in parts for q in _fit(p, max_chars, 1)], max_chars)
    words = text.split(" ")
    if len(words) > 1:
        return _pack([w for word in words for w in _cut(word, max_chars)], max_chars)
    return _cut(text, max_chars)


def _cut(word: str, max_chars: int) -> list[str]:
    return [word[i : i + max_chars] for i in range(0, len(word), max_chars)]


def _pack(units: list[str], max_chars: int) -> list[str]:
    """Join consecutive units with spaces while the result stays within ``max_chars``."""
    pieces: list[str] = []
    for unit in units:
        if pieces and len(pieces[-1]) + 1 + len(unit) <= max_chars:
            pieces[-1] = f"{pieces[-1]} {unit}"
        else:
            pieces.append(unit)
    return pieces
