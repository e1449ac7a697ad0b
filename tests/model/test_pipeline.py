"""A Llama split into layer ranges (streamctx.model.pipeline) equals the unsplit model: logits of
feeds in random splits over random stage counts, greedy tokens with a bounded policy, and every
stage's session state freed on close."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from streamctx import Engine
from streamctx.engine import EngineError
from streamctx.model.pipeline import Hidden, LayerStage, LocalChain, PipelinedLlama, split_layers
from tests.fixtures.tiny_models import make_tiny_llama, make_tiny_mamba
from tests.tolerances import assert_close

VOCAB = 181
LAYERS = 5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("pipe") / "m", hidden=32, heads=4, kv_heads=2, layers=LAYERS,
                           vocab_size=VOCAB, tie=False)


def load(folder: Path, parts: int, policy: Any = "full") -> tuple[Engine, LocalChain]:
    """An engine over a model split into `parts` in-process stages (each loads its own copy)."""
    first = Engine.load(folder, block_size=8, prefill_chunk=16)
    if parts == 1:
        return Engine(first.model, first.tokenizer, policy=policy, prefill_chunk=16), LocalChain([])
    ranges = split_layers(LAYERS, parts)
    chain = LocalChain([LayerStage(Engine.load(folder).model, r, policy, block_size=8) for r in ranges[1:]])
    model = PipelinedLlama(first.model, ranges, chain, block_size=8)
    return Engine(model, first.tokenizer, policy=policy, prefill_chunk=16), chain


_engines: dict[tuple[str, int], tuple[Engine, LocalChain]] = {}


def cached(folder: Path, parts: int) -> tuple[Engine, LocalChain]:
    key = (str(folder), parts)
    if key not in _engines:
        _engines[key] = load(folder, parts)
    return _engines[key]


def ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def test_split_layers() -> None:
    assert split_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert split_layers(5, 5) == [range(i, i + 1) for i in range(5)]
    assert split_layers(7, 1) == [range(0, 7)]
    for n in (1, 2, 7, 13):
        for p in range(1, n + 1):
            rs = split_layers(n, p)
            assert [i for r in rs for i in r] == list(range(n))
            assert max(map(len, rs)) - min(map(len, rs)) <= 1
    with pytest.raises(ValueError, match="cannot split 2 layers into 3"):
        split_layers(2, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_hidden_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    x = torch.randn(7, 13).to(dtype)
    h = Hidden.from_tensor(x)
    assert h.array.dtype.kind in "fi" and h.to_tensor().dtype == dtype
    assert torch.equal(h.to_tensor().view(torch.int8), x.view(torch.int8))


@given(parts=st.integers(2, LAYERS), cuts=st.lists(st.integers(1, 23), min_size=1, max_size=4),
       seed=st.integers(0, 2**16))
def test_layer_ranges_composed_equal_the_full_forward(folder: Path, parts: int, cuts: list[int], seed: int) -> None:
    full, _ = cached(folder, 1)
    split, chain = cached(folder, parts)
    a, b = full.session("a"), split.session("a")
    try:
        for i, n in enumerate(cuts):
            x = ids(n, seed + i)
            assert_close(b.feed(x, return_logits=True).logits, a.feed(x, return_logits=True).logits)
        assert b.n_tokens == a.n_tokens == sum(cuts)
        assert b.generate(5).token_ids == a.generate(5).token_ids
    finally:
        a.close(), b.close()
    assert all(s["live_sessions"] == 0 and s["state_bytes"] == 0 for s in chain.stats())


def test_batched_sessions_and_a_bounded_policy_equal_the_full_model(folder: Path) -> None:
    policy = {"name": "sink_window", "sinks": 2, "window": 9}
    full, _ = load(folder, 1, policy)
    split, chain = load(folder, 3, policy)
    for eng in (full, split):
        s, t = eng.session("s"), eng.session("t")
        # Two sessions in one step (the batch-first forward), then each continues alone.
        s.last_logits, t.last_logits = eng._forward([(s, ids(17, 1)), (t, ids(5, 2))], [False, False])
    for sid in ("s", "t"):
        a, b = full.session(sid), split.session(sid)
        assert_close(b.last_logits, a.last_logits)
        ga, gb = a.generate(12), b.generate(12)  # decoding past the window: eviction in every stage
        assert gb.token_ids == ga.token_ids
        assert b.n_tokens == a.n_tokens
    # Every stage holds exactly the kept tokens; its bytes reach the first stage's accounting.
    per_stage = [st["state_bytes"] for st in chain.stats()]
    assert all(n > 0 for n in per_stage)
    assert split.stats()["state_bytes"] == split.model.pool.nbytes_used() + sum(per_stage)
    for eng in (full, split):
        for s in list(eng.sessions.values()):
            s.close()
    assert split.stats()["state_bytes"] == 0
    assert all(st["live_sessions"] == 0 and st["blocks_used"] == 0 for st in chain.stats())


def test_split_model_refuses_what_it_cannot_do(folder: Path, tmp_path: Path) -> None:
    eng, _ = load(folder, 2)
    s = eng.session("x")
    s.feed(ids(4, 0))
    saved = s.save()  # a split session saves whole (tests/dataflow/test_pipeline_checkpoint.py)
    s.close()
    other, _ = load(folder, 3)
    with pytest.raises(EngineError, match="saved by a model split into layer ranges"):
        other.session("x", state=saved)
    mamba = Engine.load(make_tiny_mamba(tmp_path / "mamba", hidden=16, layers=2, vocab_size=VOCAB)).model
    with pytest.raises(NotImplementedError, match="Llama-family"):
        LayerStage(mamba, range(1, 2))
