"""Hierarchical attention: exact inside a local section, mean-pooled summaries of everything older.

Keys are grouped into blocks of `block_size` positions. A query in block `b` attends exactly (and
causally) to the keys of blocks `b - local_blocks + 1 .. b` (its local section). The older blocks
`[0, b - local_blocks + 1)` are seen only through summaries: a level-`l` node covers
`fanout ** l` aligned blocks and its summary key/value is the mean of their keys/values. Recent
history gets fine nodes, older history coarse ones (`summary_nodes`): at each level below the top
about `fanout` nodes are kept before moving one level up; the top level covers the rest.

A summary's score gets `+ log(tokens it covers)` (`count_bias=True`), so a node whose tokens share
one key weighs as much as those tokens would. The local part (blockwise exact attention) and the
summary part are combined exactly through the lse merge; the approximation lies only in the
summaries. The reference (`naive_hierarchical_attention`) is dense attention over the explicit
augmented key set: real keys plus every summary key, with the same visibility and bias.

Shapes: q `[B, Hq, Tq, D]`, k/v `[B, Hkv, Tk, D]`; query `i` sits at `q_offset + i`, key `j` at `j`.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from .blockwise import attention
from .merge import merge_attention
from .patterns import local_pattern

__all__ = ["hierarchical_attention", "naive_hierarchical_attention", "pool_summaries", "summary_nodes"]


@lru_cache(maxsize=4096)
def summary_nodes(num_blocks: int, fanout: int, levels: int) -> tuple[tuple[int, int], ...]:
    """Nodes `(level, index)` that tile blocks `[0, num_blocks)` exactly, fine near the end.

    Level `l` node `i` covers blocks `[i * fanout**l, (i + 1) * fanout**l)`. From the end backwards,
    each level below the top takes its nodes down to the first boundary of the next level that leaves
    at least `fanout` of them; the top level takes everything before.
    """
    nodes: list[tuple[int, int]] = []
    end = num_blocks
    for level in range(levels):
        size = fanout ** level
        start = 0 if level == levels - 1 else max(0, (end - fanout * size) // (size * fanout) * (size * fanout))
        nodes.extend((level, i) for i in range(end // size - 1, start // size - 1, -1))
        end = start
        if end == 0:
            break
    return tuple(reversed(nodes))


def pool_summaries(k: torch.Tensor, v: torch.Tensor, block_size: int, fanout: int, levels: int
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per level `l`: mean-pooled (keys, values) `[B, Hkv, Tk // (block_size * fanout**l), D]`
    over complete nodes only."""
    out = []
    b, h, t, d = k.shape
    for level in range(levels):
        span = block_size * fanout ** level
        n = t // span
        out.append(tuple(x[:, :, : n * span].reshape(b, h, n, span, d).mean(3) for x in (k, v)))
    return out


def _gather(pooled, nodes, block_size: int, fanout: int):
    """Summary keys/values `[B, Hkv, S, D]` and log token counts `[S]` for the given nodes."""
    ks, vs, logn = [], [], []
    for level, i in nodes:
        pk, pv = pooled[level]
        ks.append(pk[:, :, i])
        vs.append(pv[:, :, i])
        logn.append(math.log(block_size * fanout ** level))
    return torch.stack(ks, 2), torch.stack(vs, 2), torch.tensor(logn, dtype=torch.float64)


def hierarchical_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int,
                           local_blocks: int = 1, levels: int = 2, fanout: int = 4, q_offset: int = 0,
                           scale: float | None = None, count_bias: bool = True, return_lse: bool = False):
    """Local exact attention merged with summary attention; returns out (and lse `[B, Hq, Tq]`).

    Keys must cover every position up to the last query (a cache followed by the chunk).
    Differentiable (the summary part is plain autograd; the local part is the blockwise operator).
    """
    if block_size < 1 or local_blocks < 1 or levels < 1 or fanout < 2:
        raise ValueError(f"need block_size >= 1, local_blocks >= 1, levels >= 1, fanout >= 2; got "
                         f"{block_size}, {local_blocks}, {levels}, {fanout}")
    b, hq, tq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out, lse = attention(q, k, v, q_offset=q_offset, pattern=local_pattern(block_size, local_blocks),
                         scale=scale, return_lse=True)
    pooled = pool_summaries(k, v, block_size, fanout, levels)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    outs, lses = [], []
    i0 = 0
    while i0 < tq:  # one summary set per query block
        qb = (q_offset + i0) // block_size
        i1 = min(tq, (qb + 1) * block_size - q_offset)
        nodes = summary_nodes(max(0, qb - local_blocks + 1), fanout, levels)
        o_l, l_l = out[:, :, i0:i1], lse[:, :, i0:i1]
        if nodes:
            sk, sv, logn = _gather(pooled, nodes, block_size, fanout)
            qg = q[:, :, i0:i1].reshape(b, hkv, g * (i1 - i0), d).to(work)
            s = qg @ sk.to(work).transpose(-1, -2) * scale
            if count_bias:
                s = s + logn.to(s)
            l_s = torch.logsumexp(s, -1)
            o_s = torch.softmax(s, -1) @ sv.to(work)
            o_s = o_s.reshape(b, hq, i1 - i0, d).to(q.dtype)
            o_l, l_l = merge_attention(o_l, l_l, o_s, l_s.reshape(b, hq, i1 - i0))
        outs.append(o_l)
        lses.append(l_l)
        i0 = i1
    out = torch.cat(outs, 2) if outs else out
    lse = torch.cat(lses, 2) if lses else lse
    return (out, lse) if return_lse else out


def naive_hierarchical_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int,
                                 local_blocks: int = 1, levels: int = 2, fanout: int = 4, q_offset: int = 0,
                                 scale: float | None = None, count_bias: bool = True, return_lse: bool = False):
    """Reference: dense attention over real keys + all summary keys with an explicit mask `[Tq, Tk + S]`."""
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    pooled = pool_summaries(k.to(work), v.to(work), block_size, fanout, levels)
    all_nodes = [(lvl, i) for lvl, (pk, _) in enumerate(pooled) for i in range(pk.shape[2])]
    column = {node: c for c, node in enumerate(all_nodes)}
    keys = torch.cat([k.to(work)] + [pk for pk, _ in pooled], 2)
    vals = torch.cat([v.to(work)] + [pv for _, pv in pooled], 2)
    mask = torch.zeros(tq, tk + len(all_nodes), dtype=torch.bool)
    bias = torch.zeros(tk + len(all_nodes), dtype=work)
    for c, (lvl, _) in enumerate(all_nodes):
        bias[tk + c] = math.log(block_size * fanout ** lvl) if count_bias else 0.0
    for i in range(tq):
        p = q_offset + i
        qb = p // block_size
        first = max(0, qb - local_blocks + 1)
        mask[i, first * block_size: min(tk, p + 1)] = True
        for node in summary_nodes(first, fanout, levels):
            mask[i, tk + column[node]] = True
    s = q.to(work) @ keys.repeat_interleave(g, 1).transpose(-1, -2) * scale + bias
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    probs = torch.exp(s - torch.nan_to_num(lse, neginf=0.0)[..., None])
    out = (probs @ vals.repeat_interleave(g, 1)).to(q.dtype)
    return (out, lse) if return_lse else out
