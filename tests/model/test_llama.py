"""Llama-family decoder vs transformers on tiny random models saved as Hugging Face folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from streamctx import Engine
from streamctx.model.rope import UnsupportedRopeError
from tests.fixtures.tiny_models import make_tiny_llama, reference_logits

VOCAB = 173  # small vocab keeps the tiny models fast; ids are random, not text
ATOL = 1e-4  # fp32 max abs logit difference vs transformers

# (name, make_tiny_llama kwargs): odd hidden sizes, GQA ratios 1/3/4, tied and untied, bias on/off, 1-3 layers
CONFIGS = {
    "mha-tied-1l": dict(hidden=45, heads=3, kv_heads=3, head_dim=10, layers=1, tie=True),
    "gqa3-untied-bias": dict(hidden=63, heads=9, kv_heads=3, head_dim=8, layers=2, tie=False, attention_bias=True),
    "gqa4-3l": dict(hidden=64, heads=8, kv_heads=2, head_dim=8, layers=3, tie=True, intermediate=97),
    "qwen2-gqa3": dict(hidden=33, heads=3, kv_heads=1, head_dim=12, layers=2, tie=False, architecture="qwen2"),
    "mistral": dict(hidden=40, heads=4, kv_heads=1, head_dim=10, layers=2, architecture="mistral"),
    "rope-linear": dict(hidden=32, heads=4, kv_heads=2, head_dim=8, layers=1,
                        rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "rope-llama3": dict(hidden=32, heads=4, kv_heads=2, head_dim=16, layers=1, rope_theta=500000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
}


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-llama")
    return {name: make_tiny_llama(root / name, vocab_size=VOCAB, seed=i, **kw)
            for i, (name, kw) in enumerate(CONFIGS.items())}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_shot_logits_match_transformers(tiny_folders: dict[str, Path], name: str) -> None:
    ids = torch.randint(0, VOCAB, (37,), generator=torch.Generator().manual_seed(1))
    ref = reference_logits(tiny_folders[name], ids)
    engine = Engine.load(tiny_folders[name], block_size=8)
    got = engine.session("s").feed(ids, return_logits=True).logits
    assert got.shape == ref.shape
    assert max_diff(got, ref) <= ATOL


@pytest.fixture(scope="module")
def streamed(tiny_folders: dict[str, Path]) -> tuple[Engine, torch.Tensor, torch.Tensor]:
    folder = tiny_folders["gqa3-untied-bias"]
    ids = torch.randint(0, VOCAB, (41,), generator=torch.Generator().manual_seed(2))
    return Engine.load(folder, block_size=4, prefill_chunk=7), ids, reference_logits(folder, ids)


@given(cuts=st.lists(st.integers(1, 40), max_size=6, unique=True))
def test_streamed_random_splits_match_transformers(streamed, cuts: list[int]) -> None:
    engine, ids, ref = streamed
    bounds = [0, *sorted(cuts), ids.shape[0]]
    s = engine.session("split")
    try:
        parts = [s.feed(ids[a:b], return_logits=True).logits for a, b in zip(bounds, bounds[1:])]
        assert max_diff(torch.cat(parts), ref) <= ATOL
        assert s.last_logits is not None and max_diff(s.last_logits, ref[-1]) <= ATOL
    finally:
        s.close()
    assert engine.stats()["blocks_used"] == 0


def test_batched_forward_equals_separate_sessions(streamed) -> None:
    """Two sessions of different lengths in one ragged forward give their own logits."""
    engine, ids, ref = streamed
    a, b = engine.session("a"), engine.session("b")
    a.feed(ids[:5]), b.feed(ids[:17])
    out = engine._forward([(a, ids[5:9]), (b, ids[17:30])], [True, True])
    assert max_diff(out[0], ref[5:9]) <= ATOL
    assert max_diff(out[1], ref[17:30]) <= ATOL
    a.close(), b.close()


def test_fragmented_block_tables_gather_exactly(streamed) -> None:
    """Interleaved sessions get non-consecutive blocks: the gather path equals the view path."""
    engine, ids, ref = streamed
    sessions = [engine.session(f"frag{i}") for i in range(3)]
    for a in range(0, 41, 3):
        for s in sessions:
            s.feed(ids[a:a + 3])
    assert not sessions[1].state.layers[0].contiguous
    for s in sessions:
        assert max_diff(s.last_logits, ref[-1]) <= ATOL
        s.close()


def test_unsupported_rope_scaling_is_a_clear_error(tmp_path: Path) -> None:
    folder = make_tiny_llama(tmp_path / "yarn", hidden=32, heads=4, kv_heads=2, layers=1, vocab_size=VOCAB,
                             rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                           "original_max_position_embeddings": 64})
    with pytest.raises(UnsupportedRopeError, match="yarn"):
        Engine.load(folder)


def test_bf16_error_is_bounded_by_transformers_bf16_error(tiny_folders: dict[str, Path]) -> None:
    """bf16 on CPU: our error vs the fp32 reference is within a small multiple of transformers' own."""
    import transformers

    from tests.tolerances import assert_lowp_close

    folder = tiny_folders["gqa4-3l"]
    ids = torch.randint(0, VOCAB, (29,), generator=torch.Generator().manual_seed(5))
    ref = reference_logits(folder, ids)
    hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        theirs = hf_bf16(ids[None]).logits[0]
    ours = Engine.load(folder, dtype=torch.bfloat16).session("s").feed(ids, return_logits=True).logits
    assert ours.dtype == torch.bfloat16
    assert_lowp_close(ours, theirs, ref, factor=3.0, floor=1e-2)
