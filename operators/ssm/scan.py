"""Chunked selective scan (Mamba's S6 recurrence) with no Python loop over time steps.

Per channel d and state n the recurrence is x_t = exp(delta_t A) x_{t-1} + delta_t B_t u_t. The
sequence is cut into chunks of Q steps. Inside a chunk, with the log decay Lc_t = sum_{r<=t} delta_r A
(a cumulative sum from the chunk start, fp32),

    x_t = exp(Lc_t) * x_0 + sum_{s<=t} exp(Lc_t - Lc_s) delta_s B_s u_s.

For an element whose decay over the chunk stays within `decay_budget` (|Lc| <= 30 by default) the
sum is one cumulative sum, exp(Lc_t) * cumsum_s(exp(-Lc_s) b_s): every exponential is within e^30
of 1 (fp32 overflows at e^88) and the factorisation costs at most ~budget * eps of relative
precision. Elements whose decay exceeds the budget inside a chunk (fast-forgetting channels) use the
segment-sum form instead: the Q x Q matrix exp(sum_{s<r<=t} delta_r A), masked to s <= t before the
exponential, with each segment sum accumulated from its own steps (a difference of two large
cumulative sums would cancel), so only non-positive numbers are exponentiated for decaying A and
huge decays give zeros, never NaNs. Both forms are computed for all chunks of a block at once;
only the state hand-off between chunks loops (over chunks, not time steps). The state is carried
between chunks and calls in fp32 (fp64 for fp64 inputs): splitting L anywhere equals one pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

__all__ = ["selective_scan", "DEFAULT_CHUNK", "DEFAULT_DECAY_BUDGET"]

DEFAULT_CHUNK = 16
DEFAULT_DECAY_BUDGET = 30.0
_BLOCK_STEPS = 256  # time steps per block: bounds the [B, Dm, block, N] working set (cache-sized)


def _grouped(x: torch.Tensor, name: str, batch: int, dim: int, length: int) -> torch.Tensor:
    """B or C as `[B, G, 1, L, N]` (G = 1 for `[B, N, L]`); the channel axis splits as Dm = G * H."""
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4 or x.shape[0] != batch or x.shape[3] != length or dim % x.shape[1]:
        raise ValueError(f"{name} must be [B, N, L] or [B, G, N, L] with G dividing Dm={dim}; "
                         f"got {tuple(x.shape)}")
    return x.transpose(2, 3).unsqueeze(2)


def _step(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bg: torch.Tensor, Cg: torch.Tensor,
          x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrence step (decode). u, delta `[B, G, H, 1]`; A `[G, H, N]`; Bg, Cg `[B, G, 1, 1, N]`."""
    x = torch.exp(delta * A) * x0 + (delta * u) * Bg[:, :, :, 0]
    return (x * Cg[:, :, :, 0]).sum(-1, keepdim=True), x


def _segsum_states(step_log_decay: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """sum_{s<=t} exp(sum_{s<r<=t} a_r) b_s per row: a = step_log_decay, b = inputs `[M, Q]` -> `[M, Q]`.

    The segment sums are accumulated from the steps themselves (not as differences of two large
    cumulative sums, which would cancel catastrophically), and masked to s <= t before exp.
    """
    q = step_log_decay.shape[-1]
    ones = torch.ones(q, q, dtype=torch.bool, device=step_log_decay.device)
    steps = step_log_decay[:, :, None].expand(-1, q, q).masked_fill(~ones.tril(-1), 0.0)  # [M, r, s]
    segsum = torch.cumsum(steps, dim=1).masked_fill(~ones.tril(), float("-inf"))  # [M, t, s]
    return (torch.exp(segsum) @ inputs[:, :, None])[..., 0]


def _block(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bg: torch.Tensor, Cg: torch.Tensor,
           x0: torch.Tensor, chunk: int, budget: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A block of whole chunks. u, delta `[B, G, H, K*Q]`; A `[G, H, N]`; Bg, Cg `[B, G, 1, K*Q, N]`;
    x0 `[B, G, H, N]`. Returns y `[B, G, H, K*Q]` and the state after the block."""
    b, g, h, span = u.shape
    n = A.shape[-1]
    k = span // chunk
    # Without autograd the [B, G, H, K, Q, N] temporaries are reused in place (fewer allocations).
    inplace = not (torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, Bg, Cg, x0)))
    delta_c = delta.reshape(b, g, h, k, chunk, 1)
    # A is constant in time, so Lc_t = A * sum_{r<=t} delta_r: the cumulative sum runs over [.., Q, 1].
    log_decay = torch.cumsum(delta_c, dim=-2) * A[:, :, None, None, :]  # [B, G, H, K, Q, N]
    decay = torch.exp(log_decay)
    # Bound on max_t |Lc_t| per chunk and element, without touching the [.., Q, N] tensor again.
    wide = A.abs()[:, :, None, :] * delta_c.abs().sum(-2) > budget  # [B, G, H, K, N]
    any_wide = bool(wide.any())
    # Inside the budget exp(-Lc) <= e^budget. Wide rows are recomputed below; under autograd they are
    # clamped first so no inf reaches a gradient, otherwise their inf/NaN is simply overwritten.
    if inplace:
        grow = log_decay.neg_().exp_()  # log_decay is not needed again (wide rows use per-step sums)
    elif any_wide:
        grow = torch.exp(-log_decay.clamp(-budget, budget))
    else:
        grow = torch.exp(-log_decay)
    du = (delta * u).reshape(b, g, h, k, chunk, 1)
    B_c = Bg.reshape(b, g, 1, k, chunk, n)
    # acc_t = sum_{s<=t} exp(-Lc_s) delta_s u_s B_s = states / decay, for elements inside the budget.
    acc = grow.mul_(du).mul_(B_c).cumsum_(-2) if inplace else torch.cumsum(grow * du * B_c, dim=-2)
    local_end = decay[..., -1, :] * acc[..., -1, :]
    if any_wide:
        idx = wide.nonzero(as_tuple=True)
        step_log_decay = delta_c[..., 0][idx[:4]] * A[idx[1], idx[2], idx[4]][:, None]  # [M, Q]
        wide_inputs = du[..., 0][idx[:4]] * B_c[:, :, 0][idx[0], idx[1], idx[3], :, idx[4]]  # [M, Q]
        wide_local = _segsum_states(step_log_decay, wide_inputs)
        if inplace:
            acc.transpose(-1, -2).index_put_(idx, acc.new_zeros(()))
        else:
            acc = acc.masked_fill(wide[..., None, :], 0.0)
        local_end = local_end.index_put(idx, wide_local[:, -1])
    # State hand-off between chunks: x_start[c+1] = exp(Lc_end[c]) x_start[c] + local_end[c].
    chunk_decay = decay[..., -1, :]
    starts = []
    x = x0
    for c in range(k):
        starts.append(x)
        x = torch.addcmul(local_end[..., c, :], chunk_decay[..., c, :], x)
    x_start = torch.stack(starts, dim=-2)[..., None, :]  # [B, G, H, K, 1, N]
    c_chunks = Cg.reshape(b, g, 1, k, chunk, n)
    if inplace:
        y = acc.add_(x_start).mul_(decay).mul_(c_chunks).sum(-1)  # [B, G, H, K, Q]
    else:
        y = (decay * (acc + x_start) * c_chunks).sum(-1)
    if any_wide:
        c_wide = Cg.reshape(b, g, k, chunk, n)[idx[0], idx[1], idx[3], :, idx[4]]  # [M, Q]
        y = y.index_put(idx[:4], wide_local * c_wide, accumulate=True)
    return y.reshape(b, g, h, span), x


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
    decay_budget: float = DEFAULT_DECAY_BUDGET,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan with the semantics of Mamba's `selective_scan_ref` (plus a carried state).

    u, delta `[B, Dm, L]`; A `[Dm, N]`; B, C `[B, N, L]` or `[B, G, N, L]` (G groups of Dm/G
    channels); D, delta_bias `[Dm]`; z `[B, Dm, L]` (output gate, y *= silu(z));
    initial_state `[B, Dm, N]`. Returns y `[B, Dm, L]` in u's dtype and, with `return_state`, the
    last state `[B, Dm, N]` in fp32 (fp64 for fp64 inputs). `chunk_size` is Q (default 16);
    `checkpoint` recomputes each block in backward instead of keeping its activations.
    """
    batch, dim, length = u.shape
    if delta.shape != u.shape or A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"expected u, delta [B, Dm, L] and A [Dm, N]; got u {tuple(u.shape)}, "
                         f"delta {tuple(delta.shape)}, A {tuple(A.shape)}")
    dtype_in = u.dtype
    work = torch.promote_types(dtype_in, torch.float32)
    state_n = A.shape[1]
    u_w, delta_w = u.to(work), delta.to(work)
    if delta_bias is not None:
        delta_w = delta_w + delta_bias.to(work)[:, None]
    if delta_softplus:
        delta_w = F.softplus(delta_w)
    Bg = _grouped(B.to(work), "B", batch, dim, length)  # [B, G, 1, L, N]
    Cg = _grouped(C.to(work), "C", batch, dim, length)
    groups = Bg.shape[1]
    if Cg.shape[1] != groups:
        raise ValueError(f"B and C must have the same number of groups; got {Bg.shape[1]} and {Cg.shape[1]}")
    heads = dim // groups
    A_g = A.to(work).reshape(groups, heads, state_n)
    if initial_state is None:
        x = u_w.new_zeros(batch, groups, heads, state_n)
    elif initial_state.shape != (batch, dim, state_n):
        raise ValueError(f"initial_state must be [B, Dm, N] = {(batch, dim, state_n)}; "
                         f"got {tuple(initial_state.shape)}")
    else:
        x = initial_state.to(work).reshape(batch, groups, heads, state_n)

    u_g = u_w.reshape(batch, groups, heads, length)  # reshape: u often arrives transposed from [B, L, Dm]
    delta_g = delta_w.reshape(batch, groups, heads, length)
    if length == 0:
        y = u_g.new_zeros(u_g.shape)
    elif length == 1:
        y, x = _step(u_g, delta_g, A_g, Bg, Cg, x)
    else:
        chunk = max(1, min(chunk_size or DEFAULT_CHUNK, length))
        padded = -length % chunk
        if padded:  # delta = 0 and u = 0 leave the state unchanged: padding is exact
            u_g, delta_g = F.pad(u_g, (0, padded)), F.pad(delta_g, (0, padded))
            Bg, Cg = F.pad(Bg, (0, 0, 0, padded)), F.pad(Cg, (0, 0, 0, padded))
        span = chunk * max(1, _BLOCK_STEPS // chunk)
        ys = []
        for start in range(0, length + padded, span):
            sl = slice(start, start + span)
            args = (u_g[..., sl], delta_g[..., sl], A_g, Bg[..., sl, :], Cg[..., sl, :], x, chunk, decay_budget)
            if checkpoint and torch.is_grad_enabled():
                y_b, x = _checkpoint(_block, *args, use_reentrant=False)
            else:
                y_b, x = _block(*args)
            ys.append(y_b)
        y = torch.cat(ys, dim=-1)[..., :length]
    y = y.reshape(batch, dim, length)
    if D is not None:
        y = y + u_w * D.to(work)[:, None]
    if z is not None:
        y = y * F.silu(z.to(work))
    y = y.to(dtype_in)
    return (y, x.reshape(batch, dim, state_n)) if return_state else y
