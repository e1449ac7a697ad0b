"""Compressive memory: batched segment writes vs the token loop, segment semantics, reads, gating."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamctx.operators.memory import (
    MemoryState,
    empty_memory,
    gated_memory_attention,
    infini_segment,
    memory_retrieve,
    memory_update,
)
from streamctx.operators.memory import naive
from tests.tolerances import assert_close


def make(b: int, h: int, t: int, dk: int, dv: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)
                 for s in ((b, h, t, dk), (b, h, t, dk), (b, h, t, dv)))


def random_memory(b: int, h: int, dk: int, dv: int, dtype: torch.dtype, seed: int) -> MemoryState:
    """A memory that has absorbed some earlier segment (positive z, as sigma > 0 makes it)."""
    _, k, v = make(b, h, 9, dk, dv, dtype, seed + 7)
    return memory_update(k, v, empty_memory(b, h, dk, dv, dtype=torch.promote_types(dtype, torch.float32)))


@given(shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.sampled_from([1, 2, 5, 13, 32, 41]),
                       st.sampled_from([1, 4]), st.sampled_from([1, 3])),
       rule=st.sampled_from(["linear", "delta"]), segment=st.sampled_from([None, 1, 3, 8, 64]),
       start_empty=st.booleans(), dtype=st.sampled_from([torch.float64, torch.float32]),
       seed=st.integers(0, 2**16))
def test_update_and_retrieve_match_reference(shape, rule, segment, start_empty, dtype, seed):
    b, h, t, dk, dv = shape
    q, k, v = make(b, h, t, dk, dv, dtype, seed)
    work = torch.promote_types(dtype, torch.float32)
    state = empty_memory(b, h, dk, dv, dtype=work) if start_empty else random_memory(b, h, dk, dv, dtype, seed)
    new = memory_update(k, v, state, rule=rule, segment_size=segment)
    ref = naive.memory_update(k, v, state, rule=rule, segment_size=segment)
    assert new.M.dtype == work and new.M.shape == (b, h, dk, dv) and new.z.shape == (b, h, dk)
    assert_close(new.M, ref.M)
    assert_close(new.z, ref.z)
    out = memory_retrieve(q, new)
    assert out.dtype == dtype
    assert_close(out, naive.memory_retrieve(q, ref))


@given(t=st.sampled_from([4, 12, 30]), segment=st.sampled_from([1, 2, 4, 6]), rule=st.sampled_from(["linear", "delta"]),
       dtype=st.sampled_from([torch.float64, torch.float32]), seed=st.integers(0, 2**16))
def test_segment_calls_with_carried_state_equal_one_call(t, segment, rule, dtype, seed):
    """One call per segment, carrying the memory, equals one call with `segment_size` (the definition)."""
    _, k, v = make(2, 2, t, 4, 3, dtype, seed)
    state = random_memory(2, 2, 4, 3, dtype, seed)
    whole = memory_update(k, v, state, rule=rule, segment_size=segment)
    carried = state
    for start in range(0, t, segment):
        carried = memory_update(k[:, :, start:start + segment], v[:, :, start:start + segment], carried, rule=rule)
    assert_close(carried.M, whole.M)
    assert_close(carried.z, whole.z)


@given(t=st.sampled_from([5, 17]), cuts=st.lists(st.integers(0, 17), max_size=3), seed=st.integers(0, 2**16))
def test_linear_rule_is_independent_of_segmentation(t, cuts, seed):
    _, k, v = make(1, 2, t, 3, 2, torch.float64, seed)
    state = random_memory(1, 2, 3, 2, torch.float64, seed)
    whole = memory_update(k, v, state)
    points = sorted({0, t, *(min(c, t) for c in cuts)})
    carried = state
    for a, b in zip(points, points[1:]):
        carried = memory_update(k[:, :, a:b], v[:, :, a:b], carried)
    assert_close(carried.M, whole.M)
    assert_close(carried.z, whole.z)


def test_delta_rule_retrieves_what_it_stored_and_skips_known_associations():
    """Writing (k, v) into an empty memory makes sigma(k)-retrieval return v; writing it again adds nothing."""
    _, k, v = make(1, 1, 1, 4, 3, torch.float64, 3)
    once = memory_update(k, v, empty_memory(1, 1, 4, 3, dtype=torch.float64), rule="delta")
    assert_close(memory_retrieve(k, once, eps=0.0), v)
    twice = memory_update(k, v, once, rule="delta")
    assert (twice.M - once.M).abs().max() < 1e-6 * once.M.abs().max()
    linear_twice = memory_update(k, v, once, rule="linear")
    assert_close(linear_twice.M, 2 * once.M)


def test_empty_memory_reads_zeros():
    q, _, _ = make(2, 3, 5, 4, 6, torch.float32, 0)
    out = memory_retrieve(q, empty_memory(2, 3, 4, 6))
    assert out.shape == (2, 3, 5, 6) and torch.equal(out, torch.zeros_like(out))


def test_gated_mixing():
    local, mem, _ = make(2, 3, 4, 5, 5, torch.float64, 1)
    beta = torch.tensor([-60.0, 0.0, 60.0], dtype=torch.float64)
    out = gated_memory_attention(local, mem, beta)
    assert_close(out[:, 0], local[:, 0])
    assert_close(out[:, 1], (local[:, 1] + mem[:, 1]) / 2)
    assert_close(out[:, 2], mem[:, 2])


def test_infini_segments_read_the_memory_from_before_each_segment():
    """Segment by segment: out = gate(local, read(M_before)); M_after = write(M_before, segment)."""
    q, k, v = make(1, 2, 12, 4, 3, torch.float64, 4)
    local = torch.randn(1, 2, 12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    beta = torch.tensor([0.3, -1.2], dtype=torch.float64)
    state = empty_memory(1, 2, 4, 3, dtype=torch.float64)
    outs = []
    for start in range(0, 12, 4):
        sl = slice(start, start + 4)
        out, new_state = infini_segment(q[:, :, sl], k[:, :, sl], v[:, :, sl], local[:, :, sl], state, beta)
        g = torch.sigmoid(beta).view(1, 2, 1, 1)
        assert_close(out, g * naive.memory_retrieve(q[:, :, sl], state) + (1 - g) * local[:, :, sl])
        state = new_state
        outs.append(out)
    whole = naive.memory_update(k, v, empty_memory(1, 2, 4, 3, dtype=torch.float64), rule="delta", segment_size=4)
    assert_close(state.M, whole.M)
    assert_close(outs[0], (1 - torch.sigmoid(beta).view(1, 2, 1, 1)) * local[:, :, :4])  # empty memory reads 0


@settings(max_examples=10)
@given(rule=st.sampled_from(["linear", "delta"]), segment=st.sampled_from([None, 2, 5]), seed=st.integers(0, 2**16))
def test_gradients_match_reference(rule, segment, seed):
    q, k, v = (x.requires_grad_() for x in make(2, 2, 11, 3, 4, torch.float64, seed))
    state = random_memory(2, 2, 3, 4, torch.float64, seed)

    def loss(mod):
        new = mod.memory_update(k, v, state, rule=rule, segment_size=segment)
        return (mod.memory_retrieve(q, new) ** 2).sum() + new.M.sum()

    import streamctx.operators.memory as fast

    g = torch.autograd.grad(loss(fast), [q, k, v])
    g_ref = torch.autograd.grad(loss(naive), [q, k, v])
    for name, a, b in zip("qkv", g, g_ref):
        assert_close(a, b, scale=10.0, msg=f"d/d{name}")


def test_bad_arguments_raise_clear_errors():
    _, k, v = make(1, 1, 4, 3, 2, torch.float32, 0)
    with pytest.raises(ValueError, match="rule"):
        memory_update(k, v, empty_memory(1, 1, 3, 2), rule="hebbian")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="segment_size"):
        memory_update(k, v, empty_memory(1, 1, 3, 2), rule="delta", segment_size=0)


@pytest.mark.gpu
def test_matches_reference_on_cuda():
    q, k, v = make(2, 2, 20, 4, 3, torch.float32, 5)
    state = empty_memory(2, 2, 4, 3)
    new = memory_update(k.cuda(), v.cuda(), MemoryState(*(s.cuda() for s in state)), rule="delta", segment_size=6)
    ref = naive.memory_update(k, v, state, rule="delta", segment_size=6)
    assert_close(new.M.cpu(), ref.M)
    assert_close(memory_retrieve(q.cuda(), new).cpu(), naive.memory_retrieve(q, ref))
