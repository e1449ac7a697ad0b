"""lse merge exactness and block-sparse patterns (equal to dense attention with the token mask)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from streamctx.operators.attn import attention, merge_attention, naive, patterns
from tests.operators.attn._cases import Case, case_st, pattern_st
from tests.tolerances import assert_close


@given(case=case_st(), cut=st.floats(0.0, 1.0), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_merge_of_disjoint_key_sets_equals_whole(case: Case, cut: float, dtype: torch.dtype) -> None:
    """Split keys at a point: attend to [0, c) and [c, Tk) separately (the second with shifted
    positions), merge through lse, and get attention over all keys."""
    q, k, v = case.tensors(dtype)
    c = int(cut * case.tk)
    kw = case.kwargs()
    whole, whole_lse = attention(q, k, v, **kw, return_lse=True)
    a, la = attention(q, k[:, :, :c], v[:, :, :c], **kw, return_lse=True)
    if case.window is None and case.pattern is None:
        b, lb = attention(q, k[:, :, c:], v[:, :, c:], **{**kw, "q_offset": case.q_offset - c},
                          return_lse=True)
    else:  # window/sink/pattern positions are absolute: mask the first part out of the second call
        b, lb = _attend_suffix(q, k, v, c, kw)
    out, lse = merge_attention(a, la, b, lb)
    assert_close(out, whole)
    assert torch.equal(torch.isinf(lse), torch.isinf(whole_lse))
    assert_close(torch.nan_to_num(lse, neginf=0.0), torch.nan_to_num(whole_lse, neginf=0.0), dtype=dtype)


def _attend_suffix(q, k, v, c, kw):
    kw = {key: val for key, val in kw.items() if key != "chunk_size"}
    mask = naive.visible_mask(q.shape[2], k.shape[2], **kw)
    mask[:, :c] = False
    g = q.shape[1] // k.shape[1]
    s = (q @ k.repeat_interleave(g, 1).transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.nan_to_num(lse, neginf=0.0)[..., None])
    return p @ v.repeat_interleave(g, 1), lse


def test_merge_handles_empty_sides() -> None:
    out = torch.randn(2, 3, 4)
    lse = torch.randn(2, 3)
    empty = torch.full((2, 3), float("-inf"))
    for a, la, b, lb in [(out, lse, torch.zeros_like(out), empty), (torch.zeros_like(out), empty, out, lse)]:
        m, ml = merge_attention(a, la, b, lb)
        assert torch.equal(m, out) and torch.equal(ml, lse)
    m, ml = merge_attention(torch.zeros_like(out), empty, torch.zeros_like(out), empty)
    assert torch.equal(m, torch.zeros_like(out)) and torch.isneginf(ml).all() and not m.isnan().any()


def test_merge_matches_reference_merge() -> None:
    gen = torch.Generator().manual_seed(0)
    oa, ob = torch.randn(2, 5, 7, 8, generator=gen, dtype=torch.float64).unbind(0)
    la, lb = (torch.randn(2, 5, 7, generator=gen, dtype=torch.float64) * 30).unbind(0)
    for x, y in zip(merge_attention(oa, la, ob, lb), naive.merge_attention(oa, la, ob, lb)):
        assert_close(x, y)


@given(pattern=pattern_st(), t=st.sampled_from([1, 7, 31, 53]), causal=st.booleans(),
       window=st.sampled_from([None, 4]), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_pattern_equals_dense_with_token_mask(pattern, t, causal, window, dtype) -> None:
    """The block pattern, united with a window and intersected with causality, equals dense attention
    with the same token-level mask, built here independently of `naive.visible_mask`."""
    gen = torch.Generator().manual_seed(t)
    q, k, v = (torch.randn(1, 2, t, 8, generator=gen, dtype=dtype) for _ in range(3))
    bs = pattern.block_size
    i = torch.arange(t)
    allowed = torch.tensor([[bool(j // bs in pattern.key_blocks(p // bs, t // bs + 1)) for j in range(t)]
                            for p in range(t)])
    if window is not None:
        allowed |= (i[None, :] > i[:, None] - window) & (i[None, :] <= i[:, None])
    if causal:
        allowed &= i[None, :] <= i[:, None]
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed).nan_to_num(0.0) * allowed.any(1)[:, None]
    ours = attention(q, k, v, pattern=pattern, causal=causal, window=window)
    assert_close(ours, ref)


def test_random_pattern_is_stream_stable_and_seeded() -> None:
    p = patterns.random_pattern(16, 0.3, seed=7)
    m_small = p.block_mask(torch.arange(5), 5)
    m_big = p.block_mask(torch.arange(40), 40)
    assert torch.equal(m_small, m_big[:5, :5]), "growing the sequence changed earlier blocks"
    assert not torch.equal(m_big, patterns.random_pattern(16, 0.3, seed=8).block_mask(torch.arange(40), 40))
    assert 0.2 < p.density(200, causal=False) < 0.4


def test_strided_pattern_blocks() -> None:
    p = patterns.strided_pattern(4, stride=3, local=2)
    assert p.key_blocks(7, 8) == [1, 4, 6, 7]


def test_pattern_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="block_size"):
        patterns.union(patterns.strided_pattern(4, 2), patterns.strided_pattern(8, 2))
    with pytest.raises(ValueError, match="probability"):
        patterns.random_pattern(4, 1.5, seed=0)
    with pytest.raises(ValueError, match="2-D"):
        patterns.block_sparse_pattern(torch.ones(3, dtype=torch.bool), 4)


def test_sparse_pattern_calls_scale_with_density(monkeypatch) -> None:
    """Hidden blocks are skipped: the score work at 25% density is about a quarter of 100%."""
    from streamctx.operators.attn import blockwise

    work: list[int] = []
    fused = blockwise._fused

    def spy(q, k, v, **kw):
        work.append(q.shape[2] * k.shape[2])
        return fused(q, k, v, **kw)

    monkeypatch.setattr(blockwise, "_fused", spy)
    t, bs = 1024, 32
    q = torch.randn(1, 1, t, 8)
    totals = []
    for density in (0.25, 1.0):
        work.clear()
        attention(q, q, q, pattern=patterns.random_pattern(bs, density, seed=0))
        totals.append(sum(work))
    assert 0.15 < totals[0] / totals[1] < 0.4
