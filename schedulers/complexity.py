"""Per-segment complexity from cheap signals, combined into one score in [0, 1].

Signals (each normalised to [0, 1], higher = harder to keep in a small window):

- surprisal: the model's own mean negative log-prob per token (nats), given as numbers after the
  segment was processed; mapped by ``1 - exp(-nll / surprisal_scale)`` so ~0.5 nats (boilerplate)
  is low, ~3 nats (prose) is mid and ~8 nats (noise) saturates.
- compression: zlib compressed size / raw size of the segment's UTF-8 bytes, clipped to [0, 1].
  Repetitive logs compress to ~0.1, prose to ~0.4, random text to ~0.75+.
- novelty: fraction of the segment's word n-grams not seen in the session's history. History is a
  bounded two-generation hashed bitmap (a Bloom-like sketch with one hash), so memory is fixed
  however long the session runs; n-grams repeated inside the segment count as seen.
- embedding (optional): ``1 - cos(embed(segment), mean of recent history embeddings)``; needs an
  embedding callable (MiniLM through the ``embeddings`` extra, see `streamctx.schedulers.embeddings`).

Weights (documented defaults in `ComplexityWeights`) are renormalised over the signals present,
so a score before the model has seen a segment (no surprisal) is still in [0, 1].
"""

from __future__ import annotations

import math
import re
import zlib
from collections import deque
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

Embedder = Callable[[Sequence[str]], np.ndarray]
"""Maps N texts to an [N, D] float array of sentence embeddings."""

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


@dataclass(frozen=True)
class ComplexityWeights:
    """Relative weights of the signals; renormalised over those available for a segment.

    Surprisal is the most direct measure of what the model finds hard, so it leads; compression
    and lexical novelty are model-free proxies that are available before the segment is run.
    """

    surprisal: float = 0.4
    compression: float = 0.3
    novelty: float = 0.3
    embedding: float = 0.2

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not (value >= 0.0 and math.isfinite(value)):
                raise ValueError(f"ComplexityWeights.{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class ComplexityScore:
    """One segment's score and its components (None where the signal was not available)."""

    score: float
    surprisal: float | None
    compression: float
    novelty: float
    embedding: float | None
    mean_nll: float | None

    def components(self) -> dict[str, float | None]:
        return {
            "surprisal": self.surprisal,
            "compression": self.compression,
            "novelty": self.novelty,
            "embedding": self.embedding,
            "mean_nll": self.mean_nll,
        }


def surprisal_signal(mean_nll: float, scale: float = 4.0) -> float:
    """Map mean negative log-prob per token (nats) to [0, 1]."""
    if not math.isfinite(mean_nll) or mean_nll < 0:
        raise ValueError(f"mean negative log-prob must be a finite number >= 0, got {mean_nll!r}")
    return 1.0 - math.exp(-mean_nll / scale)


def mean_nll_from_logprobs(token_logprobs: Sequence[float] | np.ndarray) -> float:
    """Mean negative log-prob of a segment's tokens; log-probs are natural-log values <= 0."""
    lp = np.asarray(token_logprobs, dtype=np.float64).reshape(-1)
    if lp.size == 0:
        raise ValueError("token_logprobs is empty: a processed segment has at least one token")
    if not np.all(np.isfinite(lp)) or np.any(lp > 1e-6):
        raise ValueError("token_logprobs must be finite natural-log probabilities (<= 0)")
    return float(-lp.mean())


def compression_signal(text: str, level: int = 6) -> float:
    """zlib compressed bytes / raw bytes, clipped to [0, 1] (empty text scores 0)."""
    raw = text.encode("utf-8")
    if not raw:
        return 0.0
    return min(1.0, len(zlib.compress(raw, level)) / len(raw))


def word_ngrams(text: str, n: int) -> list[str]:
    words = [w.lower() for w in _WORD.findall(text)]
    if len(words) < n:
        return [" ".join(words)] if words else []
    return [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]


class NgramSketch:
    """Bounded memory of seen n-grams: two generations of a hashed bitmap.

    Inserts go to the current generation; when it holds `capacity` inserts it becomes the previous
    one and a fresh bitmap starts, so the sketch remembers between `capacity` and `2 * capacity`
    recent n-grams in `2 * bits / 8` bytes. Hashes are crc32 (stable across processes).
    """

    def __init__(self, bits: int = 1 << 18, capacity: int = 1 << 15) -> None:
        if bits <= 0 or capacity <= 0:
            raise ValueError(f"NgramSketch needs bits > 0 and capacity > 0, got bits={bits}, capacity={capacity}")
        self.bits = bits
        self.capacity = capacity
        self._cur = np.zeros(bits, dtype=bool)
        self._prev = np.zeros(bits, dtype=bool)
        self._inserted = 0

    def _slot(self, gram: str) -> int:
        return zlib.crc32(gram.encode("utf-8")) % self.bits

    def contains(self, gram: str) -> bool:
        s = self._slot(gram)
        return bool(self._cur[s] or self._prev[s])

    def add(self, gram: str) -> None:
        if self._inserted >= self.capacity:
            self._prev, self._cur = self._cur, np.zeros(self.bits, dtype=bool)
            self._inserted = 0
        self._cur[self._slot(gram)] = True
        self._inserted += 1

    def nbytes(self) -> int:
        return self._cur.nbytes + self._prev.nbytes


class ComplexityAnalyzer:
    """Scores a session's segments in order; keeps a bounded history sketch for novelty.

    `score(text, ...)` scores a segment against the history and then adds it to the history.
    One analyzer per session (its history is that session's).
    """

    def __init__(
        self,
        weights: ComplexityWeights = ComplexityWeights(),
        *,
        ngram: int = 2,
        surprisal_scale: float = 4.0,
        sketch: NgramSketch | None = None,
        embedder: Embedder | None = None,
        embedding_history: int = 8,
    ) -> None:
        if ngram < 1:
            raise ValueError(f"ngram must be >= 1, got {ngram}")
        if surprisal_scale <= 0:
            raise ValueError(f"surprisal_scale must be > 0, got {surprisal_scale}")
        self.weights = weights
        self.ngram = ngram
        self.surprisal_scale = surprisal_scale
        self.sketch = sketch if sketch is not None else NgramSketch()
        self.embedder = embedder
        self._embeddings: deque[np.ndarray] = deque(maxlen=embedding_history)

    def novelty(self, text: str, *, update: bool = True) -> float:
        """Fraction of the segment's n-grams not in the history (1.0 for an empty history)."""
        grams = word_ngrams(text, self.ngram)
        if not grams:
            return 0.0
        new = 0
        local: set[str] = set()
        for g in grams:
            if g not in local and not self.sketch.contains(g):
                new += 1
            local.add(g)
        if update:
            for g in local:
                self.sketch.add(g)
        return new / len(grams)

    def _embedding_novelty(self, text: str) -> float:
        assert self.embedder is not None
        vec = np.asarray(self.embedder([text]), dtype=np.float64).reshape(-1)
        norm = float(np.linalg.norm(vec))
        vec = vec / norm if norm > 0 else vec
        if not self._embeddings:
            out = 1.0
        else:
            ref = np.mean(np.stack(self._embeddings), axis=0)
            rn = float(np.linalg.norm(ref))
            cos = float(vec @ ref / rn) if rn > 0 else 0.0
            out = min(1.0, max(0.0, 1.0 - cos))
        self._embeddings.append(vec)
        return out

    def score(
        self,
        text: str,
        *,
        token_logprobs: Sequence[float] | np.ndarray | None = None,
        mean_nll: float | None = None,
    ) -> ComplexityScore:
        """Score one segment; surprisal from `token_logprobs` or `mean_nll` when the model ran it."""
        if token_logprobs is not None and mean_nll is not None:
            raise ValueError("give token_logprobs or mean_nll, not both")
        if token_logprobs is not None:
            mean_nll = mean_nll_from_logprobs(token_logprobs)
        surprisal = surprisal_signal(mean_nll, self.surprisal_scale) if mean_nll is not None else None
        compression = compression_signal(text)
        novelty = self.novelty(text)
        embedding = self._embedding_novelty(text) if self.embedder is not None else None

        w = self.weights
        parts = [(w.compression, compression), (w.novelty, novelty)]
        if surprisal is not None:
            parts.append((w.surprisal, surprisal))
        if embedding is not None:
            parts.append((w.embedding, embedding))
        total = sum(wt for wt, _ in parts)
        score = sum(wt * v for wt, v in parts) / total if total > 0 else 0.0
        return ComplexityScore(
            score=min(1.0, max(0.0, score)),
            surprisal=surprisal,
            compression=compression,
            novelty=novelty,
            embedding=embedding,
            mean_nll=mean_nll,
        )
