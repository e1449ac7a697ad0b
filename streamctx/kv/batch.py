"""Batched cache writes for a decode step of many sessions, and keeping their tables contiguous.

A session whose layer is one consecutive run of blocks reads its keys as a zero-copy view; a
fragmented one pays a gather on every read (`SessionKV.kv`), which at decode costs more than the
attention itself. Sessions decoding together interleave their allocations, so every block
boundary would fragment them; `reserve_run` instead grows a layer's run in place when the next
blocks are free, or moves the layer once into a fresh run with headroom (a quarter of its size,
at least one block), so the copies amortize to O(1) per token. Moves copy values exactly.
"""

from __future__ import annotations

from typing import Sequence

import torch

from streamctx.kv.cache import LayerTable, SessionKV


def reserve_run(cache: SessionKV, layer: int, n: int) -> None:
    """Make room for `n` more tokens of `layer` inside one consecutive run of blocks."""
    t, pool = cache.layers[layer], cache.pool
    bs = pool.block_size
    need = -(-(t.length + n) // bs)
    if t.contiguous and len(t.blocks) >= need:
        return
    if t.contiguous and t.blocks:
        grow = need - len(t.blocks)
        run = pool.allocate_run(layer, grow, after=t.blocks[-1])
        if run[0] == t.blocks[-1] + 1:
            t.blocks.extend(run)
            t._slots = None
            return
        pool.release(layer, run)
    cap = need + max(1, need // 4)
    k, v = cache.kv(layer)
    pos, rpos = cache.positions(layer)
    run = pool.allocate_run(layer, cap)
    a = run[0] * bs
    pool.flat_k(layer)[:, a:a + t.length].copy_(k)
    pool.flat_v(layer)[:, a:a + t.length].copy_(v)
    pool.pos[layer].view(-1)[a:a + t.length].copy_(pos)
    pool.rope_pos[layer].view(-1)[a:a + t.length].copy_(rpos)
    pool.release(layer, t.blocks)
    cache.layers[layer] = LayerTable(blocks=run, length=t.length, next_rope=t.next_rope, contiguous=True)


def reserve_slots(caches: Sequence[SessionKV], layer: int, rope_positions: Sequence[int]) -> list[int]:
    """Take one slot for a new token in each cache's `layer` (kept a contiguous run) and count the
    token in the table; returns the flat pool slots, which the caller fills (k rotated, v and the
    two positions). `rope_positions`: the B RoPE positions (the caches' `next_rope`)."""
    bs = caches[0].pool.block_size
    slots = []
    for cache, rope in zip(caches, rope_positions):
        t = cache.layers[layer]
        if not (t.contiguous and t.length < len(t.blocks) * bs):  # the common case inline: room in the run
            reserve_run(cache, layer, 1)
            t = cache.layers[layer]
        slots.append(t.blocks[0] * bs + t.length)
        t.length += 1
        t.next_rope = rope + 1
        cache.n_new[layer] += 1
    return slots


def append_one_each(caches: Sequence[SessionKV], layer: int, k: torch.Tensor, v: torch.Tensor,
                    positions: torch.Tensor, rope_positions: Sequence[int]) -> None:
    """Append one token to each cache's `layer` with one write per tensor.

    k, v: `[B, Hkv, D]` (k rotated); positions: `[B]` int64 absolute positions; rope_positions:
    the B RoPE positions (the caches' `next_rope`). Leaves every layer a contiguous run.
    """
    pool = caches[0].pool
    idx = torch.tensor(reserve_slots(caches, layer, rope_positions), dtype=torch.int64, device=pool.device)
    pool.flat_k(layer).index_copy_(1, idx, k.transpose(0, 1))  # pool tensors fetched after any growth
    pool.flat_v(layer).index_copy_(1, idx, v.transpose(0, 1))
    pool.pos[layer].view(-1).index_copy_(0, idx, positions)
    pool.rope_pos[layer].view(-1).index_copy_(0, idx, torch.tensor(list(rope_positions), dtype=torch.int64,
                                                                   device=pool.device))
