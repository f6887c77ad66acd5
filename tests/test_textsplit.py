"""Splitting long text: sentences first, then clauses, then words."""

from __future__ import annotations

import pytest

from csmcli.textsplit import split_text


def test_short_text_is_one_piece() -> None:
    assert split_text("  Hello   there.\n How are you? ") == ["Hello there. How are you?"]


def test_sentences_are_packed_up_to_the_limit() -> None:
    text = "One two three. Four five six! Seven eight nine? Ten eleven."
    assert split_text(text, max_chars=30) == ["One two three. Four five six!", "Seven eight nine? Ten eleven."]


def test_long_sentence_breaks_at_clauses() -> None:
    text = "First clause is here, second clause is here; third clause is here: and a fourth."
    pieces = split_text(text, max_chars=45)
    assert pieces == ["First clause is here, second clause is here;", "third clause is here: and a fourth."]


def test_monster_sentence_breaks_at_words_and_long_words_are_cut() -> None:
    words = " ".join(f"word{i}" for i in range(40))
    pieces = split_text(words, max_chars=50)
    assert all(len(p) <= 50 for p in pieces)
    assert " ".join(pieces) == words
    assert split_text("x" * 25, max_chars=10) == ["x" * 10, "x" * 10, "x" * 5]


@pytest.mark.parametrize("text", ["", "   \n\t "])
def test_empty_text_gives_no_pieces(text: str) -> None:
    assert split_text(text) == []


def test_nothing_is_lost() -> None:
    text = (
        "It was late. The rain, which had not stopped since noon, drummed on the roof; nobody spoke. "
        "Then, quite suddenly — as if on cue — the lights went out! Who was there? "
    ) * 5
    pieces = split_text(text, max_chars=60)
    assert all(0 < len(p) <= 60 for p in pieces)
    assert " ".join(pieces).split() == text.split()
