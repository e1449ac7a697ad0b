"""Schedulers: complexity-adaptive windows, segmentation, memory-budget placement.

Schedulers take numbers (log-probs, byte counts, queue contents) as data and never import the model.

- `complexity`: per-segment complexity score in [0, 1] (surprisal, zlib ratio, lexical/embedding novelty)
- `windows`: complexity -> attention window in [min, max] under a byte budget, with hysteresis
- `adaptive_policy`: applies the window decisions to a session's sink+window KV policy
- `segmentation`: content-aware segments (turns, paragraphs, sentences, code fences, topic shifts)
- `placement`: eviction policies (LRU, size-aware, priority, lookahead), composable
- `memory_budget`: session state across device / host / peer / disk tiers with prefetch
- `step_scheduler`: continuous batching: which sessions' decode steps and prefill chunks run together
- `embeddings`: optional MiniLM sentence embeddings (the `embeddings` extra)

Public names are re-exported lazily (importing `streamctx.schedulers` imports nothing heavy).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ComplexityAnalyzer": "complexity",
    "ComplexityScore": "complexity",
    "ComplexityWeights": "complexity",
    "WindowConfig": "windows",
    "WindowDecision": "windows",
    "WindowScheduler": "windows",
    "AdaptiveWindow": "windows",
    "AdaptiveWindowController": "adaptive_policy",
    "Segment": "segmentation",
    "segment_text": "segmentation",
    "LexicalTopicShift": "segmentation",
    "EmbeddingTopicShift": "segmentation",
    "LRU": "placement",
    "SizeAware": "placement",
    "Priority": "placement",
    "Lookahead": "placement",
    "MemoryBudgetScheduler": "memory_budget",
    "MiniLMEmbedder": "embeddings",
    "StepScheduler": "step_scheduler",
    "Demand": "step_scheduler",
    "Grant": "step_scheduler",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return __all__
