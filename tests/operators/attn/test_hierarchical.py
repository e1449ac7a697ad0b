"""Hierarchical attention vs dense attention over the explicit augmented key set."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from streamctx.operators.attn import attention
from streamctx.operators.attn.hierarchical import (
    hierarchical_attention,
    naive_hierarchical_attention,
    summary_nodes,
)
from tests.tolerances import assert_close


@given(num_blocks=st.integers(0, 200), fanout=st.integers(2, 5), levels=st.integers(1, 4))
def test_summary_nodes_tile_the_history(num_blocks: int, fanout: int, levels: int) -> None:
    covered: list[int] = []
    for level, i in summary_nodes(num_blocks, fanout, levels):
        size = fanout ** level
        covered.extend(range(i * size, (i + 1) * size))
    assert covered == list(range(num_blocks)), "nodes must cover every old block once, in order"
    if levels > 1 and num_blocks >= fanout:  # the most recent blocks are summarised finely
        assert summary_nodes(num_blocks, fanout, levels)[-1] == (0, num_blocks - 1)


@given(t=st.sampled_from([1, 5, 17, 31, 64, 97]), cache=st.sampled_from([0, 3, 40]),
       block=st.sampled_from([2, 4, 7]), local=st.integers(1, 3), levels=st.integers(1, 3),
       fanout=st.integers(2, 4), groups=st.sampled_from([1, 3]), count_bias=st.booleans(),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_matches_augmented_dense_reference(t, cache, block, local, levels, fanout, groups, count_bias, dtype):
    gen = torch.Generator().manual_seed(t + cache)
    q = torch.randn(1, 2 * groups, t, 8, generator=gen, dtype=dtype)
    k, v = (torch.randn(1, 2, cache + t, 8, generator=gen, dtype=dtype) for _ in range(2))
    kw = dict(block_size=block, local_blocks=local, levels=levels, fanout=fanout, q_offset=cache,
              count_bias=count_bias, return_lse=True)
    out, lse = hierarchical_attention(q, k, v, **kw)
    r_out, r_lse = naive_hierarchical_attention(q, k, v, **kw)
    assert_close(out, r_out)
    assert_close(lse, r_lse, dtype=dtype)


def test_equals_exact_attention_when_history_fits_the_local_section() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 30, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    assert_close(hierarchical_attention(q, k, v, block_size=8, local_blocks=4), attention(q, k, v))


def test_gradients_match_reference() -> None:
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 37, 8, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3))
    kw = dict(block_size=4, local_blocks=2, levels=2, fanout=2)
    ours = torch.autograd.grad(hierarchical_attention(q, k, v, **kw).square().sum(), (q, k, v))
    ref = torch.autograd.grad(naive_hierarchical_attention(q, k, v, **kw).square().sum(), (q, k, v))
    for a, b in zip(ours, ref):
        assert_close(a, b)


def test_bad_arguments() -> None:
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="fanout"):
        hierarchical_attention(q, q, q, block_size=2, fanout=1)
