"""Plain references for the native CPU kernels, with the same signatures (DESIGN.md contract 2)."""

from __future__ import annotations

import torch


def matmul_nt(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x [M, K] @ weight [N, K]^T (+ bias [N])` -> `[M, N]`, one plain matmul in the inputs' dtype."""
    out = x @ weight.t()
    return out if bias is None else out + bias


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, blocks: torch.Tensor,
                           offsets: torch.Tensor, lengths: torch.Tensor, block_size: int, scale: float, *,
                           return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Session by session: gather the keys through the block table, then softmax(q k^T * scale) v.

    q `[B, Hq, D]`; k_pool, v_pool `[Hkv, S, D]`; see `streamctx.operators.cpu.paged_decode_attention`.
    """
    b, hq, d = q.shape
    hkv = k_pool.shape[0]
    outs, lses = [], []
    for i in range(b):
        ids = blocks[int(offsets[i]):int(offsets[i + 1])].long()
        slots = (ids[:, None] * block_size + torch.arange(block_size)).reshape(-1)[:int(lengths[i])]
        k = k_pool[:, slots].repeat_interleave(hq // hkv, dim=0)  # [Hq, T, D]
        v = v_pool[:, slots].repeat_interleave(hq // hkv, dim=0)
        scores = torch.einsum("hd,htd->ht", q[i], k) * scale
        outs.append(torch.einsum("ht,htd->hd", scores.softmax(-1), v))
        lses.append(torch.logsumexp(scores, -1))
    out = torch.stack(outs) if outs else q.new_empty(0, hq, d)
    lse = torch.stack(lses) if lses else q.new_empty(0, hq)
    return (out, lse) if return_lse else out
