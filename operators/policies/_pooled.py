"""Attention over pooled keys: each pooled key stands for `count` tokens.

A pooled key `k` (the mean of `count` raw keys) enters the softmax with the bias `log(count)`,
i.e. exactly as if it were repeated `count` times: its mass approximates the block's total mass.
Returns `(out, lse)` so it merges with the exact local attention through the lse.
"""

from __future__ import annotations

import torch

from streamctx.operators.policies._bounded import grouped


def pooled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, count: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q `[Hq, n, D]`, k/v `[Hkv, S, D]`, count `[S]` -> out `[Hq, n, D]` (q's dtype), lse `[Hq, n]` fp32."""
    hkv, hq = k.shape[0], q.shape[0]
    s = torch.einsum("hgid,hjd->hgij", grouped(q.float(), hkv), k.float()) * scale
    s = s + torch.log(count.float().to(s.device))
    lse = torch.logsumexp(s, dim=-1)  # [Hkv, G, n]
    out = torch.einsum("hgij,hjd->hgid", torch.exp(s - lse[..., None]), v.float())
    return out.reshape(hq, *out.shape[2:]).to(q.dtype), lse.reshape(hq, -1)
