"""Compressive memory (Infini-attention): a linear-attention memory read by queries, written per segment.

State (M `[B, H, Dk, Dv]`, z `[B, H, Dk]`), sigma = elu + 1, kept in fp32 (fp64 for fp64 inputs).

Read:   A_mem = sigma(Q) M / (sigma(Q) z + eps)          (eps makes an empty memory read zeros)
Write, one segment (K, V) `[B, H, S, D]`, using the memory from *before* the segment:
    linear: M' = M + sigma(K)^T V
    delta:  M' = M + sigma(K)^T (V - sigma(K) M / (sigma(K) z + eps))
    both:   z' = z + sum_t sigma(K_t)

Segment semantics: `memory_update(k, v, state, segment_size=S)` cuts T into segments of S tokens
(the last may be shorter) and applies the write above to each in order, every segment reading the
memory left by the previous one; `segment_size=None` makes the whole call one segment. So calling
it once per segment and carrying the state equals one call with `segment_size`. For the linear rule
the segmentation does not matter (the write is a sum); for the delta rule it does, by definition.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["MemoryState", "empty_memory", "memory_retrieve", "memory_update", "gated_memory_attention",
           "infini_segment", "sigma"]

UpdateRule = Literal["linear", "delta"]


class MemoryState(NamedTuple):
    """Compressive memory: M `[B, H, Dk, Dv]` (associative matrix), z `[B, H, Dk]` (normaliser)."""

    M: torch.Tensor
    z: torch.Tensor


def sigma(x: torch.Tensor) -> torch.Tensor:
    """The memory's non-linearity, elu(x) + 1 (positive)."""
    return F.elu(x) + 1.0


def empty_memory(batch: int, heads: int, dk: int, dv: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> MemoryState:
    """An empty memory (reads zeros, absorbs nothing yet)."""
    return MemoryState(torch.zeros(batch, heads, dk, dv, dtype=dtype, device=device),
                       torch.zeros(batch, heads, dk, dtype=dtype, device=device))


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def memory_retrieve(q: torch.Tensor, state: MemoryState | tuple[torch.Tensor, torch.Tensor], *,
                    eps: float = 1e-6) -> torch.Tensor:
    """sigma(q) M / (sigma(q) z + eps): q `[B, H, T, Dk]` -> `[B, H, T, Dv]` in q's dtype."""
    work = _work_dtype(q)
    M, z = (s.to(work) for s in state)
    sq = sigma(q.to(work))
    return ((sq @ M) / (sq @ z[..., None] + eps)).to(q.dtype)


def _write(sk: torch.Tensor, v: torch.Tensor, M: torch.Tensor, z: torch.Tensor, rule: UpdateRule,
           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One segment's write. sk = sigma(k) `[B, H, S, Dk]`, v `[B, H, S, Dv]`."""
    if rule == "delta":
        v = v - (sk @ M) / (sk @ z[..., None] + eps)
    return M + sk.transpose(-1, -2) @ v, z + sk.sum(-2)


def memory_update(k: torch.Tensor, v: torch.Tensor, state: MemoryState | tuple[torch.Tensor, torch.Tensor], *,
                  rule: UpdateRule = "linear", segment_size: int | None = None,
                  eps: float = 1e-6) -> MemoryState:
    """Write k `[B, H, T, Dk]`, v `[B, H, T, Dv]` into the memory, one segment at a time (see module doc)."""
    if rule not in ("linear", "delta"):
        raise ValueError(f'rule must be "linear" or "delta"; got {rule!r}')
    if k.dim() != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"expected k [B, H, T, Dk], v [B, H, T, Dv]; got {tuple(k.shape)}, {tuple(v.shape)}")
    work = _work_dtype(k)
    M, z = (s.to(work) for s in state)
    sk, v_w = sigma(k.to(work)), v.to(work)
    t = k.shape[2]
    if rule == "linear" or segment_size is None or segment_size >= t:
        M, z = _write(sk, v_w, M, z, rule, eps)
    else:
        if segment_size < 1:
            raise ValueError(f"segment_size must be >= 1; got {segment_size}")
        for start in range(0, t, segment_size):
            sl = slice(start, start + segment_size)
            M, z = _write(sk[:, :, sl], v_w[:, :, sl], M, z, rule, eps)
    return MemoryState(M, z)


def gated_memory_attention(local_out: torch.Tensor, mem_out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """sigmoid(gate) * mem_out + (1 - sigmoid(gate)) * local_out, `[B, H, T, Dv]`.

    `gate` is beta per head `[H]` (Infini-attention's learned scalar per head) or any tensor that
    broadcasts against `[B, H, T, Dv]`.
    """
    g = torch.sigmoid(gate)
    if g.dim() == 1:
        g = g.view(1, -1, 1, 1)
    return g * mem_out + (1.0 - g) * local_out


def infini_segment(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, local_out: torch.Tensor,
                   state: MemoryState | tuple[torch.Tensor, torch.Tensor], gate: torch.Tensor, *,
                   rule: UpdateRule = "delta", eps: float = 1e-6) -> tuple[torch.Tensor, MemoryState]:
    """One Infini-attention segment: read the memory from before the segment, gate it with the local
    attention output, then write the segment's (k, v).

    q, k `[B, H, S, Dk]`; v `[B, H, S, Dv]`; local_out `[B, H, S, Dv]` (e.g. causal attention inside
    the segment, or over a policy's kept KV); gate beta `[H]`. Returns (out `[B, H, S, Dv]`, new state).
    """
    mem_out = memory_retrieve(q, state, eps=eps)
    out = gated_memory_attention(local_out, mem_out.to(local_out.dtype), gate)
    return out, memory_update(k, v, state, rule=rule, eps=eps)
