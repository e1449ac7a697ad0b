"""Plain reference for the selective scan: an explicit loop over time, the definition.

Semantics are those of Mamba's `selective_scan_ref`, with an `initial_state` added and the state
kept in fp32 (fp64 when the inputs are fp64, so tests can compare in double precision).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["selective_scan"]


def _expand_groups(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`[B, N, L]` -> `[B, 1, N, L]`; `[B, G, N, L]` -> `[B, Dm, N, L]` (each group serves Dm/G channels)."""
    if x.dim() == 3:
        return x.unsqueeze(1)
    return x.repeat_interleave(dim // x.shape[1], dim=1)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_state: bool = False,
    chunk_size: int | None = None,
    checkpoint: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sequential selective scan (reference). `chunk_size` and `checkpoint` are accepted and ignored.

    u, delta `[B, Dm, L]`; A `[Dm, N]`; B, C `[B, N, L]` or `[B, G, N, L]`; D, delta_bias `[Dm]`;
    z `[B, Dm, L]`; initial_state `[B, Dm, N]`. Per step t:
        x = exp(delta_t * A) * x + delta_t * B_t * u_t;   y_t = <x, C_t> + D * u_t;   y_t *= silu(z_t)
    Returns y `[B, Dm, L]` in u's dtype, and the last state `[B, Dm, N]` (fp32/fp64) if asked.
    """
    del chunk_size, checkpoint
    dtype_in = u.dtype
    work = torch.promote_types(dtype_in, torch.float32)
    u, delta, A = u.to(work), delta.to(work), A.to(work)
    if delta_bias is not None:
        delta = delta + delta_bias.to(work)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    dim, length = u.shape[1], u.shape[2]
    Bx = _expand_groups(B.to(work), dim)  # [B, Dm|1, N, L]
    Cx = _expand_groups(C.to(work), dim)
    if initial_state is None:
        x = u.new_zeros(u.shape[0], dim, A.shape[1])
    else:
        x = initial_state.to(work)
    ys = []
    for t in range(length):
        dA = torch.exp(delta[:, :, t, None] * A)  # [B, Dm, N]
        x = dA * x + (delta[:, :, t] * u[:, :, t])[..., None] * Bx[..., t]
        ys.append((x * Cx[..., t]).sum(-1))
    y = torch.stack(ys, dim=2) if ys else u.new_zeros(u.shape)
    if D is not None:
        y = y + u * D.to(work)[:, None]
    if z is not None:
        y = y * F.silu(z.to(work))
    y = y.to(dtype_in)
    return (y, x) if return_state else y
