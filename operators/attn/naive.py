"""Plain references for the attention operators: a dense score matrix with an explicit mask.

O(Tq * Tk) memory by design. Same signatures as the fast paths in `blockwise.py` and
`hierarchical.py`; the tests compare the two. Visibility of key `j` to query `i` (at absolute
position `p = q_offset + i`), built directly from the definitions:

- `causal`: `j <= p`;
- `window=w`: `p - w < j <= p` (a window always looks backwards);
- `sinks=s` (with a window or pattern): `j < s` (and `j <= p` when causal);
- `pattern=P`: the block pattern admits `(p // bs, j // bs)`;
- window, sinks and pattern are united; causality intersects the union.
"""

from __future__ import annotations

import math

import torch

from .patterns import BlockPattern

__all__ = ["attention", "merge_attention", "visible_mask"]


def visible_mask(tq: int, tk: int, *, causal: bool = True, q_offset: int = 0, window: int | None = None,
                 sinks: int = 0, pattern: BlockPattern | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool `[Tq, Tk]`: True where query `i` may attend key `j`."""
    p = torch.arange(tq, device=device)[:, None] + q_offset
    j = torch.arange(tk, device=device)[None, :]
    if window is None and pattern is None:
        allowed = torch.ones(tq, tk, dtype=torch.bool, device=device)
    else:
        allowed = torch.zeros(tq, tk, dtype=torch.bool, device=device)
        if window is not None:
            allowed |= (j > p - window) & (j <= p)
        if sinks:
            allowed |= (j < sinks).expand(tq, tk)
        if pattern is not None:
            allowed |= pattern.token_mask(p[:, 0].cpu(), j[0].cpu()).to(device)
    if causal:
        allowed &= j <= p
    return allowed


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, q_offset: int = 0,
              window: int | None = None, sinks: int = 0, pattern: BlockPattern | None = None,
              scale: float | None = None, chunk_size: int | None = None, return_lse: bool = False,
              return_key_mass: bool = False, checkpoint: bool = False):
    """Dense reference. q `[B, Hq, Tq, D]`, k/v `[B, Hkv, Tk, D]`, Hq a multiple of Hkv.

    Returns `out` `[B, Hq, Tq, D]`, or a tuple `(out, lse?, key_mass?)` with the requested extras:
    lse `[B, Hq, Tq]` and key_mass `[B, Hq, Tk]` (per query head: the probability each key received,
    summed over queries), both fp32 (fp64 for fp64 inputs). `chunk_size`/`checkpoint` are ignored.
    A query that sees no key gets out 0 and lse -inf.
    """
    del chunk_size, checkpoint
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = hq // hkv
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kr = k.to(work).repeat_interleave(g, dim=1)
    vr = v.to(work).repeat_interleave(g, dim=1)
    s = torch.einsum("bhid,bhjd->bhij", q.to(work), kr) * scale
    mask = visible_mask(tq, tk, causal=causal, q_offset=q_offset, window=window, sinks=sinks,
                        pattern=pattern, device=q.device)
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # rows with no visible key
    e = torch.exp(s - m)  # exp(-inf) = 0 on masked entries
    denom = e.sum(dim=-1, keepdim=True)
    probs = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    lse = (m + torch.log(denom)).squeeze(-1)  # -inf for rows with no visible key
    out = torch.einsum("bhij,bhjd->bhid", probs, vr).to(q.dtype)
    extras = []
    if return_lse:
        extras.append(lse)
    if return_key_mass:
        extras.append(probs.sum(dim=2))
    return (out, *extras) if extras else out


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                    lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference merge: attention over keys A ∪ B from the parts (out `[..., T, D]`, lse `[..., T]`)."""
    work = torch.float64 if out_a.dtype == torch.float64 else torch.float32
    lse = torch.logaddexp(lse_a.to(work), lse_b.to(work))
    empty = torch.isinf(lse) & (lse < 0)
    lse_safe = torch.where(empty, torch.zeros_like(lse), lse)
    wa = torch.exp(lse_a.to(work) - lse_safe).masked_fill(empty, 0.0)[..., None]
    wb = torch.exp(lse_b.to(work) - lse_safe).masked_fill(empty, 0.0)[..., None]
    out = (wa * out_a.to(work) + wb * out_b.to(work)).to(out_a.dtype)
    return out, lse
