"""Chunked selective scan vs the sequential reference (and transformers' Mamba scan as a peer)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamctx.operators.ssm import selective_scan
from streamctx.operators.ssm import naive
from tests.tolerances import assert_close

LENGTHS = [1, 2, 3, 5, 7, 13, 16, 31, 37, 64, 97]
# fp32: the chunked form regroups sums of up to Q products and factors exp(Lc_t - Lc_s) into
# exp(Lc_t) exp(-Lc_s) (~budget * eps relative); measured worst |diff| ~2e-6 on outputs of ~10.
FP32_SCALE = 2.0


def make_inputs(batch: int, dim: int, n: int, length: int, groups: int, dtype: torch.dtype, seed: int,
                decay: float = 8.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    bc_shape = (batch, groups, n, length) if groups else (batch, n, length)
    return {
        "u": rnd(batch, dim, length),
        "delta": rnd(batch, dim, length),
        "A": (-torch.rand(dim, n, generator=g, dtype=torch.float64) * decay).to(dtype),
        "B": rnd(*bc_shape),
        "C": rnd(*bc_shape),
        "D": rnd(dim),
        "z": rnd(batch, dim, length),
        "delta_bias": rnd(dim),
        "initial_state": rnd(batch, dim, n),
    }


def pick(inputs: dict[str, torch.Tensor], use_d: bool, use_z: bool, use_bias: bool, use_state: bool) -> dict:
    out = {k: inputs[k] for k in ("u", "delta", "A", "B", "C")}
    for flag, key in ((use_d, "D"), (use_z, "z"), (use_bias, "delta_bias"), (use_state, "initial_state")):
        if flag:
            out[key] = inputs[key]
    return out


shapes = st.tuples(
    st.integers(1, 2),  # batch
    st.sampled_from([1, 2, 3, 6]),  # Dm
    st.sampled_from([1, 2, 5]),  # N
    st.sampled_from(LENGTHS),
    st.sampled_from([0, 1, 3]),  # groups (0: B, C are [B, N, L])
)


@given(shape=shapes, chunk=st.sampled_from([1, 2, 3, 7, 16, 64]), flags=st.tuples(*[st.booleans()] * 5),
       dtype=st.sampled_from([torch.float64, torch.float32]), seed=st.integers(0, 2**16))
def test_matches_reference(shape, chunk, flags, dtype, seed):
    batch, dim, n, length, groups = shape
    if groups and dim % groups:
        groups = 1
    use_d, use_z, use_bias, use_state, softplus = flags
    args = pick(make_inputs(batch, dim, n, length, groups, dtype, seed), use_d, use_z, use_bias, use_state)
    if not softplus:  # Mamba's delta is positive; a negative one makes A grow and both sides overflow
        args.update({k: args[k].abs() for k in ("delta", "delta_bias") if k in args})
    y, state = selective_scan(**args, delta_softplus=softplus, return_state=True, chunk_size=chunk)
    y_ref, state_ref = naive.selective_scan(**args, delta_softplus=softplus, return_state=True)
    assert y.dtype == dtype and y.shape == (batch, dim, length)
    assert state.dtype == torch.promote_types(dtype, torch.float32) and state.shape == (batch, dim, n)
    scale = FP32_SCALE if dtype == torch.float32 else 1.0
    assert_close(y, y_ref, scale=scale)
    assert_close(state, state_ref, scale=scale)


@given(length=st.sampled_from([2, 5, 17, 40, 67]), cuts=st.lists(st.floats(0, 1), min_size=1, max_size=3),
       chunk=st.sampled_from([1, 4, 8, 32]), dtype=st.sampled_from([torch.float64, torch.float32]),
       seed=st.integers(0, 2**16))
def test_split_with_carried_state_equals_whole(length, cuts, chunk, dtype, seed):
    inputs = make_inputs(2, 4, 3, length, 0, dtype, seed)
    args = pick(inputs, True, True, True, True)
    y_whole, s_whole = selective_scan(**args, delta_softplus=True, return_state=True, chunk_size=chunk)
    points = sorted({0, length, *(int(c * length) for c in cuts)})
    state = args.pop("initial_state")
    ys = []
    for a, b in zip(points, points[1:]):
        part = {k: (v[..., a:b] if k in ("u", "delta", "B", "C", "z") else v) for k, v in args.items()}
        y, state = selective_scan(**part, delta_softplus=True, initial_state=state, return_state=True,
                                  chunk_size=chunk)
        ys.append(y)
    scale = FP32_SCALE if dtype == torch.float32 else 1.0
    assert_close(torch.cat(ys, dim=-1), y_whole, scale=scale)
    assert_close(state, s_whole, scale=scale)


def test_decode_steps_equal_prefill():
    """L=1 calls carrying the state (the decoder's decode loop) equal one pass."""
    args = pick(make_inputs(2, 8, 4, 12, 0, torch.float64, 3), True, True, True, True)
    y_whole, s_whole = selective_scan(**args, delta_softplus=True, return_state=True)
    state = args.pop("initial_state")
    ys = []
    for t in range(12):
        step = {k: (v[..., t:t + 1] if k in ("u", "delta", "B", "C", "z") else v) for k, v in args.items()}
        y, state = selective_scan(**step, delta_softplus=True, initial_state=state, return_state=True)
        ys.append(y)
    assert_close(torch.cat(ys, dim=-1), y_whole)
    assert_close(state, s_whole)


def test_matches_transformers_mamba_scan():
    """The reference has Mamba's semantics: transformers' torch scan agrees (fp32, zero initial state)."""
    from transformers.models.mamba import modeling_mamba
    inputs = make_inputs(2, 6, 4, 23, 0, torch.float32, 11)
    args = {k: inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")}
    y_hf, s_hf = modeling_mamba.mamba_selective_scan(
        args["u"], args["delta"], args["A"], args["B"], args["C"], D=args["D"], z=args["z"],
        delta_bias=args["delta_bias"], delta_softplus=True, return_last_state=True)
    y, s = selective_scan(**args, delta_softplus=True, return_state=True, chunk_size=8)
    y_ref, s_ref = naive.selective_scan(**args, delta_softplus=True, return_state=True)
    assert_close(y_ref, y_hf, scale=FP32_SCALE)
    assert_close(s_ref, s_hf, scale=FP32_SCALE)
    assert_close(y, y_hf, scale=FP32_SCALE)
    assert_close(s, s_hf, scale=FP32_SCALE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("regime", ["huge", "large"])
def test_large_decays_stay_finite_and_exact(dtype, regime):
    """Cumulative delta*A in the thousands: exp(-Lc) would overflow, and differences of large cumulative
    sums would cancel; the result must still equal the loop. "huge": every step forgets (e^-1000);
    "large": steps up to e^-500 mixed with slow ones (chunks cross the budget part-way)."""
    inputs = make_inputs(1, 6, 4, 70, 0, dtype, 5, decay=1000.0 if regime == "huge" else 100.0)
    if regime == "huge":
        inputs["delta"] = inputs["delta"].abs() * 5 + 1
    else:
        inputs["delta"] = torch.rand(inputs["delta"].shape, generator=torch.Generator().manual_seed(1),
                                     dtype=torch.float64).to(dtype) * 5
    inputs["A"][0] = -1e-3  # and one slow channel that keeps its memory across chunks
    args = pick(inputs, True, False, False, True)
    y, s = selective_scan(**args, return_state=True, chunk_size=32)
    y_ref, s_ref = naive.selective_scan(**args, return_state=True)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    scale = FP32_SCALE if dtype == torch.float32 else 1.0
    assert_close(y, y_ref, scale=scale)
    assert_close(s, s_ref, scale=scale)
    leaves = {k: v.clone().requires_grad_() if k in ("u", "delta", "A") else v for k, v in args.items()}
    grads = torch.autograd.grad(selective_scan(**leaves, chunk_size=32).sum(),
                                [leaves["u"], leaves["delta"], leaves["A"]])
    assert all(torch.isfinite(g).all() for g in grads)


@settings(max_examples=10)
@given(length=st.sampled_from([1, 6, 19, 40]), chunk=st.sampled_from([3, 8, 64]), groups=st.sampled_from([0, 2]),
       use_checkpoint=st.booleans(), seed=st.integers(0, 2**16))
def test_gradients_match_reference(length, chunk, groups, use_checkpoint, seed):
    inputs = make_inputs(2, 4, 3, length, groups, torch.float64, seed, decay=40.0)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    weight = torch.randn(2, 4, length, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))

    def loss(fn, **kw):
        y, s = fn(**leaves, delta_softplus=True, return_state=True, **kw)
        return (y * weight).sum() + (s * s).sum()

    grads = torch.autograd.grad(loss(selective_scan, chunk_size=chunk, checkpoint=use_checkpoint),
                                list(leaves.values()))
    grads_ref = torch.autograd.grad(loss(naive.selective_scan), list(leaves.values()))
    for name, g, g_ref in zip(leaves, grads, grads_ref):
        assert_close(g, g_ref, scale=10.0, msg=f"d/d{name}")  # fp64: sums regrouped over many chunks


def test_checkpoint_keeps_fewer_activations():
    """checkpoint=True recomputes blocks in backward: the saved graph is smaller."""
    args = {k: v.requires_grad_() for k, v in pick(make_inputs(1, 16, 8, 512, 0, torch.float32, 2),
                                                      False, False, False, False).items()}

    def saved_bytes(use_checkpoint: bool) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            selective_scan(**args, chunk_size=16, checkpoint=use_checkpoint)
        return total

    assert saved_bytes(True) * 4 < saved_bytes(False)


def test_transposed_inputs_and_empty_sequence():
    """u and delta often arrive as [B, L, Dm] transposed views; L = 0 returns empty and keeps the state."""
    args = pick(make_inputs(2, 6, 3, 20, 0, torch.float64, 4), True, True, True, True)
    strided = {k: (v.transpose(1, 2).contiguous().transpose(1, 2) if k in ("u", "delta", "z") else v)
               for k, v in args.items()}
    assert not strided["u"].is_contiguous()
    assert_close(selective_scan(**strided, chunk_size=8), naive.selective_scan(**args))
    empty = {k: (v[..., :0] if k in ("u", "delta", "B", "C", "z") else v) for k, v in args.items()}
    y, state = selective_scan(**empty, return_state=True)
    assert y.shape == (2, 6, 0) and torch.equal(state, args["initial_state"])


def test_bad_shapes_raise_clear_errors():
    args = pick(make_inputs(1, 4, 3, 5, 0, torch.float32, 0), False, False, False, False)
    with pytest.raises(ValueError, match="B must be"):
        selective_scan(**{**args, "B": args["B"][..., :4]})
    with pytest.raises(ValueError, match="initial_state"):
        selective_scan(**args, initial_state=torch.zeros(1, 4, 2))


@pytest.mark.gpu
def test_matches_reference_on_cuda():
    args = pick(make_inputs(2, 8, 4, 77, 2, torch.float32, 9), True, True, True, True)
    cuda = {k: v.cuda() for k, v in args.items()}
    y, s = selective_scan(**cuda, delta_softplus=True, return_state=True, chunk_size=16)
    y_ref, s_ref = naive.selective_scan(**args, delta_softplus=True, return_state=True)
    assert_close(y.cpu(), y_ref, scale=FP32_SCALE)
    assert_close(s.cpu(), s_ref, scale=FP32_SCALE)
