"""RoPE frequencies and rotation vs transformers' own implementations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from streamctx.model.rope import Rope, UnsupportedRopeError, apply_rope, inv_frequencies, rerotate
from tests.tolerances import assert_close

SCALINGS = [
    None,
    {"rope_type": "linear", "factor": 2.5},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
]


@pytest.mark.parametrize("scaling", SCALINGS, ids=["default", "linear", "llama3"])
@pytest.mark.parametrize("head_dim,theta", [(8, 10000.0), (64, 100000.0), (128, 500000.0)])
def test_inv_frequencies_match_transformers(scaling, head_dim: int, theta: float) -> None:
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "default", "rope_theta": theta} if scaling is None else {**scaling, "rope_theta": theta}
    cfg = transformers.LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                                   rope_parameters=params, max_position_embeddings=4096)
    if scaling is None:
        ref = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    else:
        ref, factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](cfg, "cpu")
        assert factor == 1.0
    assert torch.equal(inv_frequencies(head_dim, theta, scaling), ref)


def test_unsupported_types_raise() -> None:
    for kind in ("dynamic", "yarn", "longrope"):
        with pytest.raises(UnsupportedRopeError, match=kind):
            inv_frequencies(16, 10000.0, {"rope_type": kind, "factor": 2.0})


def test_table_growth_gives_the_same_bits() -> None:
    small = Rope(16, 10000.0, initial=4)
    big = Rope(16, 10000.0, initial=4096)
    cos_s, sin_s = small.cos_sin(range(1000, 1010))  # forces growth
    cos_b, sin_b = big.cos_sin(range(1000, 1010))
    assert torch.equal(cos_s, cos_b) and torch.equal(sin_s, sin_b)
    idx = torch.tensor([3, 1000, 7])
    assert torch.equal(big.cos_sin(idx)[0], torch.stack([big.cos_sin(range(p, p + 1))[0][0] for p in (3, 1000, 7)]))


@given(start=st.integers(0, 500), delta=st.integers(-400, 400), n=st.integers(1, 9))
def test_rerotate_composes_rotations(start: int, delta: int, n: int) -> None:
    rope = Rope(32, 10000.0)
    x = torch.randn(2, n, 32, generator=torch.Generator().manual_seed(start))
    pos = range(start, start + n)
    rotated = apply_rope(x, *rope.cos_sin(pos))
    target = [p + delta for p in pos]
    if min(target) < 0:
        return
    moved = rerotate(rotated, torch.full((n,), delta), rope)
    direct = apply_rope(x, *rope.cos_sin(torch.tensor(target)))
    assert_close(moved, direct, scale=20.0)  # two roundings instead of one, positions up to ~900
