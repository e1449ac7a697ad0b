"""The hooks a bounded policy uses, driven through a real (tiny) Llama session."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
import torch

from streamctx import Engine
from streamctx.engine import Session
from streamctx.operators.policies import CacheView, Keep, PolicyBase
from tests.fixtures.tiny_models import make_tiny_llama

VOCAB = 97
HEADS, KV_HEADS = 6, 2


class MassRecorder(PolicyBase):
    """Keeps everything, records the key mass it is shown, and keeps the last `window` tokens."""

    name: ClassVar[str] = "mass-recorder"
    needs_key_mass: ClassVar[bool] = True

    def __init__(self, window: int | None = None) -> None:
        self.window = window
        self.seen: list[tuple[int, int, torch.Tensor]] = []

    def decide(self, view: CacheView) -> Keep:
        assert view.key_mass is not None
        self.seen.append((view.layer, view.n_new, view.key_mass.clone()))
        if self.window is None or view.length <= self.window:
            return Keep()
        return Keep(indices=torch.arange(view.length - self.window, view.length))


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    folder = make_tiny_llama(tmp_path_factory.mktemp("hooks") / "m", hidden=24, heads=HEADS, kv_heads=KV_HEADS,
                             layers=2, vocab_size=VOCAB)
    return Engine.load(folder, block_size=4, prefill_chunk=6)


def test_key_mass_reaches_the_policy_per_kv_head(engine: Engine) -> None:
    policy = MassRecorder()
    s = Session(engine, "mass", policy=policy)
    s.feed(torch.arange(3, 17))  # 14 tokens in chunks of 6, 6, 2
    layer0 = [(n, m) for layer, n, m in policy.seen if layer == 0]
    assert [n for n, _ in layer0] == [6, 6, 2]
    total_queries = 0
    for n, mass in layer0:
        total_queries += n
        assert mass.shape == (KV_HEADS, total_queries)
        # each query's probabilities sum to 1 per query head; a KV head serves HEADS // KV_HEADS of them
        assert torch.allclose(mass.sum(-1), torch.full((KV_HEADS,), float(total_queries * HEADS // KV_HEADS)))
    s.close()


def test_a_bounded_policy_keeps_the_cache_bounded(engine: Engine) -> None:
    full = Session(engine, "full-ref")
    bounded = Session(engine, "bounded", policy=MassRecorder(window=8))
    ids = torch.arange(3, 40)
    full.feed(ids[:8])
    bounded.feed(ids[:8])
    assert torch.equal(full.last_logits, bounded.last_logits)  # nothing evicted yet: identical
    bounded.feed(ids[8:])
    assert all(t.length == 8 for t in bounded.state.layers)
    assert bounded.state.blocks_used() <= 2 * 3  # 8 tokens span at most 3 blocks of 4 per layer
    bounded.generate(4)
    assert all(t.length <= 8 for t in bounded.state.layers)
    assert torch.isfinite(bounded.last_logits).all()
    full.close(), bounded.close()
    assert engine.stats()["blocks_used"] == 0
