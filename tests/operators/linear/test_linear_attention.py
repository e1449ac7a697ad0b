"""Chunked linear attention vs the recurrent reference, a quadratic parallel form, and softmax (random features)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamctx.operators.linear import LinearState, apply_feature_map, linear_attention, random_projection
from streamctx.operators.linear import naive
from tests.tolerances import assert_close

LENGTHS = [1, 2, 3, 7, 13, 16, 31, 64, 97]
FEATURES = 6  # random-feature count in the property tests


def make_qkv(b: int, h: int, t: int, dk: int, dv: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
                 for shape in ((b, h, t, dk), (b, h, t, dk), (b, h, t, dv)))


def make_state(b: int, h: int, f: int, dv: int, dtype: torch.dtype, seed: int) -> LinearState:
    g = torch.Generator().manual_seed(seed + 1)
    return LinearState(torch.randn(b, h, f, dv, generator=g, dtype=torch.float64).to(dtype),
                       torch.rand(b, h, f, generator=g, dtype=torch.float64).to(dtype) * 4)


def features(feature_map: str, dk: int) -> int:
    return FEATURES if feature_map == "random" else dk


@given(shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.sampled_from(LENGTHS), st.sampled_from([1, 3, 8]),
                       st.sampled_from([1, 5])),
       chunk=st.sampled_from([1, 2, 5, 16, 64]), feature_map=st.sampled_from(["elu", "relu", "random"]),
       causal=st.booleans(), normalize=st.booleans(), with_state=st.booleans(),
       dtype=st.sampled_from([torch.float64, torch.float32]), seed=st.integers(0, 2**16))
def test_matches_recurrent_reference(shape, chunk, feature_map, causal, normalize, with_state, dtype, seed):
    b, h, t, dk, dv = shape
    q, k, v = make_qkv(b, h, t, dk, dv, dtype, seed)
    state = make_state(b, h, features(feature_map, dk), dv, dtype, seed) if with_state else None
    kw = dict(feature_map=feature_map, causal=causal, normalize=normalize, initial_state=state,
              return_state=True, num_features=FEATURES, seed=seed)
    out, s = linear_attention(q, k, v, chunk_size=chunk, **kw)
    out_ref, s_ref = naive.linear_attention(q, k, v, **kw)
    assert out.dtype == dtype and out.shape == (b, h, t, dv)
    assert s.S.dtype == torch.promote_types(dtype, torch.float32)
    assert_close(out, out_ref)
    assert_close(s.S, s_ref.S)
    assert_close(s.z, s_ref.z)


@given(t=st.sampled_from([2, 9, 40, 130]), cuts=st.lists(st.floats(0, 1), min_size=1, max_size=3),
       chunk=st.sampled_from([1, 4, 16, 64]), feature_map=st.sampled_from(["elu", "random"]),
       dtype=st.sampled_from([torch.float64, torch.float32]), seed=st.integers(0, 2**16))
def test_split_with_carried_state_equals_whole(t, cuts, chunk, feature_map, dtype, seed):
    q, k, v = make_qkv(2, 2, t, 4, 3, dtype, seed)
    kw = dict(feature_map=feature_map, chunk_size=chunk, return_state=True, seed=seed)
    out_whole, s_whole = linear_attention(q, k, v, **kw)
    points = sorted({0, t, *(int(c * t) for c in cuts)})
    state, outs = None, []
    for a, b in zip(points, points[1:]):
        out, state = linear_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], initial_state=state, **kw)
        outs.append(out)
    assert_close(torch.cat(outs, dim=2), out_whole)
    assert_close(state.S, s_whole.S)
    assert_close(state.z, s_whole.z)


@pytest.mark.parametrize("causal", [True, False])
def test_matches_quadratic_parallel_form(causal):
    """out = (phi(Q) phi(K)^T [masked]) V / row sums: the attention-matrix definition."""
    q, k, v = make_qkv(2, 3, 45, 8, 4, torch.float64, 7)
    pq, pk = apply_feature_map(q), apply_feature_map(k)
    scores = pq @ pk.transpose(-1, -2)
    if causal:
        scores = scores.tril()
    expected = (scores @ v) / (scores.sum(-1, keepdim=True) + 1e-6)
    assert_close(linear_attention(q, k, v, causal=causal, chunk_size=16), expected)


def test_random_features_estimate_the_softmax_kernel():
    """Performer features: phi(q) . phi(k) is an unbiased estimate of exp(q . k / sqrt(Dk))."""
    g = torch.Generator().manual_seed(0)
    dk = 8
    q = torch.randn(32, dk, generator=g, dtype=torch.float64) * 0.5
    k = torch.randn(32, dk, generator=g, dtype=torch.float64) * 0.5
    proj = random_projection(dk, 20000, seed=1, dtype=torch.float64)
    estimate = apply_feature_map(q, "random", projection=proj) @ apply_feature_map(k, "random", projection=proj).T
    exact = torch.exp(q @ k.T / math.sqrt(dk))
    ratio = estimate / exact  # 1024 pairs, 20000 features: each ratio ~ 1 +- O(1/sqrt(m))
    assert abs(ratio.mean().item() - 1) < 0.01, ratio.mean()
    assert (ratio - 1).abs().median().item() < 0.03, (ratio - 1).abs().median()


def test_random_features_are_reproducible_and_projection_is_explicit():
    q, k, v = make_qkv(1, 2, 10, 4, 3, torch.float32, 1)
    a = linear_attention(q, k, v, feature_map="random", num_features=16, seed=3)
    b = linear_attention(q, k, v, feature_map="random", num_features=16, seed=3)
    c = linear_attention(q, k, v, feature_map="random", num_features=16, seed=4)
    d = linear_attention(q, k, v, feature_map="random", projection=random_projection(4, 16, seed=3))
    assert torch.equal(a, b) and torch.equal(a, d)
    assert not torch.allclose(a, c)
    with pytest.raises(ValueError, match="projection"):
        apply_feature_map(q, "random")


@settings(max_examples=10)
@given(t=st.sampled_from([1, 7, 33]), chunk=st.sampled_from([4, 16]), feature_map=st.sampled_from(["elu", "random"]),
       causal=st.booleans(), use_checkpoint=st.booleans(), seed=st.integers(0, 2**16))
def test_gradients_match_reference(t, chunk, feature_map, causal, use_checkpoint, seed):
    q, k, v = (x.requires_grad_() for x in make_qkv(2, 2, t, 4, 3, torch.float64, seed))
    state = make_state(2, 2, features(feature_map, 4), 3, torch.float64, seed)
    kw = dict(feature_map=feature_map, causal=causal, initial_state=state, return_state=True,
              num_features=FEATURES, seed=seed)

    def loss(out_state):
        out, s = out_state
        return (out * out).sum() + s.S.sum()

    g = torch.autograd.grad(loss(linear_attention(q, k, v, chunk_size=chunk, checkpoint=use_checkpoint, **kw)),
                            [q, k, v])
    g_ref = torch.autograd.grad(loss(naive.linear_attention(q, k, v, **kw)), [q, k, v])
    for name, a, b in zip("qkv", g, g_ref):
        assert_close(a, b, scale=10.0, msg=f"d/d{name}")


def test_checkpoint_keeps_fewer_activations():
    """checkpoint=True recomputes each block of chunks in backward: the saved graph is smaller."""
    q, k, v = (x.requires_grad_() for x in make_qkv(1, 2, 2048, 16, 16, torch.float32, 0))

    def saved_bytes(use_checkpoint: bool) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            linear_attention(q, k, v, chunk_size=32, checkpoint=use_checkpoint)
        return total

    assert saved_bytes(True) < 0.6 * saved_bytes(False)  # measured 0.48: phi(q), phi(k), v stay saved


def test_empty_sequence_keeps_the_state():
    q, k, v = make_qkv(1, 2, 0, 3, 2, torch.float32, 0)
    state = make_state(1, 2, 3, 2, torch.float32, 0)
    out, new = linear_attention(q, k, v, initial_state=state, return_state=True)
    assert out.shape == (1, 2, 0, 2) and torch.equal(new.S, state.S) and torch.equal(new.z, state.z)


def test_bad_arguments_raise_clear_errors():
    q, k, v = make_qkv(1, 1, 4, 3, 2, torch.float32, 0)
    with pytest.raises(ValueError, match="feature_map"):
        linear_attention(q, k, v, feature_map="softmax")
    with pytest.raises(ValueError, match="initial_state"):
        linear_attention(q, k, v, initial_state=(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2)))


@pytest.mark.gpu
def test_matches_reference_on_cuda():
    q, k, v = make_qkv(2, 2, 77, 8, 4, torch.float32, 5)
    out, s = linear_attention(q.cuda(), k.cuda(), v.cuda(), chunk_size=16, return_state=True)
    out_ref, s_ref = naive.linear_attention(q, k, v, return_state=True)
    assert_close(out.cpu(), out_ref)
    assert_close(s.S.cpu(), s_ref.S)
