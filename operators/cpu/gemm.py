"""Tensor-level entry points to the native prefill SGEMM (`gemm.c`), fp32, with fused epilogues.

`gemm_nt` is `residual + F.linear(rms_norm(x), weight, bias)` with every step but the product
optional, in one pass: the RMSNorm is folded into the packing of `x` and the bias and residual
into the product's epilogue. `gemm_nt_swiglu` is the SwiGLU MLP's first half,
`silu(h @ w_gate^T) * (h @ w_up^T)` (h = x, or its RMSNorm), with the two products in one tile.
Both are built for the many rows of prefill (`matmul_nt` takes the few rows of decode).

Each output is summed in an order that depends on K only (blocks of at most 192, each from zero,
added in order; then the bias, then the residual), so a row's bits do not depend on M, on the
other rows or on the thread count; the fused norm and SwiGLU have the same bits as `rms_norm` and
`silu_mul` followed by the plain product. The plain references are in `naive`.
"""

from __future__ import annotations

import torch

from streamctx.operators.cpu import native
from streamctx.operators.cpu.kernels import _check_cpu_f32, _require

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
                  out: torch.Tensor | None, what: str) -> tuple[int, int, int]:
    _require()
    for name, t in [("x", x), *weights] + ([("norm_weight", norm_weight)] if norm_weight is not None else []):
        _check_cpu_f32(name, t)
    names = " and ".join(f"{name} [N, K]" for name, _ in weights)
    if x.dim() != 2 or any(w.dim() != 2 or w.shape[1] != x.shape[1] for _, w in weights):
        raise ValueError(f"{what} needs x [M, K] and {names}, got {list(x.shape)} and "
                         + " and ".join(str(list(w.shape)) for _, w in weights))
    if len(weights) == 2 and weights[0][1].shape != weights[1][1].shape:
        raise ValueError(f"{what}: w_gate and w_up differ in shape: {list(weights[0][1].shape)} and "
                         f"{list(weights[1][1].shape)}")
    m, k = x.shape
    n = weights[0][1].shape[0]
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
