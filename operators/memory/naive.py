"""Plain references for the compressive memory: explicit loops over segments and tokens.

The delta rule's correction for every token of a segment uses the memory from before the
segment (Infini-attention's definition); the write is accumulated token by token.
"""

from __future__ import annotations

import torch

from streamctx.operators.memory.compressive import MemoryState, gated_memory_attention, sigma

__all__ = ["memory_retrieve", "memory_update", "gated_memory_attention", "MemoryState"]


def memory_retrieve(q: torch.Tensor, state: MemoryState | tuple[torch.Tensor, torch.Tensor], *,
                    eps: float = 1e-6) -> torch.Tensor:
    """Per-query loop: sigma(q_t) M / (sigma(q_t) . z + eps)."""
    work = torch.promote_types(q.dtype, torch.float32)
    M, z = (s.to(work) for s in state)
    outs = []
    for t in range(q.shape[2]):
        sq = sigma(q[:, :, t].to(work))  # [B, H, Dk]
        num = (sq[..., None] * M).sum(-2)
        den = (sq * z).sum(-1, keepdim=True)
        outs.append(num / (den + eps))
    out = torch.stack(outs, dim=2) if outs else q.new_zeros(*q.shape[:3], M.shape[-1], dtype=work)
    return out.to(q.dtype)


def memory_update(k: torch.Tensor, v: torch.Tensor, state: MemoryState | tuple[torch.Tensor, torch.Tensor], *,
                  rule: str = "linear", segment_size: int | None = None, eps: float = 1e-6) -> MemoryState:
    """Loop over segments; inside a segment, loop over tokens against the pre-segment memory."""
    work = torch.promote_types(k.dtype, torch.float32)
    M, z = (s.to(work) for s in state)
    t_len = k.shape[2]
    size = t_len if segment_size is None else segment_size
    for start in range(0, t_len, max(size, 1)):
        M_prev, z_prev = M, z
        for t in range(start, min(start + size, t_len)):
            sk = sigma(k[:, :, t].to(work))  # [B, H, Dk]
            val = v[:, :, t].to(work)  # [B, H, Dv]
            if rule == "delta":
                val = val - (sk[..., None] * M_prev).sum(-2) / ((sk * z_prev).sum(-1, keepdim=True) + eps)
            M = M + sk[..., None] * val[..., None, :]
            z = z + sk
    return MemoryState(M, z)
