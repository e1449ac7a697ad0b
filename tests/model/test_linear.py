"""`streamctx.model.linear.linear` (faster shapes of small CPU products) against `F.linear`, its reference."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from streamctx.model import linear as linear_mod
from streamctx.model.linear import CHUNKS, COLUMN_MAX_ROWS, MAX_ROWS, choose_path, linear, split_linear
from streamctx.operators import cpu
from streamctx.operators.cpu import native_kernels
from tests.tolerances import assert_close, assert_lowp_close


@pytest.fixture
def torch_paths() -> Iterator[None]:
    """The torch paths `linear` takes where the native kernels are not built."""
    with native_kernels(False):
        yield


@pytest.fixture(scope="module", params=["native", "torch"])
def paths(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run with the native kernels (where built) and with the torch paths they replace."""
    if request.param == "native" and not cpu.available():
        pytest.skip(f"native kernels unavailable: {cpu.why_unavailable()}")
    with native_kernels(request.param == "native"):
        yield request.param


@pytest.fixture(scope="module")
def two_threads() -> Iterator[None]:
    """Two torch threads, so the chunks really run in parallel (any machine can be told 2)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _inputs(m: int, k: int, n: int, seed: int, strided: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(m, 2 * k if strided else k, generator=g)
    return (x[:, ::2] if strided else x), w  # a strided x: [M, K] with column stride 2


@given(m=st.sampled_from([1, 2, 3, 5, 7, 8, 13, 16, 31, 64, 65, 97]),
       k=st.sampled_from([1, 7, 64, 97, 576]),
       n=st.sampled_from([1, 17, 31, 32, 127, 128, 129, 960, 1001]),
       bias=st.booleans(), strided=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_matches_f_linear(two_threads: None, paths: str, m: int, k: int, n: int, bias: bool, strided: bool,
                                 seed: int) -> None:
    x, w = _inputs(m, k, n, seed, strided)
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1)) if bias else None
    out = linear(x, w, b)
    assert out.shape == (m, n) and out.dtype == torch.float32
    plain = F.linear(x, w, b)
    # Another summation order: fp32 rounding grows with the K terms summed (about sqrt(K) for
    # random terms), so the fp32 tolerance is scaled by sqrt(K).
    assert_close(out, plain, scale=max(1.0, k ** 0.5))
    # Against fp64: no worse than F.linear's own fp32 error (flash-attention's rule).
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert_lowp_close(out, plain, exact, factor=3.0, floor=2e-6 * k ** 0.5)


@pytest.mark.parametrize("m", [1, 3, COLUMN_MAX_ROWS + 1, MAX_ROWS])
@pytest.mark.parametrize("n", [960, 1001])  # 1001: chunks plus a remainder of rows
def test_fast_paths_are_taken(two_threads: None, torch_paths: None, monkeypatch: pytest.MonkeyPatch, m: int,
                              n: int) -> None:
    """The torch fast paths (the native one: tests/operators/cpu) really run (F.linear only for a chunked product's remainder rows) and equal
    F.linear; with them switched off the whole product is one F.linear call."""
    calls: list[tuple[int, ...]] = []
    real = F.linear

    def spy(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        calls.append(tuple(w.shape))
        return real(x, w, b)

    x, w = _inputs(m, 96, n, 0, strided=False)
    expected = real(x, w)
    path, chunks = choose_path(m, n, 2)
    assert path == ("column" if m <= COLUMN_MAX_ROWS else "chunked")
    monkeypatch.setattr(linear_mod.F, "linear", spy)
    out = linear(x, w)
    assert calls == ([] if path == "column" or n % chunks == 0 else [(n % chunks, 96)])
    assert out.is_contiguous()
    assert_close(out, expected)
    calls.clear()
    with split_linear(False):
        off = linear(x, w)
    assert calls == [(n, 96)]
    assert torch.equal(off, expected)


def test_path_choice() -> None:
    with native_kernels(True):
        native = cpu.available()
        assert choose_path(1, 49152, 1) == (("native", 0) if native else ("column", 0))
        assert choose_path(MAX_ROWS, 576, 2) == (("native", 0) if native else ("chunked", CHUNKS))
        assert choose_path(MAX_ROWS + 1, 576, 2) == ("plain", 0)



def test_torch_path_choice(torch_paths: None) -> None:
    assert choose_path(1, 49152, 1) == ("column", 0)  # one row: W @ x^T at any thread count
    assert choose_path(COLUMN_MAX_ROWS, 7, 2) == ("column", 0)
    assert choose_path(COLUMN_MAX_ROWS + 1, 576, 2) == ("chunked", CHUNKS)
    assert choose_path(MAX_ROWS, 49152, 16) == ("chunked", CHUNKS)  # not derived from the thread count
    assert choose_path(MAX_ROWS + 1, 576, 2) == ("plain", 0)  # larger products: F.linear's own threading
    assert choose_path(8, 576, 1) == ("plain", 0)  # one thread: nothing to spread the chunks over
    assert choose_path(8, 40, 2) == ("chunked", 2) and choose_path(8, 31, 2) == ("plain", 0)  # >= 16 rows a chunk
    assert choose_path(0, 576, 2) == ("plain", 0)
    with split_linear(False):
        assert choose_path(1, 576, 2) == ("plain", 0)


@given(m=st.sampled_from([1, 2, 3, 5, 8, 17, 64]), k=st.sampled_from([7, 32, 97, 576]),
       n=st.sampled_from([32, 100, 129, 1001, 1536]), seed=st.integers(0, 2**16))
def test_same_bits_at_two_and_four_threads(paths: str, m: int, k: int, n: int, seed: int) -> None:
    """Any thread count that takes the same path gives the same bits (the chunk count is fixed)."""
    x, w = _inputs(m, k, n, seed, strided=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = linear(x, w)
        torch.set_num_threads(4)
        four = linear(x, w)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(two, four)


def test_plain_path_is_f_linear_bit_for_bit(two_threads: None) -> None:
    """Larger products, other dtypes and anything autograd must see run F.linear itself."""
    x, w = _inputs(MAX_ROWS + 1, 64, 128, 1, strided=False)
    assert torch.equal(linear(x, w), F.linear(x, w))
    xd, wd = x[:2].double(), w.double()
    assert torch.equal(linear(xd, wd), F.linear(xd, wd))
    wg = w.clone().requires_grad_()
    y = linear(x[:1], wg)
    assert y.requires_grad and torch.equal(y, F.linear(x[:1], wg))
    y.sum().backward()
    assert wg.grad is not None and torch.equal(wg.grad, x[:1].expand(128, 64))
    x3 = torch.randn(2, 3, 64)
    assert torch.equal(linear(x3, w), F.linear(x3, w))


def test_inference_mode_and_transposed_weight(two_threads: None) -> None:
    x, w = _inputs(3, 64, 256, 2, strided=False)
    with torch.inference_mode():
        assert_close(linear(x, w), F.linear(x, w))
    wt = w.t().contiguous().t()  # non-contiguous weight: the plain path, no hidden copy
    assert torch.equal(linear(x, wt), F.linear(x, wt))
