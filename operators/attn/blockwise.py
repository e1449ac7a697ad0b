"""Exact blockwise attention with online-softmax (lse) merging, masks, windows, sinks and patterns.

Shapes: q `[B, Hq, Tq, D]`, k/v `[B, Hkv, Tk, D]`, Hq = G * Hkv (grouped-query heads). K/V are
never repeated: each query block is viewed as `[B, Hkv, G * bq, D]` so the G query heads of a KV head
share one key tile.

Visibility is defined in `naive.py` (the reference). The work is planned per query block (aligned to
absolute positions): the key blocks it may see are classified from interval arithmetic as *full*
(every query sees every key: no mask), *partial* (a small boolean tile) or *hidden* (skipped, so a
sliding window costs O(T * w) and a sparse pattern costs its density). A query block makes at most two
calls of PyTorch's fused CPU/GPU attention kernel (blockwise itself, returning the log-sum-exp): its
full blocks gathered into one unmasked call (a view when they are consecutive) and its partial blocks
into one masked call, merged exactly through the lse (`merge.py`). Few, large calls matter: many
tiny ones are what a shared CPU punishes most.

Fast paths:
- plain causal prefill (no window, sinks, pattern): the fused kernel with `is_causal=True` over the
  prefix (full) plus the diagonal square, so its speed is the kernel's;
- small Tq (decode): one query block spanning all queries, key runs unsplit: one or two calls, no
  Python loop over blocks;
- sliding window (+ sinks): every query block sees the same relative key layout, so all blocks away
  from the edges run as one batched call over overlapping `as_strided` key views (no copy) with one
  shared mask, plus one call for the sinks (`_window_batched`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from .merge import merge_attention
from .patterns import BlockPattern

__all__ = ["attention", "DEFAULT_CHUNK", "SMALL_TQ"]

DEFAULT_CHUNK = 256
SMALL_TQ = 16  # at or below this many queries: one query block, no loop over key blocks
WINDOW_BLOCK = 64  # query block of the batched sliding window: keys per call w + 64


@dataclass(frozen=True)
class _Spec:
    causal: bool
    q_offset: int
    window: int | None
    sinks: int
    pattern: BlockPattern | None
    scale: float
    tk: int

    @property
    def plain(self) -> bool:
        return self.window is None and self.pattern is None


@dataclass(frozen=True)
class _Segment:
    """Keys `[j0, j1)` for one query block; `mask` `[bq, j1 - j0]` bool, or None when all visible."""

    j0: int
    j1: int
    mask: torch.Tensor | None

    @property
    def index(self) -> slice:
        return slice(self.j0, self.j1)


@dataclass(frozen=True)
class _GatherSegment:
    """Keys `k[:, :, index]` (a slice or an index tensor); `mask` `[bq, n]` bool, or None: all visible."""

    index: slice | torch.Tensor
    mask: torch.Tensor | None


# --------------------------------------------------------------------------------------- the kernel
def _fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, is_causal: bool = False,
           attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention returning (out, lse); q `[B, H, Tq, D]`, k/v `[B, H, Tk, D]` (same H)."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=attn_mask, scale=scale)
    if q.device.type == "cuda" and q.dtype in CUDA_KERNEL_DTYPES and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0:
        return _fused_cuda(q, k, v, scale=scale, is_causal=is_causal, attn_mask=attn_mask)
    return _matmul_attention(q, k, v, scale=scale, is_causal=is_causal, attn_mask=attn_mask)


CUDA_KERNEL_DTYPES = (torch.float16, torch.bfloat16)  # fp32/fp64 take the exact portable tile
MASK_ALIGN = 16  # the memory-efficient kernel reads the bias in rows aligned to 16 elements


def _fused_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, is_causal: bool,
                attn_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA kernels that return the lse: FlashAttention-2 without a mask, the memory-efficient
    kernel with an additive mask. Both are O(Tq + Tk) in memory; both need D a multiple of 8."""
    b, h, tq, d = q.shape
    tk = k.shape[2]
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if attn_mask is None:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False,
                                                                      scale=scale)[:2]
    else:
        bias = None
        if attn_mask is not None:
            pad = -tk % MASK_ALIGN
            m = attn_mask.to(q.dtype)
            m = torch.nn.functional.pad(m, (0, pad))[..., :tk] if pad else m.contiguous()
            bias = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape)).expand(b, h, tq, tk)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, is_causal,
                                                                          scale=scale)[:2]
        lse = lse[..., :tq]
    if attn_mask is not None or tk == 0:  # a query that sees no key: out 0, lse -inf (the contract)
        dead = ~torch.isfinite(lse)
        out = out.masked_fill(dead[..., None], 0.0)
        lse = lse.masked_fill(dead, float("-inf"))
    return out, lse


def _flash_window_ok(q: torch.Tensor, spec: _Spec) -> bool:
    """A sliding window (with sinks) that FlashAttention-2's own window runs: CUDA fp16/bf16, no
    pattern, and every query's own position among the keys (keys `[0, q_offset + Tq)` at least)."""
    return (q.device.type == "cuda" and q.dtype in CUDA_KERNEL_DTYPES and q.shape[-1] <= 256
            and q.shape[-1] % 8 == 0 and spec.window is not None and spec.pattern is None
            and spec.q_offset >= 0 and spec.tk >= spec.q_offset + q.shape[2])


def _flash_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: _Spec
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Window keys `(p - w, p]` past the sinks in one flash call, sinks `j < s` (and `j <= p`) in
    another, merged by lse. Flash aligns its causal mask bottom-right, so with the keys cut at
    `q_offset + Tq`, query i sees key j <= q_offset + i exactly."""
    b, hq, tq, d = q.shape
    hkv = k.shape[1]
    s, w, end = spec.sinks, spec.window, spec.q_offset + tq
    assert w is not None
    parts: list[tuple[torch.Tensor, torch.Tensor]] = []
    if end > s:
        qt = q.transpose(1, 2)  # [B, Tq, Hq, D]: flash's layout; Hq a multiple of Hkv is native
        kt, vt = (x[:, :, s:end].transpose(1, 2) for x in (k, v))
        out, lse = torch.ops.aten._flash_attention_forward(
            qt, kt, vt, None, None, tq, end - s, 0.0, True, False, scale=spec.scale,
            window_size_left=w - 1, window_size_right=0)[:2]
        parts.append((out.transpose(1, 2), lse))
    if s:
        hi = min(s, end)
        mask = None
        if spec.q_offset < hi - 1:  # early queries see only the sinks at or before them
            j = torch.arange(hi, device=q.device)[None, :]
            p = torch.arange(spec.q_offset, end, device=q.device)[:, None]
            mask = _additive(j <= p, q.dtype, hq // hkv)
        o, l = _fused(_group(q, hkv), k[:, :, :hi], v[:, :, :hi], scale=spec.scale, attn_mask=mask)
        parts.append((_ungroup(o, hq), _ungroup(l, hq)))
    out, lse = parts[0]
    lse = lse.float()
    dead = ~torch.isfinite(lse)  # flash marks a row with no key by lse +inf: out 0, lse -inf
    out, lse = out.masked_fill(dead[..., None], 0.0), lse.masked_fill(dead, float("-inf"))
    for o, l in parts[1:]:
        out, lse = merge_attention(out, lse, o, l)
    return out, lse


def _matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, is_causal: bool,
                      attn_mask: torch.Tensor | None, rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Portable tile: scores, softmax, values, `rows` queries at a time (memory O(rows * Tk));
    used where no lse-returning kernel serves (fp64 off the CPU, other devices)."""
    tq, tk = q.shape[-2], k.shape[-2]
    if tq > rows:
        parts = []
        for i0 in range(0, tq, rows):
            i1 = min(i0 + rows, tq)
            mask = None if attn_mask is None else attn_mask[..., i0:i1, :]
            if is_causal:  # top-left aligned: query i sees keys j <= i
                tri = torch.zeros(i1 - i0, tk, dtype=q.dtype, device=q.device).masked_fill_(
                    torch.arange(tk, device=q.device)[None, :] > torch.arange(i0, i1, device=q.device)[:, None],
                    float("-inf"))
                mask = tri if mask is None else mask + tri
            parts.append(_matmul_attention(q[..., i0:i1, :], k, v, scale=scale, is_causal=False, attn_mask=mask,
                                           rows=rows))
        return torch.cat([o for o, _ in parts], dim=-2), torch.cat([l for _, l in parts], dim=-1)
    s = (q @ k.transpose(-1, -2)).to(torch.float64 if q.dtype == torch.float64 else torch.float32) * scale
    if is_causal:
        s = s.masked_fill(torch.ones(tq, tk, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    if attn_mask is not None:
        s = s + attn_mask.float()
    lse = torch.logsumexp(s, dim=-1)
    lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(s - lse_safe[..., None])
    return (p.to(v.dtype) @ v), lse


def _additive(mask: torch.Tensor, dtype: torch.dtype, g: int) -> torch.Tensor:
    """Bool `[bq, L]` -> additive `[G * bq, L]` in `dtype` (0 visible, -inf hidden)."""
    add = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return add.repeat(g, 1) if g > 1 else add


# --------------------------------------------------------------------------------------- the plan
def _tile_mask(spec: _Spec, p0: int, p1: int, j0: int, j1: int, device: torch.device) -> torch.Tensor:
    """Token-level visibility `[p1 - p0, j1 - j0]` for absolute query positions and key indices."""
    p = torch.arange(p0, p1, device=device)[:, None]
    j = torch.arange(j0, j1, device=device)[None, :]
    if spec.plain:
        m = torch.ones(p1 - p0, j1 - j0, dtype=torch.bool, device=device)
    else:
        m = torch.zeros(p1 - p0, j1 - j0, dtype=torch.bool, device=device)
        if spec.window is not None:
            m |= (j > p - spec.window) & (j <= p)
        if spec.sinks:
            m |= j < spec.sinks
        if spec.pattern is not None:
            m |= spec.pattern.token_mask(p[:, 0].cpu(), j[0].cpu()).to(device)
    if spec.causal:
        m &= j <= p
    return m


def _classify(spec: _Spec, p0: int, p1: int, bk: int) -> list[int]:
    """Per key block of size `bk`: 2 full, 1 partial, 0 hidden, for queries at `[p0, p1)`."""
    nkb = -(-spec.tk // bk)
    j0 = torch.arange(nkb) * bk
    j1 = torch.clamp(j0 + bk, max=spec.tk)
    last = p1 - 1
    if spec.plain:
        full = torch.ones(nkb, dtype=torch.bool)
        anyv = torch.ones(nkb, dtype=torch.bool)
    else:
        full = torch.zeros(nkb, dtype=torch.bool)
        anyv = torch.zeros(nkb, dtype=torch.bool)
        if spec.window is not None:
            w = spec.window
            full |= (j0 >= last - w + 1) & (j1 - 1 <= p0)
            anyv |= (j1 - 1 > p0 - w) & (j0 <= last)
        if spec.sinks:
            full |= j1 <= spec.sinks
            anyv |= j0 < spec.sinks
        if spec.pattern is not None:
            bs = spec.pattern.block_size
            qbs = torch.arange(p0 // bs, last // bs + 1) if p1 > p0 else torch.zeros(0, dtype=torch.long)
            admitted = spec.pattern.block_mask(qbs, -(-spec.tk // bs))  # [nqb, nkb_pattern]
            # key block kb of size bk covers pattern blocks [j0 // bs, (j1 - 1) // bs]
            pat_any_cols = admitted.any(0)
            pat_all_cols = admitted.all(0)
            kb_first, kb_last = j0 // bs, (j1 - 1) // bs
            cum_any = torch.cat([torch.zeros(1, dtype=torch.long), pat_any_cols.long().cumsum(0)])
            cum_all = torch.cat([torch.zeros(1, dtype=torch.long), pat_all_cols.long().cumsum(0)])
            span = kb_last - kb_first + 1
            anyv |= (cum_any[kb_last + 1] - cum_any[kb_first]) > 0
            full |= (cum_all[kb_last + 1] - cum_all[kb_first]) == span
    if spec.causal:
        full &= j1 - 1 <= p0
        anyv &= j0 <= last
    return (anyv.long() + (full & anyv).long()).tolist()


def _segments(spec: _Spec, p0: int, p1: int, bk: int, device: torch.device,
              split_full: int | None = None) -> list[_Segment]:
    """Key segments for queries at `[p0, p1)`: runs of full blocks (split every `split_full` keys)
    and masked partial blocks (the tile-by-tile passes: key mass, backward)."""
    segs: list[_Segment] = []
    run_start: int | None = None
    for kb, c in enumerate(_classify(spec, p0, p1, bk)):
        j0, j1 = kb * bk, min((kb + 1) * bk, spec.tk)
        if c == 2:
            if run_start is None:
                run_start = j0
            if split_full is not None and j1 - run_start >= split_full:
                segs.append(_Segment(run_start, j1, None))
                run_start = None
            continue
        if run_start is not None:
            segs.append(_Segment(run_start, j0, None))
            run_start = None
        if c == 1:
            m = _tile_mask(spec, p0, p1, j0, j1, device)
            if m.any():
                segs.append(_Segment(j0, j1, m))
    if run_start is not None:
        segs.append(_Segment(run_start, spec.tk, None))
    return segs


# ------------------------------------------------------------------------------------- query blocks
def _group(qb: torch.Tensor, hkv: int) -> torch.Tensor:
    """`[B, Hq, bq, D]` -> `[B, Hkv, G * bq, D]` (query heads of one KV head side by side)."""
    b, hq, bq, d = qb.shape
    return qb.reshape(b, hkv, (hq // hkv) * bq, d)


def _ungroup(x: torch.Tensor, hq: int) -> torch.Tensor:
    """`[B, Hkv, G * bq, ...]` -> `[B, Hq, bq, ...]`."""
    b, hkv, gbq = x.shape[:3]
    return x.reshape(b, hq, gbq // (hq // hkv), *x.shape[3:])


def _take(x: torch.Tensor, index: slice | torch.Tensor) -> torch.Tensor:
    """Keys `x[:, :, index]`: a view for a slice, one gather for an index tensor."""
    return x[:, :, index] if isinstance(index, slice) else x.index_select(2, index)


def _query_block(qb: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: _Spec,
                 segs: list[_Segment] | list[_GatherSegment]) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query block `[B, Hq, bq, D]` over its segments -> (out, lse `[B, Hq, bq]`)."""
    b, hq, bq, d = qb.shape
    hkv = k.shape[1]
    g = hq // hkv
    qg = _group(qb, hkv)
    out: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    for seg in segs:
        ks, vs = _take(k, seg.index), _take(v, seg.index)
        if seg.mask is None:
            o, l = _fused(qg, ks, vs, scale=spec.scale)
        else:
            o, l = _fused(qg, ks, vs, scale=spec.scale, attn_mask=_additive(seg.mask, qb.dtype, g))
            empty = ~seg.mask.any(1)
            if bool(empty.any()):  # the kernel reports lse 0 for rows with no visible key
                l = l.masked_fill(empty.repeat(g), float("-inf"))
        if out is None:  # accumulate in fp32 even for bf16/fp16 inputs
            out, lse = (o if o.dtype == torch.float64 else o.float()), l
        else:
            out, lse = merge_attention(out, lse, o, l)
    if out is None:
        return qb.new_zeros(qb.shape), torch.full((b, hq, bq), float("-inf"), device=qb.device,
                                                  dtype=torch.float64 if qb.dtype == torch.float64 else torch.float32)
    lse_dtype = torch.float64 if qb.dtype == torch.float64 else torch.float32
    return _ungroup(out, hq).to(qb.dtype), _ungroup(lse, hq).to(lse_dtype)


def _causal_prefix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: _Spec
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain causal, q_offset >= 0: keys before the queries are all visible; the diagonal is causal."""
    b, hq, tq, d = q.shape
    hkv = k.shape[1]
    off = spec.q_offset
    diag_end = min(spec.tk, off + tq)
    parts: list[tuple[torch.Tensor, torch.Tensor]] = []
    if off > 0:
        o, l = _fused(_group(q, hkv), k[:, :, :off], v[:, :, :off], scale=spec.scale)
        parts.append((_ungroup(o, hq), _ungroup(l, hq)))
    if diag_end > off:
        parts.append(_causal_square(q, k[:, :, off:diag_end], v[:, :, off:diag_end], spec.scale))
    if not parts:
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return q.new_zeros(q.shape), torch.full((b, hq, tq), float("-inf"), dtype=lse_dtype, device=q.device)
    out, lse = parts[0]
    for o, l in parts[1:]:
        out, lse = merge_attention(out, lse, o, l)
    return out, lse


def _causal_square(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal (top-left aligned) fused call with GQA: the KV head is broadcast with a zero stride."""
    b, hq, tq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    if g == 1:
        return _fused(q, k, v, scale=scale, is_causal=True)
    outs, lses = [], []
    for i in range(b):  # [G, Hkv, T, D] views: query heads regrouped, K/V expanded without a copy
        qi = q[i].reshape(hkv, g, tq, d).transpose(0, 1)
        ki = k[i].unsqueeze(0).expand(g, *k.shape[1:])
        vi = v[i].unsqueeze(0).expand(g, *v.shape[1:])
        o, l = _fused(qi, ki, vi, scale=scale, is_causal=True)
        outs.append(o.transpose(0, 1).reshape(hq, tq, d))
        lses.append(l.transpose(0, 1).reshape(hq, tq))
    return torch.stack(outs), torch.stack(lses)


# ------------------------------------------------------------------------------------------ key mass
def _key_mass(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, spec: _Spec, bq: int, bk: int
              ) -> torch.Tensor:
    """Per query head, the probability each key received summed over queries: `[B, Hq, Tk]`.

    A second blockwise pass with the final lse: `exp(q.k * scale - lse)` over visible tiles only.
    """
    b, hq, tq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    mass = torch.zeros(b, hkv, g, spec.tk, dtype=work, device=q.device)
    lse_safe = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse).to(work)
    for i0, i1 in _query_ranges(spec.q_offset, tq, bq):
        p0, p1 = spec.q_offset + i0, spec.q_offset + i1
        qg = _group(q[:, :, i0:i1], hkv).to(work)
        lg = _group(lse_safe[:, :, i0:i1, None], hkv)  # [B, Hkv, G*bq, 1]
        for seg in _segments(spec, p0, p1, bk, q.device, split_full=bk):
            s = qg @ k[:, :, seg.j0:seg.j1].to(work).transpose(-1, -2) * spec.scale
            p = torch.exp(s - lg)  # rows with no key: exp(-inf) = 0
            if seg.mask is not None:
                p = p.masked_fill(~seg.mask.repeat(g, 1), 0.0)
            mass[..., seg.j0:seg.j1] += p.reshape(b, hkv, g, i1 - i0, -1).sum(3)
    return mass.reshape(b, hq, spec.tk)


def _query_ranges(q_offset: int, tq: int, bq: int) -> list[tuple[int, int]]:
    """Query index ranges whose absolute positions are aligned to multiples of `bq`."""
    if tq <= SMALL_TQ:
        return [(0, tq)] if tq else []
    bounds = [0]
    first = (-q_offset) % bq or bq
    i = min(first, tq)
    while i < tq:
        bounds.append(i)
        i += bq
    bounds.append(tq)
    return list(zip(bounds[:-1], bounds[1:]))


# -------------------------------------------------------------------------------------- public API
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, q_offset: int = 0,
              window: int | None = None, sinks: int = 0, pattern: BlockPattern | None = None,
              scale: float | None = None, chunk_size: int | None = None, return_lse: bool = False,
              return_key_mass: bool = False, checkpoint: bool = False):
    """Exact attention of q `[B, Hq, Tq, D]` over k/v `[B, Hkv, Tk, D]` (Hq a multiple of Hkv).

    Query `i` sits at absolute position `q_offset + i`, key `j` at `j`. `causal`: keys `j <= pos`;
    `window=w`: keys in `(pos - w, pos]`; `sinks=s`: keys `j < s` stay visible as well; `pattern`: a
    block pattern (`patterns.py`) united with window and sinks. Causality intersects everything.

    `chunk_size` is the query/key block size (default 256; a pattern uses its own `block_size`).
    `checkpoint=True` recomputes each query block in backward (`torch.utils.checkpoint`).

    Returns `out` `[B, Hq, Tq, D]` in q's dtype, or `(out, lse?, key_mass?)` with the requested
    extras: lse `[B, Hq, Tq]` and key_mass `[B, Hq, Tk]` (per query head, the attention probability
    each key received summed over this call's queries; sum the G heads of a KV head for a per-KV-head
    score), both fp32 (fp64 for fp64 inputs). A query that sees no key gets out 0 and lse -inf.
    """
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B, Hq, Tq, D] and k, v [B, Hkv, Tk, D]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != d or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree (batch, head dim, or Hq % Hkv)")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if sinks < 0:
        raise ValueError(f"sinks must be >= 0, got {sinks}")
    spec = _Spec(causal=causal, q_offset=q_offset, window=window, sinks=sinks if window or pattern else 0,
                 pattern=pattern, scale=1.0 / math.sqrt(d) if scale is None else float(scale), tk=tk)
    if pattern is not None:
        bq = bk = pattern.block_size
    else:
        bq = bk = chunk_size or DEFAULT_CHUNK
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not grad and spec.plain and 0 < tq <= SMALL_TQ and tk > 0 and q_offset >= 0:
        out, lse = _decode(q, k, v, spec)
    elif not grad:
        out, lse = _forward(q, k, v, spec, bq, bk)
    elif checkpoint:  # per query block: only the inputs are kept; the block is recomputed in backward
        outs, lses = [], []
        for i0, i1 in _query_ranges(q_offset, tq, bq):
            sub = _shift(spec, i0)
            o, l = _checkpoint(_Attention.apply, q[:, :, i0:i1], k, v, sub, bq, bk, use_reentrant=False)
            outs.append(o)
            lses.append(l)
        out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)
    else:
        out, lse = _Attention.apply(q, k, v, spec, bq, bk)
    lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    extras: list[torch.Tensor] = []
    if return_lse:
        extras.append(lse)
    if return_key_mass:
        with torch.no_grad():
            extras.append(_key_mass(q.detach(), k.detach(), lse.detach(), spec, bq, bk))
    return (out, *extras) if extras else out


def _blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: _Spec, bq: int, bk: int,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked attention (window, sinks, pattern) planned per query block."""
    tq = q.shape[2]
    if _flash_window_ok(q, spec):
        return _flash_window(q, k, v, spec)
    if tq <= SMALL_TQ:  # decode-sized: key runs stay whole (one call per run)
        p0, p1 = spec.q_offset, spec.q_offset + tq
        segs = _split_small(spec, p0, p1, q.device) if spec.pattern is None else _segments(spec, p0, p1, bk, q.device)
        return _query_block(q, k, v, spec, segs)
    if spec.window is not None and spec.pattern is None:
        batched = _window_batched(q, k, v, spec, min(bq, WINDOW_BLOCK, max(spec.window, SMALL_TQ)))
        if batched is not None:
            return batched
    outs, lses = [], []
    for i0, i1 in _query_ranges(spec.q_offset, tq, bq):
        o, l = _gathered_block(q[:, :, i0:i1], k, v, spec, spec.q_offset + i0, bk)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _token_index(blocks: list[int], bk: int, tk: int, device: torch.device) -> torch.Tensor | slice:
    """Key indices of `blocks` (ascending); a slice (a view, no copy) when they are consecutive."""
    j0, j1 = blocks[0] * bk, min((blocks[-1] + 1) * bk, tk)
    if blocks[-1] - blocks[0] + 1 == len(blocks):
        return slice(j0, j1)
    starts = torch.tensor(blocks, device=device) * bk
    idx = (starts[:, None] + torch.arange(bk, device=device)[None, :]).flatten()
    return idx[idx < tk]


def _gathered_block(qb: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: _Spec, p0: int, bk: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One query block `[B, Hq, bq, D]` at absolute `p0`: its fully visible key blocks gathered into
    one unmasked call, its partial blocks into one masked call, merged by lse. Two kernel calls at
    most, whatever the pattern's layout."""
    p1 = p0 + qb.shape[2]
    codes = _classify(spec, p0, p1, bk)
    full = [kb for kb, c in enumerate(codes) if c == 2]
    partial = [kb for kb, c in enumerate(codes) if c == 1]
    segs: list[_GatherSegment] = []
    if full:
        segs.append(_GatherSegment(_token_index(full, bk, spec.tk, qb.device), None))
    if partial:
        mask = torch.cat([_tile_mask(spec, p0, p1, kb * bk, min((kb + 1) * bk, spec.tk), qb.device)
                          for kb in partial], dim=1)
        if bool(mask.any()):
            segs.append(_GatherSegment(_token_index(partial, bk, spec.tk, qb.device), mask))
    return _query_block(qb, k, v, spec, segs)


def _window_batched(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: _Spec, bq: int
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Sliding window (+ sinks) as a few batched kernel calls, no Python loop over query blocks.

    Every query block `[p0, p0 + bq)` far enough from the start sees keys `(p0 - w, p0 + bq)` through
    the same relative mask (`p0 - w < j`, `j - p0 <= a`, `a` the row), so all such blocks run as one
    call over `[num_blocks, Hkv, ...]` views: queries regrouped, keys an overlapping `as_strided`
    view (no copy) with one shared `[G * bq, w + bq]` mask. Sinks are one unmasked call over
    `k[:, :, :sinks]`, merged by lse (disjoint from every window here). The few blocks near the
    start or end go through the general per-block plan. None when there is nothing to batch.
    """
    b, hq, tq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    w, off = spec.window, spec.q_offset
    assert w is not None
    first = max(w, w + spec.sinks - 1, off)  # keys start at p0 - w >= 0 and never meet the sinks
    first = -(-first // bq) * bq  # aligned to absolute multiples of bq
    last = min(off + tq, spec.tk) // bq * bq  # exclusive end of the batched queries (keys p0 + bq <= tk)
    nb = (last - first) // bq
    if nb < 2 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return None
    i_lo, i_hi = first - off, last - off
    span = w + bq
    a = torch.arange(bq, device=q.device)[:, None]
    r = torch.arange(span, device=q.device)[None, :]
    mask = _additive((r > a) & (r <= a + w), q.dtype, g)  # [G * bq, w + bq]
    qr = q[:, :, i_lo:i_hi]
    outs, lses = [], []
    for i in range(b):  # [nb, Hkv, G * bq, D]: block-major query groups
        qi = qr[i].reshape(hkv, g, nb, bq, d).permute(2, 0, 1, 3, 4).reshape(nb, hkv, g * bq, d)
        kv = [x[i].as_strided((nb, hkv, span, d), (bq * x.stride(2), x.stride(1), x.stride(2), 1),
                              x[i].storage_offset() + (first - w) * x.stride(2)) for x in (k, v)]
        o, l = _fused(qi, kv[0], kv[1], scale=spec.scale, attn_mask=mask)
        outs.append(o.reshape(nb, hkv, g, bq, d).permute(1, 2, 0, 3, 4).reshape(hq, nb * bq, d))
        lses.append(l.reshape(nb, hkv, g, bq).permute(1, 2, 0, 3).reshape(hq, nb * bq))
    out, lse = torch.stack(outs), torch.stack(lses)
    if spec.sinks:
        o, l = _fused(_group(qr, hkv), k[:, :, :spec.sinks], v[:, :, :spec.sinks], scale=spec.scale)
        out, lse = merge_attention(out.float() if out.dtype != torch.float64 else out, lse,
                                   _ungroup(o, hq), _ungroup(l, hq))
    parts = []
    if i_lo > 0:
        parts.append(_blocks(q[:, :, :i_lo], k, v, spec, bq, bq))
    parts.append((out.to(q.dtype), lse))
    if i_hi < tq:
        parts.append(_blocks(q[:, :, i_hi:], k, v, _shift(spec, i_hi), bq, bq))
    return torch.cat([o for o, _ in parts], dim=2), torch.cat([l.to(lse.dtype) for _, l in parts], dim=2)


def _split_small(spec: _Spec, p0: int, p1: int, device: torch.device) -> list[_Segment]:
    """Decode-sized query block: the sink run and the window/causal run as (at most) two calls."""
    last = p1 - 1
    causal_hi = min(spec.tk, last + 1)
    if spec.plain:
        runs = [(0, causal_hi if spec.causal else spec.tk)]
    else:  # a window (no pattern here): it looks backwards, sinks obey causality only if asked
        lo, hi = max(0, p0 - spec.window + 1), causal_hi
        sink_hi = min(spec.sinks, causal_hi if spec.causal else spec.tk)
        if sink_hi > 0 and lo > sink_hi:
            runs = [(0, sink_hi), (lo, hi)]
        elif sink_hi > 0:
            runs = [(0, max(hi, sink_hi))]
        else:
            runs = [(lo, hi)]
    segs = []
    for j0, j1 in runs:
        if j1 <= j0:
            continue
        if _run_is_full(spec, p0, p1, j0, j1):
            segs.append(_Segment(j0, j1, None))
            continue
        m = _tile_mask(spec, p0, p1, j0, j1, device)
        if bool(m.any()):
            segs.append(_Segment(j0, j1, m))
    return segs


def _run_is_full(spec: _Spec, p0: int, p1: int, j0: int, j1: int) -> bool:
    """Whether every query at `[p0, p1)` sees every key in `[j0, j1)` (no pattern)."""
    if spec.causal and j1 - 1 > p0:
        return False
    if spec.plain:
        return True
    in_window = spec.window is not None and j0 >= p1 - spec.window and j1 - 1 <= p0
    return in_window or j1 <= spec.sinks


def _decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: _Spec) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode hot path (plain mask, few queries after a cache): one fused call over the visible
    prefix; a mask only when several causal queries see different prefixes."""
    b, hq, tq, d = q.shape
    hkv = k.shape[1]
    hi = min(spec.tk, spec.q_offset + tq) if spec.causal else spec.tk
    mask = None
    if spec.causal and spec.q_offset + 1 < hi:  # query i sees keys j <= q_offset + i
        j = torch.arange(hi, device=q.device)[None, :]
        p = torch.arange(spec.q_offset, spec.q_offset + tq, device=q.device)[:, None]
        mask = _additive(j <= p, q.dtype, hq // hkv)
    o, l = _fused(_group(q, hkv), k[:, :, :hi], v[:, :, :hi], scale=spec.scale, attn_mask=mask)
    return _ungroup(o, hq), _ungroup(l, hq).to(torch.float64 if q.dtype == torch.float64 else torch.float32)


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: _Spec, bq: int, bk: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward dispatch (no autograd): empty, plain causal prefill, plain full, or planned blocks."""
    b, hq, tq, _ = q.shape
    hkv = k.shape[1]
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if tq == 0 or spec.tk == 0:
        out = q.new_zeros(q.shape)
        lse = torch.full((b, hq, tq), float("-inf"), dtype=lse_dtype, device=q.device)
    elif spec.plain and spec.causal and spec.q_offset >= 0 and tq > SMALL_TQ:
        out, lse = _causal_prefix(q, k, v, spec)
    elif spec.plain and not spec.causal:
        o, l = _fused(_group(q, hkv), k, v, scale=spec.scale)
        out, lse = _ungroup(o, hq), _ungroup(l, hq)
    else:
        out, lse = _blocks(q, k, v, spec, bq, bk)
    return out, lse.to(lse_dtype)


def _shift(spec: _Spec, i0: int) -> _Spec:
    """The spec of the query sub-range starting at query index `i0`."""
    return _Spec(causal=spec.causal, q_offset=spec.q_offset + i0, window=spec.window, sinks=spec.sinks,
                 pattern=spec.pattern, scale=spec.scale, tk=spec.tk)


class _Attention(torch.autograd.Function):
    """Exact attention with a FlashAttention-2 style blockwise backward.

    The fused kernel's lse carries no gradient, and the lse merge needs one, so the whole operator
    has its own backward: per query block and key tile (at most `[G * bq, bk]` scores), recompute
    `P = exp(s - lse)` with the final lse, then `dV += P^T dO`, `dS = P * (dO V^T - rowsum(dO * O) + dlse)`,
    `dQ += dS K * scale`, `dK += dS^T Q * scale`. Only q, k, v, out and lse are saved: O(T * D).
    """

    @staticmethod
    def forward(ctx, q, k, v, spec, bq, bk):  # type: ignore[override]
        out, lse = _forward(q, k, v, spec, bq, bk)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec, ctx.bq, ctx.bk = spec, bq, bk
        return out, lse

    @staticmethod
    def backward(ctx, g_out, g_lse):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, out, lse, g_out, g_lse, ctx.spec, ctx.bq, ctx.bk)
        return dq, dk, dv, None, None, None


def _backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
              g_out: torch.Tensor | None, g_lse: torch.Tensor | None, spec: _Spec, bq: int, bk: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, hq, tq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.zeros(q.shape, dtype=work, device=q.device)
    dk = torch.zeros(k.shape, dtype=work, device=k.device)
    dv = torch.zeros(v.shape, dtype=work, device=v.device)
    if g_out is None:
        g_out = torch.zeros_like(out)
    lse_safe = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse).to(work)
    delta = (g_out.to(work) * out.to(work)).sum(-1)  # [B, Hq, Tq]
    if g_lse is not None:
        delta = delta - torch.where(torch.isinf(lse), torch.zeros_like(delta), g_lse.to(work))
    kw, vw = k.to(work), v.to(work)
    for i0, i1 in _query_ranges(spec.q_offset, tq, bq):
        p0, p1 = spec.q_offset + i0, spec.q_offset + i1
        qg = _group(q[:, :, i0:i1], hkv).to(work)
        dog = _group(g_out[:, :, i0:i1], hkv).to(work)
        lg = _group(lse_safe[:, :, i0:i1, None], hkv)
        dg = _group(delta[:, :, i0:i1, None], hkv)
        dqg = torch.zeros_like(qg)
        for seg in _segments(spec, p0, p1, bk, q.device, split_full=bk):
            ks, vs = kw[:, :, seg.j0:seg.j1], vw[:, :, seg.j0:seg.j1]
            p = torch.exp(qg @ ks.transpose(-1, -2) * spec.scale - lg)
            if seg.mask is not None:
                p = p.masked_fill(~seg.mask.repeat(g, 1), 0.0)
            dv[:, :, seg.j0:seg.j1] += p.transpose(-1, -2) @ dog
            ds = p * (dog @ vs.transpose(-1, -2) - dg)
            dqg += ds @ ks
            dk[:, :, seg.j0:seg.j1] += ds.transpose(-1, -2) @ qg
        dq[:, :, i0:i1] = _ungroup(dqg, hq)
    return (dq * spec.scale).to(q.dtype), (dk * spec.scale).to(k.dtype), dv.to(v.dtype)
