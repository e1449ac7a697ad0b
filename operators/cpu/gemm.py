"""Tensor-level entry points to the native prefill SGEMM (`gemm.c`), fp32, with fused epilogues.

`gemm_nt` is `residual + F.linear(rms_norm(x), weight, bias)` with every step but the product
optional, in one pass: the RMSNorm is folded into the packing of `x` and the bias and residual
into the product's epilogue. `gemm_nt_swiglu` is the SwiGLU MLP's first half,
`silu(h @ w_gate^T) * (h @ w_up^T)` (h = x, or its RMSNorm), with the two products in one tile.
Weights a model multiplies by again and again are packed once (`pack_weights`, `pack_swiglu`:
strips of 32 columns, `[K][32]` each, on huge pages where the kernel gives them) and read in place
by `gemm_packed`, at any number of rows: for the few rows of decode each thread streams its own
strips, one sequential read. A packed product has the bits of the unpacked one.

Each output is summed in an order that depends on K only (blocks of at most 192, each from zero,
added in order; then the bias, then the residual), so a row's bits do not depend on M, on the
other rows or on the thread count; the fused norm and SwiGLU have the same bits as `rms_norm` and
`silu_mul` followed by the plain product. The plain references are in `naive`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streamctx.operators.cpu import native
from streamctx.operators.cpu.kernels import _check_cpu_f32, _require
from streamctx.operators.cpu.memory import huge_page_floats

def _operands(x: torch.Tensor, n: int, out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x with unit column stride, and `out` or a new `[M, n]` result."""
    if x.stride(1) != 1 and x.shape[1] > 1:
        x = x.contiguous()
    return x, torch.empty(x.shape[0], n, dtype=torch.float32) if out is None else out


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes [begin, end) a 2-D tensor's elements lie in."""
    begin = t.data_ptr()
    return begin, begin + (((t.shape[0] - 1) * t.stride(0) + (t.shape[1] - 1) * t.stride(1)) + 1) * t.element_size()


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0:
        return False
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1


def _check_rc(rc: int) -> None:
    if rc == -1:
        raise MemoryError("gemm_nt: could not allocate its packing buffers")
    if rc != 0:
        raise RuntimeError(f"gemm_nt: native kernel failed ({rc})")


def _check_common(x: torch.Tensor, weights: list[tuple[str, torch.Tensor]], norm_weight: torch.Tensor | None,
                  out: torch.Tensor | None, what: str, *, n: int | None = None,
                  k: int | None = None) -> tuple[int, int, int]:
    """Checks shared by the entry points; a packed weight passes no `weights`, its `n` and `k`."""
    _require()
    for name, t in [("x", x), *weights] + ([("norm_weight", norm_weight)] if norm_weight is not None else []):
        _check_cpu_f32(name, t)
    if not weights:
        if x.dim() != 2 or x.shape[1] != k:
            raise ValueError(f"{what} needs x [M, {k}] for a packed weight [{n}, {k}], got {list(x.shape)}")
    names = " and ".join(f"{name} [N, K]" for name, _ in weights)
    if x.dim() != 2 or any(w.dim() != 2 or w.shape[1] != x.shape[1] for _, w in weights):
        raise ValueError(f"{what} needs x [M, K] and {names}, got {list(x.shape)} and "
                         + " and ".join(str(list(w.shape)) for _, w in weights))
    if len(weights) == 2 and weights[0][1].shape != weights[1][1].shape:
        raise ValueError(f"{what}: w_gate and w_up differ in shape: {list(weights[0][1].shape)} and "
                         f"{list(weights[1][1].shape)}")
    m, k = x.shape
    n = weights[0][1].shape[0] if weights else n
    if k == 0:
        raise ValueError(f"{what} needs K >= 1, got x {list(x.shape)}")
    if norm_weight is not None and tuple(norm_weight.shape) != (k,):
        raise ValueError(f"norm_weight must be [{k}] (x's K), got {list(norm_weight.shape)}")
    if out is not None:
        _check_cpu_f32("out", out)
        if tuple(out.shape) != (m, n) or (n > 1 and out.stride(1) != 1):
            raise ValueError(f"out must be [{m}, {n}] with unit column stride, got {list(out.shape)} "
                             f"strides {list(out.stride())}")
        if _overlap(out, x):
            raise ValueError("out must not overlap x")
        for name, w in weights:
            if _overlap(out, w):
                raise ValueError(f"out must not overlap {name}")
    return m, n, k


def _check_epilogue(bias: torch.Tensor | None, residual: torch.Tensor | None, out: torch.Tensor | None,
                    m: int, n: int) -> None:
    """The bias `[n]` and residual `[m, n]` checks (the residual may be `out` itself)."""
    if bias is not None:
        _check_cpu_f32("bias", bias)
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias must be [{n}], got {list(bias.shape)}")
    if residual is not None:
        _check_cpu_f32("residual", residual)
        if tuple(residual.shape) != (m, n):
            raise ValueError(f"residual must be [{m}, {n}], got {list(residual.shape)}")
        if out is not None and _overlap(out, residual) and not (
                residual.data_ptr() == out.data_ptr() and residual.stride() == out.stride()):
            raise ValueError("out may be residual itself but must not partly overlap it")


def gemm_nt(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
            norm_weight: torch.Tensor | None = None, eps: float = 1e-5, residual: torch.Tensor | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """`residual + (rms_norm(x) @ weight^T + bias)` -> `[M, N]`, fp32; each of norm, bias and
    residual optional (`norm_weight=None`: x as it is).

    x [M, K] (a row stride allowed), weight [N, K], bias [N], norm_weight [K] (RMSNorm
    `x * rsqrt(mean(x^2) + eps) * norm_weight`), residual [M, N]. `out` [M, N] (a row stride
    allowed) receives the result and is returned; it may be `residual` itself (y += ...), and must
    not otherwise overlap an input.
    """
    m, n, k = _check_common(x, [("weight", weight)], norm_weight, out, "gemm_nt")
    _check_epilogue(bias, residual, out, m, n)
    return gemm_nt_unchecked(x, weight.contiguous(), None if bias is None else bias.contiguous(),
                             None if norm_weight is None else norm_weight.contiguous(), eps, residual, out)


def gemm_nt_unchecked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      norm_weight: torch.Tensor | None = None, eps: float = 1e-5,
                      residual: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """`gemm_nt` for callers that checked dtypes, devices, shapes and overlaps (weight, bias and
    norm_weight contiguous; out, when given, with unit column stride)."""
    x, out = _operands(x, weight.shape[0], out)
    (m, k), n = x.shape, out.shape[1]
    if m and n:
        if residual is not None and residual.stride(1) != 1 and n > 1:
            residual = residual.contiguous()
        _check_rc(native.library().sc_gemm_nt(  # type: ignore[union-attr]
            _ptr(x), x.stride(0), _ptr(weight), _ptr(bias), _ptr(norm_weight), eps, _ptr(residual),
            0 if residual is None else residual.stride(0), _ptr(out), out.stride(0), m, n, k))
    return out


def gemm_nt_swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, *,
                   norm_weight: torch.Tensor | None = None, eps: float = 1e-5,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """`silu(h @ w_gate^T) * (h @ w_up^T)` -> `[M, N]`, h = `rms_norm(x)` (or x with
    `norm_weight=None`), fp32: the SwiGLU MLP's first half in one pass, without g and u in memory.

    x [M, K] (a row stride allowed), w_gate and w_up [N, K], norm_weight [K]; `out` as in
    `gemm_nt` (no overlap with the inputs)."""
    _check_common(x, [("w_gate", w_gate), ("w_up", w_up)], norm_weight, out, "gemm_nt_swiglu")
    return gemm_nt_swiglu_unchecked(x, w_gate.contiguous(), w_up.contiguous(),
                                    None if norm_weight is None else norm_weight.contiguous(), eps, out)


def gemm_nt_swiglu_unchecked(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                             norm_weight: torch.Tensor | None = None, eps: float = 1e-5,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    """`gemm_nt_swiglu` for callers that checked dtypes, devices, shapes and overlaps (weights
    contiguous)."""
    x, out = _operands(x, w_gate.shape[0], out)
    (m, k), n = x.shape, out.shape[1]
    if m and n:
        _check_rc(native.library().sc_gemm_nt_swiglu(  # type: ignore[union-attr]
            _ptr(x), x.stride(0), _ptr(w_gate), _ptr(w_up), _ptr(norm_weight), eps, _ptr(out), out.stride(0), m, n,
            k))
    return out


# -- weights packed once ----------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A weight `[N, K]` (or the SwiGLU pair `w_gate`, `w_up`, each `[N, K]`) packed for
    `gemm_packed`: `strips [S, K, 32]` fp32, 64-byte aligned (S = ceil(N / 32), or ceil(N / 16)
    for the pair: 16 columns of w_gate then the same 16 of w_up)."""

    strips: torch.Tensor
    n: int
    k: int
    swiglu: bool

    @property
    def nbytes(self) -> int:
        return self.strips.numel() * 4

    def unpack(self) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The weight `[N, K]` (the pair `(w_gate, w_up)`) back, bit for bit."""
        cols = self.strips.transpose(1, 2)  # [S, 32, K]
        if not self.swiglu:
            return cols.reshape(-1, self.k)[:self.n].contiguous()
        gate, up = (half.reshape(-1, self.k)[:self.n].contiguous() for half in (cols[:, :16], cols[:, 16:]))
        return gate, up

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids [T]` of the plain weight `[T, K]` (an embedding lookup from a tied lm_head)."""
        if self.swiglu:
            raise ValueError("rows() reads a plain packed weight, not the SwiGLU pair")
        ids = ids.to(torch.int64)
        return self.strips[ids // 32, :, ids % 32]


def _check_weight(name: str, w: torch.Tensor) -> None:
    _check_cpu_f32(name, w)
    if w.dim() != 2 or w.shape[0] < 1 or w.shape[1] < 1:
        raise ValueError(f"{name} must be [N, K] with N, K >= 1, got {list(w.shape)}")


def packed_floats(n: int, k: int, swiglu: bool = False) -> int:
    """Floats of a packed `[n, k]` weight (or SwiGLU pair): whole strips of 32 columns."""
    return ((n + 15) // 16 if swiglu else (n + 31) // 32) * k * 32


def _out_strips(out: torch.Tensor | None, floats: int) -> torch.Tensor:
    if out is None:
        return huge_page_floats(floats)
    _check_cpu_f32("out", out)
    if out.dim() != 1 or out.numel() != floats or not out.is_contiguous() or out.data_ptr() % 64:
        raise ValueError(f"out must be a contiguous 64-byte aligned fp32 [{floats}] tensor")
    return out


def pack_weights(weight: torch.Tensor, *, out: torch.Tensor | None = None) -> PackedWeight:
    """`weight [N, K]` (fp32 CPU) packed for `gemm_packed`, into `out` (`packed_floats(N, K)`
    floats, 64-byte aligned) or a new buffer."""
    _require()
    _check_weight("weight", weight)
    n, k = weight.shape
    strips = _out_strips(out, packed_floats(n, k))
    lib = native.library()
    assert lib is not None
    lib.sc_pack_weights(weight.contiguous().data_ptr(), None, n, k, strips.data_ptr())
    return PackedWeight(strips.view(-1, k, 32), n, k, False)


def pack_swiglu(w_gate: torch.Tensor, w_up: torch.Tensor, *, out: torch.Tensor | None = None) -> PackedWeight:
    """The SwiGLU pair `w_gate`, `w_up` (`[N, K]` each, fp32 CPU) packed for `gemm_packed`, into
    `out` (`packed_floats(N, K, swiglu=True)` floats) or a new buffer."""
    _require()
    _check_weight("w_gate", w_gate)
    _check_weight("w_up", w_up)
    if w_gate.shape != w_up.shape:
        raise ValueError(f"w_gate and w_up differ in shape: {list(w_gate.shape)} and {list(w_up.shape)}")
    n, k = w_gate.shape
    strips = _out_strips(out, packed_floats(n, k, swiglu=True))
    lib = native.library()
    assert lib is not None
    lib.sc_pack_weights(w_gate.contiguous().data_ptr(), w_up.contiguous().data_ptr(), n, k, strips.data_ptr())
    return PackedWeight(strips.view(-1, k, 32), n, k, True)


def gemm_packed(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None, *,
                norm_weight: torch.Tensor | None = None, eps: float = 1e-5, residual: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """`gemm_nt` over a packed weight (plain: `residual + (rms_norm(x) @ W^T + bias)`) or
    `gemm_nt_swiglu` over a packed pair (`silu(h @ w_gate^T) * (h @ w_up^T)`; no bias or
    residual), the same bits, at any number of rows of x `[M, K]`."""
    _require()
    if not isinstance(weight, PackedWeight):
        raise TypeError(f"weight must be a PackedWeight (pack_weights / pack_swiglu), got {type(weight).__name__}")
    if weight.swiglu and (bias is not None or residual is not None):
        raise ValueError("a packed SwiGLU pair takes no bias or residual")
    m, n, k = _check_common(x, [], norm_weight, out, "gemm_packed", n=weight.n, k=weight.k)
    _check_epilogue(bias, residual, out, m, n)
    return gemm_packed_unchecked(x, weight, None if bias is None else bias.contiguous(),
                                 None if norm_weight is None else norm_weight.contiguous(), eps, residual, out)


def gemm_packed_unchecked(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None,
                          norm_weight: torch.Tensor | None = None, eps: float = 1e-5,
                          residual: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """`gemm_packed` for callers that checked dtypes, devices, shapes and overlaps."""
    x, out = _operands(x, weight.n, out)
    m, k = x.shape
    if m:
        if residual is not None and residual.stride(1) != 1 and weight.n > 1:
            residual = residual.contiguous()
        _check_rc(native.library().sc_gemm_packed(  # type: ignore[union-attr]
            _ptr(x), x.stride(0), weight.strips.data_ptr(), int(weight.swiglu), _ptr(bias), _ptr(norm_weight), eps,
            _ptr(residual), 0 if residual is None else residual.stride(0), _ptr(out), out.stride(0), m, weight.n, k))
    return out
