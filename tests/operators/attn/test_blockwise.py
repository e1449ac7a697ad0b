"""Blockwise attention vs the dense reference: outputs, lse, key mass, gradients, low precision."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamctx.operators.attn import attention, blockwise, naive
from tests.operators.attn._cases import Case, case_st
from tests.tolerances import assert_close, assert_lowp_close


def _finite(lse: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(lse, neginf=-1e30)


@given(case=case_st(), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_matches_dense_reference(case: Case, dtype: torch.dtype) -> None:
    q, k, v = case.tensors(dtype)
    out, lse, mass = attention(q, k, v, **case.kwargs(), return_lse=True, return_key_mass=True)
    r_out, r_lse, r_mass = naive.attention(q, k, v, **case.kwargs(), return_lse=True, return_key_mass=True)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.shape == q.shape[:3] and mass.shape == (case.b, q.shape[1], case.tk)
    assert_close(out, r_out)
    assert torch.equal(torch.isinf(lse), torch.isinf(r_lse)), "queries with no visible key differ"
    assert_close(_finite(lse), _finite(r_lse), dtype=dtype)
    assert_close(mass, r_mass, dtype=dtype)


@given(case=case_st(max_len=37), checkpoint=st.booleans())
def test_gradients_match_reference(case: Case, checkpoint: bool) -> None:
    q, k, v = (t.requires_grad_() for t in case.tensors(torch.float64, seed=1))
    out, lse = attention(q, k, v, **case.kwargs(), return_lse=True, checkpoint=checkpoint)
    r_out, r_lse = naive.attention(q, k, v, **case.kwargs(), return_lse=True)
    gen = torch.Generator().manual_seed(2)
    g_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    g_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64)
    seen = torch.isfinite(r_lse)

    def loss(o: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
        return (o * g_out).sum() + (l[seen] * g_lse[seen]).sum()

    ours = torch.autograd.grad(loss(out, lse), (q, k, v))
    ref = torch.autograd.grad(loss(r_out, r_lse), (q, k, v))
    for name, a, b in zip("qkv", ours, ref):
        assert_close(a, b, msg=f"d{name}")


def test_checkpoint_gradients_equal_plain_ones() -> None:
    case = Case(b=1, hkv=2, groups=3, tq=53, tk=61, d=8, q_offset=8, causal=True, window=9, sinks=2,
                pattern=None, chunk=8)
    grads = []
    for ckpt in (False, True):
        q, k, v = (t.requires_grad_() for t in case.tensors(torch.float64, seed=3))
        attention(q, k, v, **case.kwargs(), checkpoint=ckpt).square().sum().backward()
        grads.append((q.grad, k.grad, v.grad))
    for a, b in zip(*grads):
        assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@given(case=case_st(patterns_too=False))
@settings(max_examples=10)
def test_low_precision_bounded_by_torch_error(case: Case, dtype: torch.dtype) -> None:
    q, k, v = case.tensors(torch.float32, seed=4)
    ref = naive.attention(q, k, v, **case.kwargs())
    ours = attention(*(t.to(dtype) for t in (q, k, v)), **case.kwargs())
    assert ours.dtype == dtype
    # torch's own low-precision attention under the same mask (repeated K/V, explicit mask)
    mask = naive.visible_mask(case.tq, case.tk, causal=case.causal, q_offset=case.q_offset,
                              window=case.window, sinks=case.sinks)
    g = case.groups
    s = (q.to(dtype) @ k.to(dtype).repeat_interleave(g, 1).transpose(-1, -2)) * case.d ** -0.5
    p = torch.softmax(s.float().masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0).to(dtype)
    torch_lowp = p @ v.to(dtype).repeat_interleave(g, 1)
    assert_lowp_close(ours, torch_lowp, ref, factor=3.0, floor=2e-3)


@pytest.mark.parametrize("tq,tk,q_offset", [(1, 1, 0), (1, 300, 299), (8, 300, 292), (300, 300, 0),
                                            (300, 500, 200), (257, 257, 0)])
def test_plain_causal_paths(tq: int, tk: int, q_offset: int) -> None:
    """Decode, small chunks after a cache and prefill (the fused-kernel fast paths) on larger sizes."""
    case = Case(b=2, hkv=3, groups=3, tq=tq, tk=tk, d=16, q_offset=q_offset, causal=True, window=None,
                sinks=0, pattern=None, chunk=64)
    q, k, v = case.tensors(torch.float32, seed=5)
    out, lse = attention(q, k, v, q_offset=q_offset, return_lse=True)
    r_out, r_lse = naive.attention(q, k, v, q_offset=q_offset, return_lse=True)
    assert_close(out, r_out)
    assert_close(lse, r_lse)


def test_empty_queries_and_keys() -> None:
    q = torch.randn(1, 2, 3, 4)
    k = torch.randn(1, 1, 0, 4)
    out, lse = attention(q, k, k, return_lse=True)
    assert torch.equal(out, torch.zeros_like(q)) and torch.isneginf(lse).all()
    out, lse = attention(q[:, :, :0], torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4), return_lse=True)
    assert out.shape == (1, 2, 0, 4) and lse.shape == (1, 2, 0)


@pytest.mark.parametrize("bad", [dict(window=0), dict(sinks=-1)])
def test_bad_arguments_are_named(bad: dict) -> None:
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match=next(iter(bad))):
        attention(q, q, q, **bad)
    with pytest.raises(ValueError, match="Hq % Hkv"):
        attention(torch.randn(1, 3, 3, 4), q, q)


def test_sliding_window_skips_hidden_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every fused call of a sliding window sees at most w + 2 * chunk keys for at most G * chunk
    queries per batch entry, so the total score work is O(T * w) (not O(T^2)); the blocks far from
    the start are batched, so the number of kernel calls does not grow with T."""
    t, w, chunk, g = 4096, 256, 128, 3
    calls: list[tuple[int, int, int]] = []
    fused = blockwise._fused

    def spy(q, k, v, **kw):
        calls.append((q.shape[0], q.shape[2], k.shape[2]))
        return fused(q, k, v, **kw)

    monkeypatch.setattr(blockwise, "_fused", spy)
    for sinks in (0, 4):
        counts = []
        for length in (t, 2 * t):
            q = torch.randn(1, g, length, 16)
            k = torch.randn(1, 1, length, 16)
            calls.clear()
            attention(q, k, k, window=w, sinks=sinks, chunk_size=chunk)
            assert max(keys for _, _, keys in calls) <= w + 2 * chunk
            # (the sink keys are one call for all queries: [G * T, sinks], blockwise inside the kernel)
            assert max(rows for _, rows, keys in calls if keys > sinks) <= g * chunk
            work = sum(batch * rows * keys for batch, rows, keys in calls)
            assert work <= g * length * (w + 2 * chunk + sinks), f"score work {work} is not O(T * w)"
            counts.append(len(calls))
        assert counts[1] == counts[0], f"kernel calls grow with T ({counts}): the window is not batched"


def test_sliding_window_is_linear_in_length() -> None:
    """T = 16K with w = 256 costs about 4x T = 4K in CPU time (quadratic would be 16x). CPU time of
    this process, not wall time, so other processes on the machine do not decide the outcome."""
    def run(t: int) -> float:
        q = torch.randn(1, 2, t, 16)
        attention(q, q, q, window=256)
        times = []
        for _ in range(3):  # the best of three: a busy machine only ever adds time
            start = time.process_time()
            attention(q, q, q, window=256)
            times.append(time.process_time() - start)
        return min(times)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # no OpenMP spin-waiting inflating CPU time on a shared machine
    try:
        short, long = run(4096), run(16384)
    finally:
        torch.set_num_threads(threads)
    assert long < 8 * short + 0.05, f"T=16K took {long:.3f}s CPU vs T=4K {short:.3f}s"


@given(case=case_st())
@settings(max_examples=15)
def test_portable_kernel_matches_reference(case: Case) -> None:
    """The matmul tile used where no lse-returning kernel serves is exact too, also when it splits
    the queries into row chunks (5 rows here, so most cases split)."""
    def portable(q, k, v, *, scale, is_causal=False, attn_mask=None):
        return blockwise._matmul_attention(q, k, v, scale=scale, is_causal=is_causal, attn_mask=attn_mask, rows=5)

    q, k, v = case.tensors(torch.float64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(blockwise, "_fused", portable)
        out, lse = attention(q, k, v, **case.kwargs(), return_lse=True)
    r_out, r_lse = naive.attention(q, k, v, **case.kwargs(), return_lse=True)
    assert_close(out, r_out)
    assert_close(_finite(lse), _finite(r_lse))


@pytest.mark.gpu
@given(case=case_st(), dtype=st.sampled_from([torch.float32, torch.float64]))
@settings(max_examples=10)
def test_cuda_matches_reference(case: Case, dtype: torch.dtype) -> None:
    q, k, v = case.tensors(dtype, device="cuda")
    out, lse, mass = attention(q, k, v, **case.kwargs(), return_lse=True, return_key_mass=True)
    r_out, r_lse, r_mass = naive.attention(q, k, v, **case.kwargs(), return_lse=True, return_key_mass=True)
    assert out.device.type == "cuda"
    assert_close(out, r_out)
    assert_close(_finite(lse), _finite(r_lse), dtype=dtype)
    assert_close(mass, r_mass, dtype=dtype)


@pytest.mark.gpu
@given(case=case_st(), dtype=st.sampled_from([torch.bfloat16, torch.float16]))
@settings(max_examples=10)
def test_cuda_low_precision_kernels_bounded_by_torch_error(case: Case, dtype: torch.dtype) -> None:
    """fp16/bf16 on CUDA run the fused kernels (flash, memory-efficient with a mask): their error vs
    the fp32 reference is within a small multiple of the plain low-precision reference's own error."""
    q, k, v = case.tensors(torch.float32, device="cuda")
    ref, ref_lse = naive.attention(q, k, v, **case.kwargs(), return_lse=True)
    low = [x.to(dtype) for x in (q, k, v)]
    out, lse = attention(*low, **case.kwargs(), return_lse=True)
    plain, plain_lse = naive.attention(*low, **case.kwargs(), return_lse=True)
    assert out.dtype == dtype
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))  # queries that see no key: lse -inf, out 0
    assert not out[torch.isinf(lse)].any()
    assert_lowp_close(out, plain, ref, factor=3.0, floor=1e-2)
    assert_lowp_close(_finite(lse), _finite(plain_lse), _finite(ref_lse), factor=3.0, floor=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("q_offset,tq,window,sinks", [(0, 3000, 700, 4), (2500, 500, 700, 4), (2999, 1, 700, 4),
                                                      (0, 300, 64, 0), (2, 40, 16, 8), (100, 7, 1, 1)])
def test_cuda_flash_window_matches_reference(q_offset: int, tq: int, window: int, sinks: int) -> None:
    """Windows with sinks on CUDA bf16 (FlashAttention-2's own window): prefill, chunks after a
    cache, decode, queries before the sinks end; error bounded like the plain bf16 reference's."""
    g = torch.Generator(device="cuda").manual_seed(tq + window)
    q = torch.randn(1, 6, tq, 64, device="cuda", generator=g)
    k, v = (torch.randn(1, 2, q_offset + tq, 64, device="cuda", generator=g) for _ in range(2))
    kw = dict(q_offset=q_offset, window=window, sinks=sinks)
    ref, ref_lse = naive.attention(q, k, v, **kw, return_lse=True)
    low = [x.bfloat16() for x in (q, k, v)]
    out, lse = attention(*low, **kw, return_lse=True)
    plain, plain_lse = naive.attention(*low, **kw, return_lse=True)
    assert_lowp_close(out, plain, ref, factor=3.0, floor=1e-2)
    assert_lowp_close(lse, plain_lse, ref_lse, factor=3.0, floor=1e-2)


@pytest.mark.gpu
def test_cuda_long_causal_memory_is_linear() -> None:
    """32K tokens causal in bf16: peak memory stays near the inputs (no [T, T] scores), and the
    result equals torch SDPA's within bf16 tolerance."""
    t = 32768
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 9, t, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(1, 3, t, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = attention(q, k, v, causal=True)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 8 * q.numel() * q.element_size(), f"{extra / 2**20:.0f} MiB beyond the inputs"
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert_close(out, want)


@given(tq=st.integers(60, 400), cache=st.sampled_from([0, 1, 37, 300]), window=st.integers(1, 90),
       sinks=st.sampled_from([0, 1, 5, 64]), groups=st.sampled_from([1, 3]), b=st.sampled_from([1, 2]),
       chunk=st.sampled_from([None, 8, 32]), causal=st.booleans())
@settings(max_examples=20)
def test_batched_window_matches_reference(tq: int, cache: int, window: int, sinks: int, groups: int, b: int,
                                          chunk: int | None, causal: bool) -> None:
    """Long enough sequences that the sliding window runs batched (overlapping key views, one shared
    mask, sinks merged by lse): out, lse and gradients equal the dense reference."""
    gen = torch.Generator().manual_seed(tq * 7 + window)
    q = torch.randn(b, 2 * groups, tq, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, 2, cache + tq, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, 2, cache + tq, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    kw = dict(q_offset=cache, window=window, sinks=sinks, causal=causal)
    out, lse = attention(q, k, v, **kw, chunk_size=chunk, return_lse=True)
    r_out, r_lse = naive.attention(q, k, v, **kw, return_lse=True)
    assert_close(out, r_out)
    assert_close(lse, r_lse)
    g_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((out * g_out).sum() + lse.sum(), (q, k, v))
    r_grads = torch.autograd.grad((r_out * g_out).sum() + r_lse.sum(), (q, k, v))
    for got, want in zip(grads, r_grads):
        assert_close(got, want)
