"""Mamba decoder vs transformers' MambaForCausalLM on tiny random models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from streamctx import Engine
from tests.fixtures.tiny_models import make_tiny_mamba, reference_logits

VOCAB = 151
ATOL = 1e-4

CONFIGS = {
    "tied-1l": dict(hidden=37, layers=1, state_size=5, tie=True),
    "untied-bias-2l": dict(hidden=48, layers=2, state_size=8, tie=False, use_bias=True, time_step_rank=5),
    "k2-noconvbias-3l": dict(hidden=24, layers=3, state_size=4, conv_kernel=2, use_conv_bias=False),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-mamba")
    return {n: make_tiny_mamba(root / n, vocab_size=VOCAB, seed=i, **kw) for i, (n, kw) in enumerate(CONFIGS.items())}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_shot_logits_match_transformers(folders: dict[str, Path], name: str) -> None:
    ids = torch.randint(0, VOCAB, (29,), generator=torch.Generator().manual_seed(3))
    ref = reference_logits(folders[name], ids)
    got = Engine.load(folders[name]).session("s").feed(ids, return_logits=True).logits
    assert float((got - ref).abs().max()) <= ATOL


@pytest.fixture(scope="module")
def streamed(folders: dict[str, Path]) -> tuple[Engine, torch.Tensor, torch.Tensor]:
    folder = folders["untied-bias-2l"]
    ids = torch.randint(0, VOCAB, (33,), generator=torch.Generator().manual_seed(4))
    return Engine.load(folder, prefill_chunk=5), ids, reference_logits(folder, ids)


@given(cuts=st.lists(st.integers(1, 32), max_size=6, unique=True))
def test_streamed_random_splits_match_transformers(streamed, cuts: list[int]) -> None:
    engine, ids, ref = streamed
    bounds = [0, *sorted(cuts), ids.shape[0]]
    s = engine.session("split")
    try:
        parts = [s.feed(ids[a:b], return_logits=True).logits for a, b in zip(bounds, bounds[1:])]
        assert float((torch.cat(parts) - ref).abs().max()) <= ATOL
    finally:
        s.close()


def test_state_is_constant_size(streamed) -> None:
    engine, ids, _ = streamed
    s = engine.session("const")
    s.feed(ids[:3])
    before = engine.stats()["state_bytes"]
    s.feed(ids[3:])
    assert engine.stats()["state_bytes"] == before > 0
    assert engine.stats()["blocks_used"] == 0
    s.close()
    assert engine.stats()["state_bytes"] == 0


def test_batched_forward_equals_separate_sessions(streamed) -> None:
    engine, ids, ref = streamed
    a, b = engine.session("a"), engine.session("b")
    a.feed(ids[:4]), b.feed(ids[:11])
    out = engine._forward([(a, ids[4:9]), (b, ids[11:20])], [True, True])
    assert float((out[0] - ref[4:9]).abs().max()) <= ATOL
    assert float((out[1] - ref[11:20]).abs().max()) <= ATOL
    a.close(), b.close()
