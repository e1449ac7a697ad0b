"""One tolerance helper per dtype (DESIGN.md contract 2).

Exact paths are compared to plain references in fp64/fp32 with these bounds. bf16/fp16 results are
bounded by a multiple of torch's own low-precision error against the fp32 reference
(flash-attention's rule), see `assert_lowp_close`.
"""

from __future__ import annotations

import torch

# (rtol, atol) per dtype for an exact operator vs its plain reference.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (1e-3, 1e-3),
}


def tol(dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype | None = None,
                 scale: float = 1.0, msg: str = "") -> None:
    """Assert `actual` equals `expected` within the tolerance of `dtype` (default: actual's), times `scale`."""
    rtol, atol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(
        actual.to(expected.dtype) if actual.dtype != expected.dtype else actual,
        expected,
        rtol=rtol * scale,
        atol=atol * scale,
        msg=(lambda m: f"{msg}\n{m}") if msg else None,
    )


def assert_lowp_close(ours: torch.Tensor, torch_lowp: torch.Tensor, ref_fp32: torch.Tensor,
                      *, factor: float = 3.0, floor: float = 1e-3) -> None:
    """Low-precision check: |ours - ref| <= factor * |torch_lowp - ref| + floor, elementwise max."""
    ours_err = (ours.float() - ref_fp32.float()).abs().max().item()
    torch_err = (torch_lowp.float() - ref_fp32.float()).abs().max().item()
    assert ours_err <= factor * torch_err + floor, (
        f"low-precision error {ours_err:.3e} exceeds {factor} x torch's {torch_err:.3e} + {floor}"
    )
