"""Products over weights packed once (`cpu.pack_weights`, `cpu.pack_swiglu`, `cpu.gemm_packed`).

A packed product has the bits of the unpacked `gemm_nt` / `gemm_nt_swiglu` at every number of rows
(decode's few rows split the strips between threads, prefill's many take the register tiles of
`gemm_nt`), and a row's bits do not depend on the rows beside it: what batched decode needs to
equal one session at a time.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamctx.operators import cpu
from streamctx.operators.cpu.memory import huge_page_empty

needs_native = pytest.mark.skipif(not cpu.available(), reason=f"native kernels unavailable: {cpu.why_unavailable()}")

EPS = 1e-5


def _weights(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) / k ** 0.5, torch.randn(n, k, generator=g) / k ** 0.5,
            torch.rand(k, generator=g) + 0.5)


@needs_native
@given(m=st.integers(1, 140), n=st.sampled_from([1, 15, 16, 17, 32, 33, 100]),
       k=st.sampled_from([1, 17, 192, 193, 577]), bias=st.booleans(), norm=st.booleans(),
       residual=st.sampled_from(["none", "separate", "out"]), seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_packed_product_has_the_bits_of_gemm_nt(m: int, n: int, k: int, bias: bool, norm: bool, residual: str,
                                                seed: int) -> None:
    w, _, nw = _weights(n, k, seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1))
    b = torch.randn(n) if bias else None
    nw = nw if norm else None
    r = torch.randn(m, n) if residual != "none" else None
    want = cpu.gemm_nt(x, w, b, norm_weight=nw, eps=EPS, residual=r)
    packed = cpu.pack_weights(w)
    if residual == "out":
        out = r.clone()
        got = cpu.gemm_packed(x, packed, b, norm_weight=nw, eps=EPS, residual=out, out=out)
        assert got.data_ptr() == out.data_ptr()
    else:
        got = cpu.gemm_packed(x, packed, b, norm_weight=nw, eps=EPS, residual=r)
    assert torch.equal(got, want)
    i = m // 2  # one row alone: the same bits as inside the batch
    alone = cpu.gemm_packed(x[i:i + 1], packed, b, norm_weight=nw, eps=EPS, residual=None if r is None else r[i:i + 1])
    assert torch.equal(alone[0], got[i])


@needs_native
@given(m=st.integers(1, 100), n=st.sampled_from([1, 15, 16, 17, 48]), k=st.sampled_from([1, 16, 193, 577]),
       norm=st.booleans(), seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_packed_swiglu_has_the_bits_of_gemm_nt_swiglu(m: int, n: int, k: int, norm: bool, seed: int) -> None:
    wg, wu, nw = _weights(n, k, seed)
    nw = nw if norm else None
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1))
    packed = cpu.pack_swiglu(wg, wu)
    got = cpu.gemm_packed(x, packed, norm_weight=nw, eps=EPS)
    assert torch.equal(got, cpu.gemm_nt_swiglu(x, wg, wu, norm_weight=nw, eps=EPS))
    assert torch.equal(cpu.gemm_packed(x[-1:], packed, norm_weight=nw, eps=EPS)[0], got[-1])


@needs_native
def test_packed_products_do_not_depend_on_the_thread_count() -> None:
    """The strips split differently between 1 and 3 threads; every output keeps its bits."""
    code = """
import torch
from streamctx.operators import cpu
g = torch.Generator().manual_seed(3)
w = torch.randn(200, 300, generator=g); x = torch.randn(20, 300, generator=g)
p = cpu.pack_weights(w)
outs = []
for t in (1, 3):
    torch.set_num_threads(t)
    outs.append(cpu.gemm_packed(x, p))
assert torch.equal(outs[0], outs[1])
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@needs_native
def test_pack_round_trips_and_reads_rows() -> None:
    w, u, _ = _weights(77, 40, 0)
    p = cpu.pack_weights(w)
    assert p.strips.shape == (3, 40, 32) and p.strips.data_ptr() % 64 == 0 and p.nbytes == 3 * 40 * 32 * 4
    assert torch.equal(p.unpack(), w)
    ids = torch.tensor([0, 31, 32, 76, 5])
    assert torch.equal(p.rows(ids), w[ids])  # a tied embedding's lookup from the packed lm_head
    pair = cpu.pack_swiglu(w, u)
    assert pair.strips.shape == (5, 40, 32)
    gate, up = pair.unpack()
    assert torch.equal(gate, w) and torch.equal(up, u)
    with pytest.raises(ValueError, match="plain packed weight"):
        pair.rows(ids)


@needs_native
def test_pack_into_a_given_buffer() -> None:
    w, _, _ = _weights(40, 24, 1)
    buf = cpu.huge_page_floats(cpu.packed_floats(40, 24) + 64)
    p = cpu.pack_weights(w, out=buf[64:])  # 256 bytes in: still 64-byte aligned
    assert p.strips.data_ptr() == buf[64:].data_ptr() and torch.equal(p.unpack(), w)
    with pytest.raises(ValueError, match="64-byte aligned"):
        cpu.pack_weights(w, out=buf[1:cpu.packed_floats(40, 24) + 1])
    with pytest.raises(ValueError, match="contiguous"):
        cpu.pack_weights(w, out=buf[:10])


@needs_native
def test_packed_product_errors_are_clear() -> None:
    w, u, _ = _weights(16, 8, 2)
    with pytest.raises(TypeError, match="PackedWeight"):
        cpu.gemm_packed(torch.randn(2, 8), w)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"x \[M, 8\]"):
        cpu.gemm_packed(torch.randn(2, 9), cpu.pack_weights(w))
    with pytest.raises(ValueError, match="no bias or residual"):
        cpu.gemm_packed(torch.randn(2, 8), cpu.pack_swiglu(w, u), torch.randn(16))
    with pytest.raises(ValueError, match="differ in shape"):
        cpu.pack_swiglu(w, u[:8])
    with pytest.raises(ValueError, match="float32 CPU"):
        cpu.pack_weights(w.double())


def test_huge_page_buffers_keep_their_values_and_alignment() -> None:
    big = huge_page_empty((3, 1 << 20), torch.float32, min_bytes=0)  # 12 MB: its interior advised
    assert big.shape == (3, 1 << 20) and big.is_contiguous() and big.data_ptr() % (2 << 20) == 0
    big.fill_(1.5)
    small = huge_page_empty((5, 7), torch.int64)
    assert small.shape == (5, 7) and small.dtype == torch.int64
    src = torch.arange(1 << 20, dtype=torch.float32)
    cpu.release_pages(src)  # handed back to the kernel; the values stay
    assert torch.equal(src, torch.arange(1 << 20, dtype=torch.float32)) and bool((big == 1.5).all())
