"""Plain references for the native CPU kernels, with the same signatures (DESIGN.md contract 2)."""

from __future__ import annotations

import torch


def matmul_nt(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x [M, K] @ weight [N, K]^T (+ bias [N])` -> `[M, N]`, one plain matmul in the inputs' dtype."""
    out = x @ weight.t()
    return out if bias is None else out + bias


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`x [M, H] * rsqrt(mean(x^2) + eps) * weight [H]`, plainly."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`gate * sigmoid(gate) * up`."""
    return gate * torch.sigmoid(gate) * up


def rope_append(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                positions: torch.Tensor, rope_positions: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                pos_pool: torch.Tensor, rope_pool: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Rotate q and k (rotate-half RoPE), write k, v and positions at the slots; returns q."""
    hkv = (qkv.shape[1] - num_heads) // 2
    half = qkv.shape[-1] // 2
    qk = qkv[:, :num_heads + hkv]
    rot = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)
    qk = qk * cos[:, None] + rot * sin[:, None]
    k_pool[:, slots] = qk[:, num_heads:].transpose(0, 1)
    v_pool[:, slots] = qkv[:, num_heads + hkv:].transpose(0, 1)
    pos_pool[slots] = positions
    rope_pool[slots] = rope_positions
    return qk[:, :num_heads].contiguous()


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


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int, scale: float,
                     return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The full score matrix, masked to keys `j <= q_offset + i`, then softmax and values.

    q `[Hq, T, D]`, k, v `[Hkv, S, D]`; returns out `[T, Hq, D]` (and lse `[Hq, T]`); see
    `streamctx.operators.cpu.causal_attention`. A query that sees no key gets out 0, lse -inf.
    """
    hq, t, d = q.shape
    hkv, s, _ = k.shape
    kk = k.repeat_interleave(hq // hkv, dim=0)
    vv = v.repeat_interleave(hq // hkv, dim=0)
    scores = torch.einsum("htd,hsd->hts", q, kk) * scale
    visible = torch.arange(s)[None, :] <= q_offset + torch.arange(t)[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # rows without keys: 0
    out = torch.einsum("hts,hsd->thd", probs, vv).contiguous()
    return (out, lse) if return_lse else out


def gemm_nt(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
            norm_weight: torch.Tensor | None = None, eps: float = 1e-5, residual: torch.Tensor | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """`residual + (rms_norm(x) @ weight^T + bias)`, each of norm, bias and residual optional,
    plainly in the inputs' dtype (`out`, when given, receives the result)."""
    h = x if norm_weight is None else rms_norm(x, norm_weight, eps)
    y = matmul_nt(h, weight, bias)
    if residual is not None:
        y = residual + y
    return y if out is None else out.copy_(y)


def gemm_nt_swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, *,
                   norm_weight: torch.Tensor | None = None, eps: float = 1e-5,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """`silu(h @ w_gate^T) * (h @ w_up^T)`, h = `rms_norm(x)` (or x), plainly."""
    h = x if norm_weight is None else rms_norm(x, norm_weight, eps)
    y = silu_mul(h @ w_gate.t(), h @ w_up.t())
    return y if out is None else out.copy_(y)
