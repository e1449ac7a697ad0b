"""Exact merge of attention computed over disjoint key sets, through the log-sum-exp."""

from __future__ import annotations

import torch

__all__ = ["merge_attention"]


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                    lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over keys A ∪ B from attention over A and over B (A, B disjoint).

    out_* `[..., T, D]`, lse_* `[..., T]`. With `lse = logaddexp(lse_a, lse_b)`,
    `out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b`. A side with lse -inf (no keys)
    contributes nothing; if both are -inf the result is out 0, lse -inf. The weights are computed in
    fp32 (fp64 for fp64 inputs); out keeps out_a's dtype, lse is returned in the working dtype.
    """
    work = torch.float64 if out_a.dtype == torch.float64 else torch.float32
    la, lb = lse_a.to(work), lse_b.to(work)
    m = torch.maximum(la, lb)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # both sides empty (or +inf guard)
    ea, eb = torch.exp(la - m), torch.exp(lb - m)
    total = ea + eb
    lse = m + torch.log(total)
    inv = torch.where(total > 0, 1.0 / torch.where(total > 0, total, torch.ones_like(total)),
                      torch.zeros_like(total))
    out = (out_a.to(work) * (ea * inv)[..., None] + out_b.to(work) * (eb * inv)[..., None]).to(out_a.dtype)
    return out, lse
