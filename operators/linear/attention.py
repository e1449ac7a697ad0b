"""Chunked linear attention: intra-chunk masked matmul plus an inter-chunk state.

With phi the feature map, the causal output is out_t = phi(q_t) S_t / (phi(q_t) . z_t + eps), where
S_t = S_0 + sum_{s<=t} phi(k_s)^T v_s `[F, Dv]` and z_t = z_0 + sum_{s<=t} phi(k_s) `[F]`. Per chunk
of Q tokens: the in-chunk part is (phi(Q) phi(K)^T masked to s <= t) V (a Q x Q matmul), the rest is
phi(Q) S_start with S_start the state before the chunk (an exclusive cumulative sum of the chunks'
phi(K)^T V over a block of chunks). State (S, z) is kept in fp32 (fp64 for fp64 inputs); carrying
it across calls equals one pass. Non-causal mode: every query sees the state after the sequence.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

from streamctx.operators.linear.feature_maps import FeatureMap, apply_feature_map, random_projection

__all__ = ["linear_attention", "LinearState", "DEFAULT_CHUNK"]

DEFAULT_CHUNK = 64
_BLOCK_CHUNKS = 16  # chunks per block: bounds the [B, H, K, F, Dv] working set


class LinearState(NamedTuple):
    """Linear-attention state: S `[B, H, F, Dv]` (sum of phi(k)^T v), z `[B, H, F]` (sum of phi(k))."""

    S: torch.Tensor
    z: torch.Tensor


def _features(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feature_map: FeatureMap,
              projection: torch.Tensor | None, num_features: int | None,
              seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """phi(q), phi(k) `[B, H, T, F]` and v `[B, H, T, Dv]` in the working dtype (>= fp32)."""
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"expected q, k [B, H, T, Dk] and v [B, H, T, Dv]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    work = torch.promote_types(q.dtype, torch.float32)
    if feature_map == "random" and projection is None:
        projection = random_projection(q.shape[-1], num_features, seed=seed, dtype=work, device=q.device)
    phi_q = apply_feature_map(q.to(work), feature_map, projection=projection)
    phi_k = apply_feature_map(k.to(work), feature_map, projection=projection)
    return phi_q, phi_k, v.to(work)


def _block(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, S: torch.Tensor, z: torch.Tensor,
           chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal block of K whole chunks. phi_q, phi_k `[B, H, K*Q, F]`, v `[B, H, K*Q, Dv]`.

    Returns numerator `[B, H, K*Q, Dv]`, denominator `[B, H, K*Q]` and the state after the block.
    """
    b, h, span, f = phi_k.shape
    dv = v.shape[-1]
    k = span // chunk
    qc = phi_q.reshape(b, h, k, chunk, f)
    kc = phi_k.reshape(b, h, k, chunk, f)
    vc = v.reshape(b, h, k, chunk, dv)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=v.device).tril()
    scores = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0.0)  # [B, H, K, Q, Q]
    kv = kc.transpose(-1, -2) @ vc  # [B, H, K, F, Dv]
    ksum = kc.sum(-2)  # [B, H, K, F]
    kv_incl = torch.cumsum(kv, dim=2)
    ksum_incl = torch.cumsum(ksum, dim=2)
    S_start = S[:, :, None] + (kv_incl - kv)
    z_start = z[:, :, None] + (ksum_incl - ksum)
    num = scores @ vc + qc @ S_start
    den = scores.sum(-1) + (qc * z_start[:, :, :, None, :]).sum(-1)
    return num.reshape(b, h, span, dv), den.reshape(b, h, span), S + kv_incl[:, :, -1], z + ksum_incl[:, :, -1]


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: FeatureMap = "elu",
    causal: bool = True,
    initial_state: LinearState | tuple[torch.Tensor, torch.Tensor] | None = None,
    return_state: bool = False,
    chunk_size: int | None = None,
    normalize: bool = True,
    projection: torch.Tensor | None = None,
    num_features: int | None = None,
    seed: int = 0,
    eps: float = 1e-6,
    checkpoint: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, LinearState]:
    """Linear attention out = phi(q) S / (phi(q) . z + eps) (numerator only if not `normalize`).

    q, k `[B, H, T, Dk]`; v `[B, H, T, Dv]`; feature_map "elu" | "relu" | "random" (Performer
    features from `projection` `[m, Dk]`, or seeded: `num_features` m, `seed`); initial_state
    (S `[B, H, F, Dv]`, z `[B, H, F]`). Returns out `[B, H, T, Dv]` in q's dtype and, with
    `return_state`, the state after the sequence in fp32 (fp64 for fp64 inputs). `chunk_size` is
    Q (default 64); `checkpoint` recomputes each block of chunks in backward.
    """
    dtype_in = q.dtype
    phi_q, phi_k, v_w = _features(q, k, v, feature_map, projection, num_features, seed)
    b, h, t, f = phi_k.shape
    dv = v.shape[-1]
    if initial_state is None:
        S = v_w.new_zeros(b, h, f, dv)
        z = v_w.new_zeros(b, h, f)
    else:
        S, z = (s.to(v_w.dtype) for s in initial_state)
        if S.shape != (b, h, f, dv) or z.shape != (b, h, f):
            raise ValueError(f"initial_state must be (S [B, H, F, Dv] = {(b, h, f, dv)}, z [B, H, F]); "
                             f"got {tuple(S.shape)}, {tuple(z.shape)}")
    if not causal:
        S = S + phi_k.transpose(-1, -2) @ v_w
        z = z + phi_k.sum(-2)
        num = phi_q @ S
        den = phi_q @ z[..., None]
    elif t <= 1:  # decode: one recurrent step (or none), no chunk machinery
        S = S + phi_k.transpose(-1, -2) @ v_w
        z = z + phi_k.sum(-2)
        num = phi_q @ S
        den = phi_q @ z[..., None]
    else:
        chunk = max(1, min(chunk_size or DEFAULT_CHUNK, t))
        pad = -t % chunk
        if pad:  # zero keys and values add nothing to the state: padding is exact
            phi_q, phi_k, v_w = (F.pad(x, (0, 0, 0, pad)) for x in (phi_q, phi_k, v_w))
        span = chunk * _BLOCK_CHUNKS
        nums, dens = [], []
        for start in range(0, t + pad, span):
            sl = slice(start, start + span)
            args = (phi_q[:, :, sl], phi_k[:, :, sl], v_w[:, :, sl], S, z, chunk)
            if checkpoint and torch.is_grad_enabled():
                num_b, den_b, S, z = _checkpoint(_block, *args, use_reentrant=False)
            else:
                num_b, den_b, S, z = _block(*args)
            nums.append(num_b)
            dens.append(den_b)
        num = torch.cat(nums, dim=2)[:, :, :t]
        den = torch.cat(dens, dim=2)[:, :, :t, None]
    out = num / (den + eps) if normalize else num
    out = out.to(dtype_in)
    return (out, LinearState(S, z)) if return_state else out
