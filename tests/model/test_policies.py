"""Bounded KV policies inside the engine: a 100K-token stream keeps every layer's attended KV under
the policy's hard cap, RoPE positions stay inside it, retrieval's host blocks are accounted apart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import streamctx.model.llama as llama
from streamctx.engine import Engine
from streamctx.operators.policies import RetrievalPolicy
from tests.fixtures.tiny_models import make_tiny_llama

VOCAB = 181
CHUNK = 1024
SMALL: dict[str, dict[str, Any]] = {
    "sink_window": {"name": "sink_window", "sinks": 4, "window": 250},
    "heavy_hitter": {"name": "heavy_hitter", "heavy": 128, "recent": 128},
    "snapkv": {"name": "snapkv", "selected": 128, "window": 128},
    "hierarchical": {"name": "hierarchical", "sinks": 4, "window": 200, "group": 16, "per_level": 8, "levels": 3},
    "compressive": {"name": "compressive", "sinks": 4, "window": 250},
    "retrieval": {"name": "retrieval", "sinks": 4, "window": 124, "topk": 2, "block": 64, "q_group": 256},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("pol") / "m", hidden=32, heads=4, kv_heads=2, layers=2,
                           vocab_size=VOCAB, tie=False)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_a_100k_token_stream_stays_under_the_hard_cap(folder: Path, name: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine.load(folder, policy=SMALL[name], block_size=16, prefill_chunk=CHUNK)
    attended: list[int] = []
    real = llama.attention

    def spy(q: torch.Tensor, k: torch.Tensor, *args: Any, **kw: Any) -> Any:
        attended.append(k.shape[2])
        return real(q, k, *args, **kw)

    monkeypatch.setattr(llama, "attention", spy)
    s = engine.session("long")
    policy = s.policy
    cap = policy.attended_cap(CHUNK)  # type: ignore[attr-defined]
    gen = torch.Generator().manual_seed(0)
    peak_blocks, host = 0, []
    for _ in range(100_000 // CHUNK + 1):
        s.feed(torch.randint(3, VOCAB, (CHUNK,), generator=gen))
        for layer in range(2):
            assert s.state.length(layer) <= policy.capacity + policy.slack  # type: ignore[attr-defined]
            assert int(s.state.positions(layer)[1].max()) < cap
        peak_blocks = max(peak_blocks, engine.stats()["blocks_used"])
        host.append(engine.stats()["host_kv_bytes"])
    assert s.n_tokens > 100_000
    assert max(attended) + policy.extra_keys <= cap  # type: ignore[attr-defined]
    assert peak_blocks <= 2 * (-(-(policy.capacity + policy.slack) // 16))  # type: ignore[attr-defined]
    s.generate(3)  # decode steps work at the end of a long stream
    if isinstance(policy, RetrievalPolicy):
        assert host[-1] == policy.host_nbytes() > host[0] > 0  # evicted blocks live on host, counted apart
    else:
        assert host[-1] == 0


def test_presets_load_through_the_engine_and_sessions_own_their_policy(folder: Path) -> None:
    engine = Engine.load(folder, policy="balanced", block_size=16, prefill_chunk=512)
    a, b = engine.session("a"), engine.session("b")
    assert isinstance(a.policy, RetrievalPolicy) and a.policy is not b.policy
    a.feed(torch.randint(3, VOCAB, (2000,), generator=torch.Generator().manual_seed(1)))
    assert a.policy.host_nbytes() > 0 and b.policy.host_nbytes() == 0
    assert engine.stats()["host_kv_bytes"] == a.policy.host_nbytes()
    assert len(a.generate(4).token_ids) == 4
    a.close()
    assert engine.stats()["host_kv_bytes"] == 0


def test_full_policy_is_untouched_by_the_hooks(folder: Path) -> None:
    """`full` never binds to the cache, so the model's attention path is the exact one."""
    engine = Engine.load(folder, policy="full", block_size=16, prefill_chunk=64)
    s = engine.session("f")
    s.feed(torch.randint(3, VOCAB, (300,), generator=torch.Generator().manual_seed(2)))
    assert s.state.policy is None and s.state.length(0) == 300


@pytest.mark.parametrize("name", sorted(SMALL))
def test_save_restore_continues_identically_with_policy_state(folder: Path, name: str) -> None:
    """Contract 4 with a bounded policy: what it holds outside the cache travels with the session."""
    engine = Engine.load(folder, policy=SMALL[name], block_size=16, prefill_chunk=256)
    gen = torch.Generator().manual_seed(3)
    a = engine.session("a")
    a.feed(torch.randint(3, VOCAB, (1500,), generator=gen))
    data = a.save()
    more = torch.randint(3, VOCAB, (300,), generator=gen)
    want = a.feed(more, return_logits=True).logits
    b = engine.session("b", state=data)
    assert type(b.policy) is type(a.policy) and b.policy.config() == a.policy.config()
    got = b.feed(more, return_logits=True).logits
    assert torch.equal(got, want)
    assert b.policy.host_nbytes() == a.policy.host_nbytes()
