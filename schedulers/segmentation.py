"""Content-aware segmentation for chunked prefill.

Boundaries, strongest first: turns (chat role markers), topic shifts, code blocks and paragraphs,
sentences, words, characters. Turns and topic shifts always start a new segment; weaker boundaries
are used only where needed to keep each segment within `max_tokens` (measured with the caller's
`count_tokens` on the segment's exact text). A fenced code block (```...```) is never split unless
it alone exceeds `max_tokens`; then it is split at line boundaries (kind "code-split").

Segments are exact slices: ``"".join(s.text for s in segments) == text``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

CountTokens = Callable[[str], int]

# A new turn: a line starting with a role marker ("User:", "assistant:", "### Human:") or a chat
# template tag.
DEFAULT_TURN = re.compile(
    r"^(?:#{1,4}\s*)?(?:user|assistant|system|human|ai|bot|q|a)\s*:|^<\|im_start\|>",
    re.IGNORECASE | re.MULTILINE,
)
_FENCE = re.compile(r"^[ \t]*```", re.MULTILINE)
_PARAGRAPH_END = re.compile(r"\n[ \t]*\n\s*")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_WORD_END = re.compile(r"\s+")
# Frequent words of 4+ letters that say nothing about the topic.
_STOPWORDS = frozenset(
    "that this with from have were been they their there which would will what when your about "
    "into more than them then these those also only some such other very must shall upon".split()
)


@dataclass(frozen=True)
class Segment:
    """A slice text[start:end] with the reason it starts where it does."""

    text: str
    start: int
    end: int
    kind: str
    n_tokens: int


class TopicShiftDetector(Protocol):
    def shifts(self, blocks: Sequence[str]) -> set[int]:
        """Indices i such that a topic shift occurs between blocks[i - 1] and blocks[i]."""
        ...


class LexicalTopicShift:
    """TextTiling-style fallback: cosine of word counts of the previous `window` blocks vs the next.

    A shift is where the similarity falls below `threshold` and is a local minimum.
    """

    def __init__(self, threshold: float = 0.1, window: int = 2, min_words: int = 8) -> None:
        self.threshold = threshold
        self.window = window
        self.min_words = min_words

    @staticmethod
    def _bag(texts: Sequence[str]) -> Counter[str]:
        words = (w.lower() for t in texts for w in re.findall(r"[A-Za-z]{4,}", t))
        return Counter(w for w in words if w not in _STOPWORDS)

    @staticmethod
    def _cos(a: Counter[str], b: Counter[str]) -> float:
        dot = sum(v * b.get(k, 0) for k, v in a.items())
        na = math.sqrt(sum(v * v for v in a.values()))
        nb = math.sqrt(sum(v * v for v in b.values()))
        return dot / (na * nb) if na and nb else 1.0

    def shifts(self, blocks: Sequence[str]) -> set[int]:
        sims: dict[int, float] = {}
        for i in range(1, len(blocks)):
            left = self._bag(blocks[max(0, i - self.window) : i])
            right = self._bag(blocks[i : i + self.window])
            if sum(left.values()) < self.min_words or sum(right.values()) < self.min_words:
                continue
            sims[i] = self._cos(left, right)
        out = set()
        for i, s in sims.items():
            if s < self.threshold and s <= sims.get(i - 1, 1.0) and s <= sims.get(i + 1, 1.0):
                out.add(i)
        return out


class EmbeddingTopicShift:
    """Shift where adjacent blocks' embedding similarity drops below `threshold`.

    `embed` maps texts to an [N, D] array (e.g. MiniLM from the `embeddings` extra).
    """

    def __init__(self, embed: Callable[[Sequence[str]], np.ndarray], threshold: float = 0.3) -> None:
        self.embed = embed
        self.threshold = threshold

    def shifts(self, blocks: Sequence[str]) -> set[int]:
        if len(blocks) < 2:
            return set()
        e = np.asarray(self.embed(list(blocks)), dtype=np.float64)
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        sims = (e[1:] * e[:-1]).sum(axis=1)
        return {i + 1 for i, s in enumerate(sims) if s < self.threshold}


def _split_keep(text: str, pattern: re.Pattern[str]) -> list[str]:
    """Split after each match of `pattern`, keeping every character (pieces concatenate to text)."""
    out, last = [], 0
    for m in pattern.finditer(text):
        if m.end() > last:
            out.append(text[last : m.end()])
            last = m.end()
    if last < len(text):
        out.append(text[last:])
    return out


def _code_spans(text: str) -> list[tuple[int, int]]:
    """[start, end) of each fenced code block: opening fence to the end of the closing fence's line
    (an unclosed fence runs to the end of the text)."""
    fences = [m.start() for m in _FENCE.finditer(text)]
    spans = []
    for i in range(0, len(fences), 2):
        end = len(text)
        if i + 1 < len(fences):
            nl = text.find("\n", fences[i + 1])
            end = len(text) if nl < 0 else nl + 1
        spans.append((fences[i], end))
    return spans


def _blocks(text: str) -> list[tuple[str, bool]]:
    """Paragraph-level blocks; fenced code blocks are single blocks flagged True."""
    out: list[tuple[str, bool]] = []
    pos = 0
    for start, end in _code_spans(text):
        if start > pos:
            out.extend((p, False) for p in _split_keep(text[pos:start], _PARAGRAPH_END))
        out.append((text[start:end], True))
        pos = end
    if pos < len(text):
        out.extend((p, False) for p in _split_keep(text[pos:], _PARAGRAPH_END))
    return out


def _turns(text: str, pattern: re.Pattern[str] | None) -> list[str]:
    """Split before each turn marker that is not inside a code block."""
    if pattern is None:
        return [text]
    spans = _code_spans(text)
    cuts = [
        m.start() for m in pattern.finditer(text)
        if m.start() > 0 and not any(a <= m.start() < b for a, b in spans)
    ]
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


class _Packer:
    """Greedy packing of pieces into segments of at most max_tokens (exact counts)."""

    def __init__(self, count: CountTokens, max_tokens: int) -> None:
        self.count = count
        self.max_tokens = max_tokens
        self.segments: list[tuple[str, str]] = []  # (text, kind)
        self._cur = ""
        self._kind = ""

    def cut(self) -> None:
        if self._cur:
            self.segments.append((self._cur, self._kind))
        self._cur, self._kind = "", ""

    def add(self, piece: str, kind: str, levels: Sequence[re.Pattern[str]], level_kinds: Sequence[str]) -> None:
        if not piece:
            return
        if self._cur and self.count(self._cur + piece) <= self.max_tokens:
            self._cur += piece
            return
        if self.count(piece) <= self.max_tokens:
            self.cut()
            self._cur, self._kind = piece, kind
            return
        # The piece alone is too long: split at the next finer level, first part keeps `kind`.
        if levels:
            parts = _split_keep(piece, levels[0])
            if len(parts) > 1:
                for j, part in enumerate(parts):
                    self.add(part, kind if j == 0 else level_kinds[0], levels[1:], level_kinds[1:])
                return
            self.add(piece, kind, levels[1:], level_kinds[1:])
            return
        self._add_chars(piece, kind)

    def _add_chars(self, piece: str, kind: str) -> None:
        """Last resort: the longest prefixes that fit (binary search on characters)."""
        rest = piece
        while rest:
            if self._cur and self.count(self._cur + rest[:1]) > self.max_tokens:
                self.cut()
            base = self._cur
            lo, hi = 1, len(rest)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self.count(base + rest[:mid]) <= self.max_tokens:
                    lo = mid
                else:
                    hi = mid - 1
            if not base:
                self._kind = kind
            self._cur = base + rest[:lo]
            rest = rest[lo:]
            kind = "length"
            if rest:
                self.cut()


def segment_text(
    text: str,
    *,
    max_tokens: int,
    count_tokens: CountTokens,
    turn_pattern: re.Pattern[str] | None = DEFAULT_TURN,
    topic: TopicShiftDetector | None = None,
) -> list[Segment]:
    """Split `text` into segments of at most `max_tokens` tokens at content boundaries.

    count_tokens: tokens of a string (e.g. ``lambda s: len(tokenizer.encode(s).ids)``); a single
    character must count as at most `max_tokens`.
    topic: a topic-shift detector over paragraph blocks (`LexicalTopicShift`, `EmbeddingTopicShift`),
    or None for no topic boundaries.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if not text:
        return []
    packer = _Packer(count_tokens, max_tokens)
    text_levels = [_SENTENCE_END, _WORD_END]
    text_kinds = ["sentence", "word"]
    line_end = re.compile(r"\n")

    turns = _turns(text, turn_pattern)
    for t_i, turn in enumerate(turns):
        packer.cut()
        blocks = _blocks(turn)
        shifts = topic.shifts([b for b, _ in blocks]) if topic is not None else set()
        for b_i, (block, is_code) in enumerate(blocks):
            if b_i in shifts:
                packer.cut()
                kind = "topic"
            elif b_i == 0:
                kind = "turn" if t_i > 0 or turn_pattern is not None and turn_pattern.match(turn) else "start"
            else:
                kind = "code" if is_code else "paragraph"
            if is_code:
                packer.add(block, kind, [line_end], ["code-split"])
            else:
                packer.add(block, kind, text_levels, text_kinds)
    packer.cut()

    out: list[Segment] = []
    pos = 0
    for seg_text, kind in packer.segments:
        out.append(Segment(seg_text, pos, pos + len(seg_text), kind, count_tokens(seg_text)))
        pos += len(seg_text)
    return out
