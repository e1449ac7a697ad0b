"""Apply a policy's `Keep` to a session cache (the cache side of DESIGN.md contract 5).

`rotate(keys [Hkv, T, D], delta [T]) -> keys` re-rotates stored keys by a RoPE position delta; the
model passes its own (the cache knows nothing of RoPE frequencies).
"""

from __future__ import annotations

from typing import Callable

import torch

from streamctx.kv.cache import SessionKV
from streamctx.operators.policies.base import CachePolicy, CacheView, Keep


def layer_view(cache: SessionKV, layer: int,
               rotate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> CacheView:
    """What a policy sees of one layer (views of the storage where it is contiguous)."""
    k, v = cache.kv(layer)
    pos, rope_pos = cache.positions(layer)
    return CacheView(layer=layer, keys=k, values=v, positions=pos, rope_positions=rope_pos,
                     key_mass=cache.key_mass[layer], n_new=cache.n_new[layer],
                     block_size=cache.pool.block_size, rotate=rotate)


def apply_keep(cache: SessionKV, layer: int, keep: Keep, policy: CachePolicy,
               rotate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """Evict what `keep` drops (after `policy.evicted` sees it), re-rotate re-positioned keys."""
    t = cache.layers[layer]
    cache.n_new[layer] = 0
    if keep.keeps_all:
        if keep.next_rope_position is not None:
            t.next_rope = keep.next_rope_position
        return
    k, v = cache.kv(layer)
    pos, rope_pos = cache.positions(layer)
    idx = keep.indices if keep.indices is not None else torch.arange(t.length, device=pos.device)
    idx = idx.to(device=pos.device, dtype=torch.int64)
    if idx.numel() and (idx[1:] <= idx[:-1]).any():
        raise ValueError(f"policy {policy.name!r} returned keep indices that are not strictly ascending")
    if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= t.length):
        raise ValueError(f"policy {policy.name!r} returned keep indices outside [0, {t.length})")
    dropped = torch.ones(t.length, dtype=torch.bool, device=pos.device)
    dropped[idx] = False
    if dropped.any():
        policy.evicted(layer, k[:, dropped], v[:, dropped], pos[dropped])
    k, v, pos, old_rope = k[:, idx], v[:, idx], pos[idx], rope_pos[idx]
    new_rope = old_rope if keep.rope_positions is None else keep.rope_positions.to(old_rope)
    if keep.rope_positions is not None and not torch.equal(new_rope, old_rope):
        k = rotate(k, new_rope - old_rope)
    if keep.next_rope_position is not None:
        next_rope = keep.next_rope_position
    else:
        next_rope = int(new_rope.max()) + 1 if new_rope.numel() else 0
    mass = cache.key_mass[layer]
    cache.rewrite(layer, k.contiguous(), v.contiguous(), pos.clone(), new_rope.clone(), next_rope)
    if mass is not None:
        cache.key_mass[layer] = mass[:, idx] if mass.shape[-1] == dropped.shape[0] else None


def apply_policy(cache: SessionKV, policy: CachePolicy,
               rotate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """Run `policy.decide` on every layer and apply it; unbounded policies (`full`) cost nothing."""
    if not policy.bounded:
        return
    cache.policy = policy
    for layer in range(cache.pool.num_layers):
        apply_keep(cache, layer, policy.decide(layer_view(cache, layer, rotate)), policy, rotate)
