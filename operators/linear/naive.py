"""Plain reference for linear attention: the recurrent form, an explicit loop over time.

Causal: S_t = S_{t-1} + phi(k_t)^T v_t, z_t = z_{t-1} + phi(k_t), out_t = phi(q_t) S_t / (phi(q_t) . z_t + eps).
Non-causal: every query sees the state after the whole sequence (initial state included).
"""

from __future__ import annotations

import torch

from streamctx.operators.linear.attention import LinearState, _features
from streamctx.operators.linear.feature_maps import FeatureMap

__all__ = ["linear_attention", "LinearState"]


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
    """Recurrent linear attention (reference); same signature as the chunked fast path."""
    del chunk_size, checkpoint
    dtype_in = q.dtype
    phi_q, phi_k, v_w = _features(q, k, v, feature_map, projection, num_features, seed)
    b, h, t, f = phi_k.shape
    if initial_state is None:
        S = v_w.new_zeros(b, h, f, v.shape[-1])
        z = v_w.new_zeros(b, h, f)
    else:
        S, z = (s.to(v_w.dtype) for s in initial_state)
    outs = []
    if causal:
        for i in range(t):
            S = S + phi_k[:, :, i, :, None] * v_w[:, :, i, None, :]
            z = z + phi_k[:, :, i]
            num = (phi_q[:, :, i, :, None] * S).sum(-2)
            den = (phi_q[:, :, i] * z).sum(-1, keepdim=True)
            outs.append(num / (den + eps) if normalize else num)
    else:
        for i in range(t):
            S = S + phi_k[:, :, i, :, None] * v_w[:, :, i, None, :]
            z = z + phi_k[:, :, i]
        for i in range(t):
            num = (phi_q[:, :, i, :, None] * S).sum(-2)
            den = (phi_q[:, :, i] * z).sum(-1, keepdim=True)
            outs.append(num / (den + eps) if normalize else num)
    out = torch.stack(outs, dim=2) if outs else v_w.new_zeros(b, h, 0, v.shape[-1])
    out = out.to(dtype_in)
    return (out, LinearState(S, z)) if return_state else out
