"""Native CPU kernels (`streamctx.operators.cpu`) against their plain references in fp64.

The kernels exist where a C compiler and AVX-512 do (the dev and CI machines); elsewhere every
caller keeps its torch path, which `test_fallback_when_switched_off` checks on any machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamctx.operators import cpu
from streamctx.operators.cpu import naive
from tests.tolerances import assert_lowp_close

needs_native = pytest.mark.skipif(not cpu.available(), reason=f"native kernels unavailable: {cpu.why_unavailable()}")


@pytest.fixture
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


# -- matmul_nt ------------------------------------------------------------------------------------

@needs_native
@given(m=st.integers(1, 70), n=st.sampled_from([1, 3, 4, 5, 17, 64, 129, 960]),
       k=st.sampled_from([1, 7, 16, 33, 576, 1000]), bias=st.booleans(), strided=st.booleans(),
       seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_matmul_nt_matches_fp64(m: int, n: int, k: int, bias: bool, strided: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(m, 2 * k if strided else k, generator=g)
    x = x[:, ::2] if strided else x
    b = torch.randn(n, generator=g) if bias else None
    out = cpu.matmul_nt(x, w, b)
    exact = naive.matmul_nt(x.double(), w.double(), None if b is None else b.double())
    # No worse than torch's own fp32 product (flash-attention's rule), plus a floor for sums near 0.
    assert_lowp_close(out, naive.matmul_nt(x, w, b), exact, factor=2.0, floor=2e-6 * k ** 0.5)


@needs_native
@pytest.mark.parametrize("m", [2, 5, 16, 64])
def test_matmul_nt_rows_do_not_depend_on_the_batch_or_threads(m: int) -> None:
    """Each row has the same bits alone, in any batch, at 1 or 2 threads: batched decode equals
    sessions one at a time exactly."""
    g = torch.Generator().manual_seed(m)
    x, w, b = torch.randn(m, 576, generator=g), torch.randn(1001, 576, generator=g), torch.randn(1001, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        batched = cpu.matmul_nt(x, w, b)
        torch.set_num_threads(1)
        one_thread = cpu.matmul_nt(x, w, b)
    finally:
        torch.set_num_threads(before)
    alone = torch.cat([cpu.matmul_nt(x[i:i + 1], w, b) for i in range(m)])
    assert torch.equal(batched, alone)
    assert torch.equal(batched, one_thread)


@needs_native
def test_matmul_nt_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="float32"):
        cpu.matmul_nt(torch.randn(2, 3, dtype=torch.float64), torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"x \[M, K\]"):
        cpu.matmul_nt(torch.randn(2, 3), torch.randn(4, 5))
    with pytest.raises(ValueError, match="bias"):
        cpu.matmul_nt(torch.randn(2, 3), torch.randn(4, 3), torch.randn(5))


# -- rms_norm, silu_mul ----------------------------------------------------------------------------

@needs_native
@given(m=st.integers(1, 20), h=st.sampled_from([1, 5, 16, 33, 576]), strided=st.booleans(),
       seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_rms_norm_matches_fp64(m: int, h: int, strided: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 2 * h if strided else h, generator=g) * 3
    x = x[:, ::2] if strided else x
    w = torch.randn(h, generator=g)
    out = cpu.rms_norm(x, w, 1e-5)
    exact = naive.rms_norm(x.double(), w.double(), 1e-5)
    assert_lowp_close(out, torch.nn.functional.rms_norm(x, (h,), w, 1e-5), exact, factor=3.0, floor=1e-6)
    assert torch.equal(torch.cat([cpu.rms_norm(x[i:i + 1], w, 1e-5) for i in range(m)]), out)


@needs_native
def test_silu_mul_matches_fp64() -> None:
    g = torch.Generator().manual_seed(0)
    gate = torch.cat([torch.randn(3000, generator=g) * 4, torch.tensor([-200.0, -90.0, -20.0, 0.0, 20.0, 90.0, 200.0])])
    up = torch.randn(gate.shape, generator=g)
    out = cpu.silu_mul(gate, up)
    exact = naive.silu_mul(gate.double(), up.double())
    assert_lowp_close(out, torch.nn.functional.silu(gate) * up, exact, factor=3.0, floor=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        cpu.silu_mul(gate, up[:-1])


# -- paged_decode_attention -----------------------------------------------------------------------

def _paged_case(seed: int, lengths: list[int], hkv: int, group: int, d: int, bs: int
                ) -> tuple[torch.Tensor, ...]:
    """A pool with more blocks than needed, each session's table a random (fragmented) draw."""
    g = torch.Generator().manual_seed(seed)
    need = [(n + bs - 1) // bs for n in lengths]
    nblocks = sum(need) + 3
    k_pool = torch.randn(hkv, nblocks * bs, d, generator=g)
    v_pool = torch.randn(hkv, nblocks * bs, d, generator=g)
    order = torch.randperm(nblocks, generator=g).to(torch.int32)
    offsets = torch.tensor([0] + need).cumsum(0)
    q = torch.randn(len(lengths), hkv * group, d, generator=g) * 2  # peaked and flat rows alike
    return q, k_pool, v_pool, order[:sum(need)].contiguous(), offsets, torch.tensor(lengths)


@needs_native
@given(lengths=st.lists(st.one_of(st.integers(1, 300), st.integers(500, 1300)), min_size=1, max_size=5),
       hkv=st.integers(1, 3),
       group=st.sampled_from([1, 3, 4, 7]), d=st.sampled_from([16, 64, 128]), bs=st.sampled_from([1, 16, 64]),
       seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_paged_decode_attention_matches_fp64(lengths: list[int], hkv: int, group: int, d: int, bs: int,
                                             seed: int) -> None:
    q, kp, vp, blocks, offsets, lens = _paged_case(seed, lengths, hkv, group, d, bs)
    scale = d ** -0.5
    out, lse = cpu.paged_decode_attention(q, kp, vp, blocks, offsets, lens, bs, scale, return_lse=True)
    ref, ref_lse = naive.paged_decode_attention(q.double(), kp.double(), vp.double(), blocks, offsets, lens, bs,
                                                scale, return_lse=True)
    plain, plain_lse = naive.paged_decode_attention(q, kp, vp, blocks, offsets, lens, bs, scale, return_lse=True)
    assert_lowp_close(out, plain, ref, factor=3.0, floor=1e-6)
    assert_lowp_close(lse, plain_lse, ref_lse, factor=3.0, floor=1e-6)


@needs_native
def test_paged_decode_attention_sessions_do_not_depend_on_the_batch(two_threads: None) -> None:
    # 1100 and 513 keys: split into 512-key spans that run apart and merge through their lse.
    q, kp, vp, blocks, offsets, lens = _paged_case(7, [1, 65, 1100, 64, 513], 3, 3, 64, 16)
    batched = cpu.paged_decode_attention(q, kp, vp, blocks, offsets, lens, 16, 0.125)
    for i in range(len(lens)):
        own = blocks[int(offsets[i]):int(offsets[i + 1])]
        alone = cpu.paged_decode_attention(q[i:i + 1], kp, vp, own, torch.tensor([0, own.numel()]), lens[i:i + 1],
                                           16, 0.125)
        assert torch.equal(alone[0], batched[i])


@needs_native
def test_paged_decode_attention_rejects_bad_tables() -> None:
    q, kp, vp, blocks, offsets, lens = _paged_case(0, [40, 10], 2, 2, 16, 16)
    with pytest.raises(ValueError, match="enough blocks"):
        cpu.paged_decode_attention(q, kp, vp, blocks, offsets, lens + 100, 16, 0.25)
    with pytest.raises(ValueError, match="outside the pool"):
        cpu.paged_decode_attention(q, kp, vp, blocks + 1000, offsets, lens, 16, 0.25)
    with pytest.raises(ValueError, match="int32"):
        cpu.paged_decode_attention(q, kp, vp, blocks.long(), offsets, lens, 16, 0.25)
    with pytest.raises(ValueError, match="unsupported heads"):
        cpu.paged_decode_attention(q[..., :8], kp[..., :8], vp[..., :8], blocks, offsets, lens, 16, 0.25)


# -- build and switch -----------------------------------------------------------------------------

def test_fallback_when_switched_off(tmp_path: os.PathLike[str]) -> None:
    """`STREAMCTX_NATIVE_KERNELS=0` (or a machine without the kernels) leaves every caller on its
    torch path: `linear` then never takes the native path, on any machine."""
    code = ("from streamctx.operators import cpu; from streamctx.model.linear import choose_path; "
            "print(cpu.available(), cpu.why_unavailable(), choose_path(1, 576, 2)[0])")
    env = {**os.environ, "STREAMCTX_NATIVE_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == "False" and "STREAMCTX_NATIVE_KERNELS=0" in out and out.split()[-1] == "column"


@needs_native
def test_built_once_into_the_cache(tmp_path: os.PathLike[str]) -> None:
    """A fresh cache folder gets one library; a second process reuses it without building."""
    code = "from streamctx.operators import cpu; assert cpu.available(), cpu.why_unavailable()"
    env = {**os.environ, "STREAMCTX_KERNEL_CACHE": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    libs = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".so")
    stamp = [(tmp_path / n).stat().st_mtime_ns for n in libs]
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    assert len(libs) == 1 and [(tmp_path / n).stat().st_mtime_ns for n in libs] == stamp
