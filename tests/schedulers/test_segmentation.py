from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamctx.schedulers.segmentation import (
    EmbeddingTopicShift,
    LexicalTopicShift,
    _code_spans,
    segment_text,
)
from tests.schedulers.corpus import sotu_text


def words(s: str) -> int:
    """A token counter that is not additive at boundaries: whitespace-separated words + 1 per newline."""
    return len(s.split()) + s.count("\n")


def chars(s: str) -> int:
    return len(s)


_piece = st.one_of(
    st.sampled_from([
        "Hello there. ", "How are you? ", "Fine!\n", "\n\n", "User: hi\n", "Assistant: hello.\n",
        "```python\nx = 1\nUser: not a turn\ny = 2\n```\n", "a " * 30, "word", " ", "\n",
        "<|im_start|>user\n", "Mr. Smith went. ", "``` unclosed\ncode\n",
    ]),
    st.text(alphabet="ab .!?\n`:", max_size=40),
)


@given(parts=st.lists(_piece, max_size=30), max_tokens=st.sampled_from([1, 2, 3, 7, 13, 64]),
       counter=st.sampled_from([words, chars]))
def test_segments_concatenate_exactly_and_respect_max(parts, max_tokens, counter) -> None:
    text = "".join(parts)
    if counter is words and max_tokens < 2:
        max_tokens = 2  # a single char "\n" plus a word can count 2 under `words`
    segs = segment_text(text, max_tokens=max_tokens, count_tokens=counter)
    assert "".join(s.text for s in segs) == text
    pos = 0
    for s in segs:
        assert s.text and s.start == pos and s.end == pos + len(s.text) == s.start + len(s.text)
        assert text[s.start:s.end] == s.text
        assert counter(s.text) <= max_tokens and s.n_tokens == counter(s.text)
        pos = s.end


@given(parts=st.lists(_piece, max_size=20), max_tokens=st.sampled_from([40, 64, 200]))
def test_code_fences_never_split_when_they_fit(parts, max_tokens) -> None:
    text = "".join(parts)
    segs = segment_text(text, max_tokens=max_tokens, count_tokens=chars)
    bounds = {s.start for s in segs} - {0}
    for a, b in _code_spans(text):
        if b - a <= max_tokens:
            assert not any(a < x < b for x in bounds), (text[a:b], bounds)


def test_turn_boundaries_always_cut_and_are_labelled() -> None:
    text = "User: hi there.\nAssistant: hello! How can I help?\nUser: tell me more.\n"
    segs = segment_text(text, max_tokens=1000, count_tokens=chars)
    assert [s.text.split(":")[0] for s in segs] == ["User", "Assistant", "User"]
    assert [s.kind for s in segs] == ["turn", "turn", "turn"]


def test_long_prose_cuts_at_paragraphs_then_sentences() -> None:
    text = sotu_text(12_000)
    segs = segment_text(text, max_tokens=200, count_tokens=words, turn_pattern=None)
    assert "".join(s.text for s in segs) == text
    assert all(s.n_tokens <= 200 for s in segs)
    # Every cut sits after a paragraph or sentence end (prose has no over-long sentences here).
    for s in segs[:-1]:
        assert re.search(r"[.!?][\"')\]]*\s*$", s.text) or s.text.endswith("\n"), s.text[-60:]
    # Packing is greedy: segments are reasonably full.
    assert np.mean([s.n_tokens for s in segs]) > 100


def test_over_long_code_block_is_split_at_lines() -> None:
    code = "```\n" + "".join(f"line {i}\n" for i in range(50)) + "```\n"
    segs = segment_text(code, max_tokens=60, count_tokens=chars)
    assert "".join(s.text for s in segs) == code
    assert all(s.text.endswith("\n") for s in segs)
    assert any(s.kind == "code-split" for s in segs)


def test_lexical_topic_shift_finds_the_switch() -> None:
    a = " ".join(["The budget deficit and taxes and federal spending grew this fiscal year."] * 3)
    b = " ".join(["Astronauts landed the lunar module on the moon surface with rockets."] * 3)
    text = f"{a}\n\n{a}\n\n{b}\n\n{b}\n"
    segs = segment_text(text, max_tokens=10_000, count_tokens=chars, topic=LexicalTopicShift())
    assert [s.kind for s in segs] == ["start", "topic"]
    assert segs[1].text.startswith("Astronauts")
    # Without a detector the whole text is one segment.
    assert len(segment_text(text, max_tokens=10_000, count_tokens=chars)) == 1


def test_embedding_topic_shift_uses_the_embedder() -> None:
    emb = EmbeddingTopicShift(lambda ts: np.array([[1.0, 0.0] if "tax" in t else [0.0, 1.0] for t in ts]))
    text = "tax one\n\ntax two\n\nmoon three\n\n"
    segs = segment_text(text, max_tokens=1000, count_tokens=chars, topic=emb)
    assert [s.text for s in segs] == ["tax one\n\ntax two\n\n", "moon three\n\n"]


def test_bad_max_tokens() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        segment_text("x", max_tokens=0, count_tokens=chars)
