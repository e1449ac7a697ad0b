"""Causal attention for prefill on the CPU (`attention.c`): T new queries at absolute positions
`q_offset .. q_offset + T - 1` against S cached keys, flash-style, fp32, AVX-512.

The plain reference with the same signature is `naive.causal_attention`.
"""

from __future__ import annotations

import math
import operator

import torch

from streamctx.operators.cpu import native
from streamctx.operators.cpu.kernels import _check_cpu_f32, _require

MAX_HEAD_DIM = 256  # attention.c: D % 16 == 0 and D <= 256


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int, scale: float,
                     return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal grouped-query attention of a chunk of T queries over S keys.

    q `[Hq, T, D]` (query i at absolute position `q_offset + i`; may be a strided view such as
    `qkv.view(T, H, D)[:, :Hq].transpose(0, 1)`); k, v `[Hkv, S, D]` (views with a row stride are
    fine). Query i sees keys `j <= q_offset + i` (j < S); query head h reads KV head
    `h // (Hq // Hkv)`. Returns out `[T, Hq, D]` contiguous (`.view(T, Hq * D)` for the output
    projection) and, with `return_lse`, lse `[Hq, T]` (natural log), both fp32. With S == 0
    every query sees no key: out 0, lse -inf.

    Each query's result depends only on its position, its q row and keys `0 .. q_offset + i`: it
    has the same bits at any thread count and whether the prefill runs whole or in chunks.
    """
    _require()
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_cpu_f32(name, t)
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"causal_attention needs q [Hq, T, D] and k, v [Hkv, S, D], got q {list(q.shape)}, "
                         f"k {list(k.shape)}, v {list(v.shape)}")
    hq, _, d = q.shape
    hkv, s, dk = k.shape
    if tuple(v.shape) != (hkv, s, d) or dk != d:
        raise ValueError(f"k and v must both be [Hkv, S, {d}] (D of q), got k {list(k.shape)} and v {list(v.shape)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if d % 16 or d == 0 or d > MAX_HEAD_DIM:
        raise ValueError(f"unsupported head dim D={d} (need D % 16 == 0 and 16 <= D <= {MAX_HEAD_DIM})")
    try:
        offset = operator.index(q_offset)
    except TypeError:
        offset = -1
    if isinstance(q_offset, bool) or offset < 0:
        raise ValueError(f"q_offset must be an int >= 0, got {q_offset!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return causal_attention_unchecked(q, k, v, offset, float(scale), return_lse)


def causal_attention_unchecked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int, scale: float,
                               return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`causal_attention` for callers that checked dtypes, devices and shapes (the model's prefill)."""
    if q.stride(2) != 1:
        q = q.contiguous()
    if k.stride(2) != 1:
        k = k.contiguous()
    if v.stride(2) != 1:
        v = v.contiguous()
    hq, t, d = q.shape
    hkv, s, _ = k.shape
    out = torch.empty(t, hq, d, dtype=torch.float32)
    lse = torch.empty(hq, t, dtype=torch.float32) if return_lse else None
    rc = native.library().sc_causal_attention(  # type: ignore[union-attr]
        q.data_ptr(), q.stride(1), q.stride(0), k.data_ptr(), k.stride(0), k.stride(1), v.data_ptr(), v.stride(0),
        v.stride(1), t, s, q_offset, hq, hkv, d, scale, out.data_ptr(), hq * d, d,
        None if lse is None else lse.data_ptr())
    if rc == -2:
        raise MemoryError("causal_attention: out of memory for the kernel's buffers")
    if rc != 0:
        raise ValueError(f"the kernel refused the shapes Hq={hq}, Hkv={hkv}, D={d}, q_offset={q_offset}")
    return (out, lse) if lse is not None else out
