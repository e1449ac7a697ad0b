"""The native prefill SGEMM (`cpu.gemm_nt`, `cpu.gemm_nt_swiglu`) against plain fp64 references.

Shapes cover the register tile's edges (12 rows by 32 packed columns, 16 for SwiGLU; summation
blocks of 192 in k); every fused step is checked to give the same bits as the separate kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamctx.operators import cpu
from streamctx.operators.cpu import naive
from tests.tolerances import assert_lowp_close

needs_native = pytest.mark.skipif(not cpu.available(), reason=f"native kernels unavailable: {cpu.why_unavailable()}")

EPS = 1e-5
ROWS = st.integers(1, 200)
COLS = st.sampled_from([1, 2, 15, 16, 17, 31, 32, 33, 47, 64, 100, 129])
DEPTH = st.sampled_from([1, 2, 7, 16, 17, 191, 192, 193, 385, 577])


def _inputs(m: int, n: int, k: int, seed: int, strided: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [m, k] (a view with a row stride when `strided`), w [n, k] scaled so outputs are O(1),
    and a norm weight [k]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k + 5 if strided else k, generator=g)
    x = x[:, 3:k + 3] if strided else x
    w = torch.randn(n, k, generator=g) / k ** 0.5
    return x, w, torch.rand(k, generator=g) + 0.5


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.double()


@needs_native
@given(m=ROWS, n=COLS, k=DEPTH, bias=st.booleans(), norm=st.booleans(),
       residual=st.sampled_from(["none", "separate", "out"]), strided=st.booleans(), seed=st.integers(0, 2**16))
@settings(max_examples=80, deadline=None)
def test_gemm_nt_matches_fp64(m: int, n: int, k: int, bias: bool, norm: bool, residual: str, strided: bool,
                              seed: int) -> None:
    x, w, nw = _inputs(m, n, k, seed, strided)
    b = torch.randn(n) if bias else None
    nw = nw if norm else None
    r = torch.randn(m, n) if residual != "none" else None
    exact = naive.gemm_nt(x.double(), w.double(), _f64(b), norm_weight=_f64(nw), eps=EPS, residual=_f64(r))
    lowp = naive.gemm_nt(x, w, b, norm_weight=nw, eps=EPS, residual=r)
    if residual == "out":  # y += ...: the residual is the output
        out = r.clone()
        got = cpu.gemm_nt(x, w, b, norm_weight=nw, eps=EPS, residual=out, out=out)
        assert got.data_ptr() == out.data_ptr()
    else:
        got = cpu.gemm_nt(x, w, b, norm_weight=nw, eps=EPS, residual=r)
    assert got.shape == (m, n) and got.dtype == torch.float32
    # No worse than twice torch's own fp32 sequence (flash-attention's rule), plus a floor of ~4 ulp
    # of the largest output (for N <= 2 torch takes a gemv that sums more accurately).
    assert_lowp_close(got, lowp, exact, factor=2.0, floor=5e-7 * (1 + exact.abs().max().item()))


@needs_native
@given(m=ROWS, n=COLS, k=DEPTH, norm=st.booleans(), strided=st.booleans(), seed=st.integers(0, 2**16))
@settings(max_examples=50, deadline=None)
def test_gemm_nt_swiglu_matches_fp64(m: int, n: int, k: int, norm: bool, strided: bool, seed: int) -> None:
    x, wg, nw = _inputs(m, n, k, seed, strided)
    wu = torch.randn(n, k, generator=torch.Generator().manual_seed(seed + 1)) / k ** 0.5
    nw = nw if norm else None
    exact = naive.gemm_nt_swiglu(x.double(), wg.double(), wu.double(), norm_weight=_f64(nw), eps=EPS)
    lowp = naive.gemm_nt_swiglu(x, wg, wu, norm_weight=nw, eps=EPS)
    got = cpu.gemm_nt_swiglu(x, wg, wu, norm_weight=nw, eps=EPS)
    assert got.shape == (m, n) and got.dtype == torch.float32
    assert_lowp_close(got, lowp, exact, factor=2.0, floor=5e-7 * (1 + exact.abs().max().item()))


@needs_native
@pytest.mark.parametrize("m", [1, 12, 37, 130])
@pytest.mark.parametrize("n", [17, 100])  # 2 threads split the rows (one strip), the strips (four)
def test_rows_do_not_depend_on_the_batch_or_threads(m: int, n: int) -> None:
    """Each row has the same bits alone, in any batch, at 1 or 2 threads, with every fusion."""
    x, w, nw = _inputs(m, n, 600, m, strided=False)
    wu = torch.randn(n, 600) / 600 ** 0.5
    b, r = torch.randn(n), torch.randn(m, n)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            results.append((cpu.gemm_nt(x, w, b, norm_weight=nw, residual=r),
                            cpu.gemm_nt_swiglu(x, w, wu, norm_weight=nw)))
    finally:
        torch.set_num_threads(before)
    (plain, swiglu), (plain1, swiglu1) = results
    assert torch.equal(plain, plain1) and torch.equal(swiglu, swiglu1)
    assert torch.equal(plain, cpu.gemm_nt(x, w, b, norm_weight=nw, residual=r))  # again: the same bits
    alone = [(cpu.gemm_nt(x[i:i + 1], w, b, norm_weight=nw, residual=r[i:i + 1]),
              cpu.gemm_nt_swiglu(x[i:i + 1], w, wu, norm_weight=nw)) for i in range(m)]
    assert torch.equal(plain, torch.cat([a for a, _ in alone]))
    assert torch.equal(swiglu, torch.cat([s for _, s in alone]))


@needs_native
def test_fused_steps_have_the_bits_of_the_separate_kernels() -> None:
    """The norm folded into the packing, the residual and bias in the epilogue and the SwiGLU
    pair are exactly `rms_norm`, `+` and `silu_mul` around the plain product."""
    x, w, nw = _inputs(45, 300, 576, 7, strided=True)
    wu = torch.randn(300, 576) / 24
    b, r = torch.randn(300), torch.randn(45, 300)
    h = cpu.rms_norm(x, nw, EPS)
    assert torch.equal(cpu.gemm_nt(x, w, norm_weight=nw, eps=EPS), cpu.gemm_nt(h, w))
    assert torch.equal(cpu.gemm_nt(h, w, b, residual=r), r + cpu.gemm_nt(h, w, b))
    assert torch.equal(cpu.gemm_nt_swiglu(x, w, wu, norm_weight=nw, eps=EPS),
                       cpu.silu_mul(cpu.gemm_nt(h, w), cpu.gemm_nt(h, wu)))


@needs_native
def test_out_with_a_row_stride_and_empty_shapes() -> None:
    x, w, _ = _inputs(20, 33, 40, 3, strided=False)
    big = torch.zeros(20, 40)
    got = cpu.gemm_nt(x, w, out=big[:, 2:35])
    assert got.data_ptr() == big[:, 2:35].data_ptr()
    assert torch.equal(big[:, 2:35], cpu.gemm_nt(x, w))
    assert not big[:, :2].any() and not big[:, 35:].any()
    swig = torch.zeros(20, 40)
    cpu.gemm_nt_swiglu(x, w, w, out=swig[:, 5:38])
    assert torch.equal(swig[:, 5:38], cpu.gemm_nt_swiglu(x, w, w)) and not swig[:, :5].any()
    assert cpu.gemm_nt(torch.randn(0, 40), w).shape == (0, 33)
    assert cpu.gemm_nt(x, torch.randn(0, 40)).shape == (20, 0)
    assert cpu.gemm_nt_swiglu(torch.randn(0, 40), w, w).shape == (0, 33)


@needs_native
def test_gemm_nt_rejects_bad_input() -> None:
    x, w = torch.randn(4, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="float32"):
        cpu.gemm_nt(x.double(), w)
    with pytest.raises(ValueError, match=r"x \[M, K\]"):
        cpu.gemm_nt(x, torch.randn(5, 7))
    with pytest.raises(ValueError, match="K >= 1"):
        cpu.gemm_nt(torch.randn(4, 0), torch.randn(5, 0))
    with pytest.raises(ValueError, match="bias"):
        cpu.gemm_nt(x, w, torch.randn(4))
    with pytest.raises(ValueError, match="norm_weight"):
        cpu.gemm_nt(x, w, norm_weight=torch.randn(5))
    with pytest.raises(ValueError, match="residual"):
        cpu.gemm_nt(x, w, residual=torch.randn(5, 4))
    with pytest.raises(ValueError, match="out must be"):
        cpu.gemm_nt(x, w, out=torch.empty(4, 4))
    with pytest.raises(ValueError, match="unit column stride"):
        cpu.gemm_nt(x, w, out=torch.empty(5, 4).t())
    with pytest.raises(ValueError, match="overlap x"):
        buf = torch.randn(4, 13)
        cpu.gemm_nt(buf[:, :8], w, out=buf[:, 8:])
    with pytest.raises(ValueError, match="partly overlap"):
        buf = torch.randn(5, 5)
        cpu.gemm_nt(x, w, residual=buf[:4], out=buf[1:])
    with pytest.raises(ValueError, match="float32"):
        cpu.gemm_nt_swiglu(x, w, w.half())
    with pytest.raises(ValueError, match="differ in shape"):
        cpu.gemm_nt_swiglu(x, w, torch.randn(6, 8))
    with pytest.raises(ValueError, match=r"w_up \[N, K\]"):
        cpu.gemm_nt_swiglu(x, w, torch.randn(5, 9))


def test_unavailable_library_raises() -> None:
    """Without the native library the checked entry points say why instead of failing in ctypes."""
    code = ("import torch; from streamctx.operators import cpu\n"
            "try:\n    cpu.gemm_nt(torch.randn(2, 3), torch.randn(4, 3))\n"
            "except RuntimeError as e:\n    print('raised', e)")
    env = {**os.environ, "STREAMCTX_NATIVE_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("raised") and "STREAMCTX_NATIVE_KERNELS=0" in out
