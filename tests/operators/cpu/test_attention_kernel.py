"""The native causal prefill attention (`cpu.causal_attention`) against its plain reference in fp64."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamctx.operators import cpu
from streamctx.operators.cpu import naive
from tests.tolerances import assert_lowp_close

needs_native = pytest.mark.skipif(not cpu.available(), reason=f"native kernels unavailable: {cpu.why_unavailable()}")


def _inputs(hkv: int, group: int, t: int, s: int, d: int, seed: int, *, strided: bool = True, sharp: float = 1.0
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q as the model makes it (a view of the fused qkv rows, [Hq, T, D]) and k, v [Hkv, S, D] as
    views with a row stride (a cache with room to spare), or all contiguous."""
    g = torch.Generator().manual_seed(seed)
    hq = hkv * group
    if strided:
        qkv = torch.randn(t, hq + 2 * hkv, d, generator=g) * sharp
        q = qkv[:, :hq].transpose(0, 1)
        cache = torch.randn(2, hkv, s + 5, 2 * d, generator=g)
        k, v = cache[0, :, :s, :d], cache[1, :, 3:s + 3, d:]
    else:
        q = torch.randn(hq, t, d, generator=g) * sharp
        k, v = torch.randn(hkv, s, d, generator=g), torch.randn(hkv, s, d, generator=g)
    return q, k, v


def _out_floor(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> float:
    """What fp32 rounding of the scores alone can move an output by: a probability's relative error
    is a few ulps of its score (exp(s - m) of a rounded s), times the largest value it weighs."""
    kk = k.double().repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    scores = torch.einsum("htd,hsd->hts", q.double(), kk) * scale
    return 1e-6 + 4 * 2.0 ** -24 * scores.abs().max().item() * v.abs().max().item()


def _lse_floor(exact_lse: torch.Tensor) -> float:
    """A few fp32 ulps of the largest lse: the kernel's scores are as exact as torch's relative to
    their size, and a few keys can leave torch's lse exact by luck."""
    return 1e-6 + 5e-7 * exact_lse.abs().max().item()


@needs_native
@given(t=st.integers(1, 300), q_offset=st.integers(0, 500), extra=st.integers(-40, 40),
       group=st.sampled_from([1, 3, 4]), hkv=st.integers(1, 3), d=st.sampled_from([16, 64, 128]), strided=st.booleans(),
       sharp=st.sampled_from([1.0, 6.0]), seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_causal_attention_matches_fp64(t: int, q_offset: int, extra: int, group: int, hkv: int, d: int,
                                       strided: bool, sharp: float, seed: int) -> None:
    s = max(1, q_offset + t + extra)  # keys past the last query's position, or fewer keys than that
    q, k, v = _inputs(hkv, group, t, s, d, seed, strided=strided, sharp=sharp)
    scale = 1 / math.sqrt(d)
    out, lse = cpu.causal_attention(q, k, v, q_offset, scale, return_lse=True)
    assert out.shape == (t, hkv * group, d) and out.is_contiguous() and lse.shape == (hkv * group, t)
    exact, exact_lse = naive.causal_attention(q.double(), k.double(), v.double(), q_offset, scale, return_lse=True)
    plain, plain_lse = naive.causal_attention(q, k, v, q_offset, scale, return_lse=True)
    # Scores `sharp` times larger carry `sharp` times larger rounding errors, in torch's as in ours;
    # with a few keys torch's can be small by luck (t=1, 312 keys, D=128, sharp 6: ours 1.5e-5,
    # torch's 2.6e-6), so the floor is the scores' own rounding.
    assert_lowp_close(out, plain, exact, factor=3.0, floor=_out_floor(q, k, v, scale))
    assert_lowp_close(lse, plain_lse, exact_lse, factor=3.0, floor=_lse_floor(exact_lse))
    assert torch.equal(cpu.causal_attention(q, k, v, q_offset, scale), out)  # without lse: the same bits


@needs_native
@pytest.mark.parametrize(("t", "s", "q_offset", "d"), [(1, 1, 0, 64), (64, 64, 0, 64), (65, 300, 235, 64),
                                                       (200, 700, 100, 256), (7, 3, 0, 32), (3, 40, 500, 48)])
def test_causal_attention_edge_shapes(t: int, s: int, q_offset: int, d: int) -> None:
    """Whole blocks, one key, keys fewer than positions, the widest head, D not a multiple of 64."""
    q, k, v = _inputs(2, 3, t, s, d, t + s)
    out, lse = cpu.causal_attention(q, k, v, q_offset, 0.3, return_lse=True)
    exact, exact_lse = naive.causal_attention(q.double(), k.double(), v.double(), q_offset, 0.3, return_lse=True)
    plain, plain_lse = naive.causal_attention(q, k, v, q_offset, 0.3, return_lse=True)
    assert_lowp_close(out, plain, exact, factor=3.0, floor=1e-6)
    assert_lowp_close(lse, plain_lse, exact_lse, factor=3.0, floor=_lse_floor(exact_lse))


@needs_native
@pytest.mark.parametrize("scale", [-0.3, 0.0, 1e-30])
def test_causal_attention_any_scale(scale: float) -> None:
    """A negative scale (the queries are negated inside), zero (uniform weights) and a tiny one."""
    q, k, v = _inputs(3, 3, 70, 100, 64, 5)
    out, lse = cpu.causal_attention(q, k, v, 30, scale, return_lse=True)
    exact, exact_lse = naive.causal_attention(q.double(), k.double(), v.double(), 30, scale, return_lse=True)
    plain, plain_lse = naive.causal_attention(q, k, v, 30, scale, return_lse=True)
    assert_lowp_close(out, plain, exact, factor=3.0, floor=1e-6)
    assert_lowp_close(lse, plain_lse, exact_lse, factor=3.0, floor=_lse_floor(exact_lse))


@needs_native
def test_causal_attention_peaked_scores_underflow_cleanly() -> None:
    """Scores hundreds apart: most probabilities underflow to 0, nothing becomes inf or NaN."""
    q, k, v = _inputs(3, 3, 150, 300, 64, 1, sharp=40.0)
    out, lse = cpu.causal_attention(q, k, v, 150, 0.125, return_lse=True)
    exact, exact_lse = naive.causal_attention(q.double(), k.double(), v.double(), 150, 0.125, return_lse=True)
    plain, plain_lse = naive.causal_attention(q, k, v, 150, 0.125, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert_lowp_close(out, plain, exact, factor=3.0, floor=1e-6)
    assert_lowp_close(lse, plain_lse, exact_lse, factor=3.0, floor=_lse_floor(exact_lse))


@needs_native
def test_causal_attention_is_deterministic_and_independent_of_threads_and_chunks() -> None:
    """Bit for bit: call to call, 1 or 2 threads, and the prefill whole or in chunks (each query's
    result depends on its position, its q row and the keys it sees only)."""
    t, s = 300, 450
    q, k, v = _inputs(3, 3, t, s, 64, 7)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        out, lse = cpu.causal_attention(q, k, v, 150, 0.125, return_lse=True)
        again, again_lse = cpu.causal_attention(q, k, v, 150, 0.125, return_lse=True)
        torch.set_num_threads(1)
        one, one_lse = cpu.causal_attention(q, k, v, 150, 0.125, return_lse=True)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out, again) and torch.equal(lse, again_lse)
    assert torch.equal(out, one) and torch.equal(lse, one_lse)
    chunks = [(0, 37), (37, 101), (101, 300)]
    parts = [cpu.causal_attention(q[:, a:b], k[:, :150 + b], v[:, :150 + b], 150 + a, 0.125, return_lse=True)
             for a, b in chunks]
    assert torch.equal(torch.cat([p[0] for p in parts]), out)
    assert torch.equal(torch.cat([p[1] for p in parts], dim=1), lse)


@needs_native
def test_causal_attention_empty_inputs() -> None:
    q, k, v = _inputs(1, 2, 4, 1, 16, 0, strided=False)
    out, lse = cpu.causal_attention(q, k[:, :0], v[:, :0], 0, 0.25, return_lse=True)  # no keys at all
    assert torch.equal(out, torch.zeros(4, 2, 16)) and bool((lse == float("-inf")).all())
    out, lse = cpu.causal_attention(q[:, :0], k, v, 0, 0.25, return_lse=True)
    assert out.shape == (0, 2, 16) and lse.shape == (2, 0)


@needs_native
def test_causal_attention_unchecked_matches_checked() -> None:
    q, k, v = _inputs(3, 3, 70, 90, 64, 3)
    assert torch.equal(cpu.causal_attention_unchecked(q, k, v, 20, 0.125), cpu.causal_attention(q, k, v, 20, 0.125))
    # A q whose last dimension is strided is copied first.
    wide = torch.randn(9, 70, 128)
    assert torch.equal(cpu.causal_attention_unchecked(wide[..., ::2], k, v, 20, 0.125),
                       cpu.causal_attention(wide[..., ::2].contiguous(), k, v, 20, 0.125))


@needs_native
def test_causal_attention_rejects_bad_input() -> None:
    q, k, v = _inputs(3, 3, 8, 8, 64, 0, strided=False)
    with pytest.raises(ValueError, match="float32"):
        cpu.causal_attention(q.double(), k, v, 0, 0.125)
    with pytest.raises(ValueError, match="float32"):
        cpu.causal_attention(q, k.to("meta"), v, 0, 0.125)
    with pytest.raises(ValueError, match=r"q \[Hq, T, D\]"):
        cpu.causal_attention(q[0], k, v, 0, 0.125)
    with pytest.raises(ValueError, match=r"k and v must both be \[Hkv, S, 64\]"):
        cpu.causal_attention(q, k, v[:, :4], 0, 0.125)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        cpu.causal_attention(q[:8], k, v, 0, 0.125)
    with pytest.raises(ValueError, match="head dim D=24"):
        cpu.causal_attention(q[..., :24], k[..., :24], v[..., :24], 0, 0.125)
    with pytest.raises(ValueError, match="q_offset"):
        cpu.causal_attention(q, k, v, -1, 0.125)
    with pytest.raises(ValueError, match="scale"):
        cpu.causal_attention(q, k, v, 0, float("nan"))
