"""The paged KV cache: block accounting, growth, fragmented gathers, and applying a policy's Keep."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from hypothesis import given
from hypothesis import strategies as st

from streamctx.kv import BlockPool, SessionKV
from streamctx.kv.apply import apply_policy, layer_view
from streamctx.model.rope import Rope, apply_rope, rerotate
from streamctx.operators.policies import CacheView, Keep, PolicyBase
from tests.tolerances import assert_close

L, H, D = 2, 3, 8


def rand(n: int, seed: int) -> torch.Tensor:
    return torch.randn(H, n, D, generator=torch.Generator().manual_seed(seed))


def append(cache: SessionKV, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    k, v = rand(n, seed), rand(n, seed + 10_000)
    pos = torch.arange(cache.n_fed, cache.n_fed + n)
    for layer in range(L):
        cache.append(layer, k, v, pos, pos)
    cache.n_fed += n
    return k, v


def test_block_accounting_and_bytes_are_live_tensor_bytes() -> None:
    pool = BlockPool(L, H, D, block_size=4, initial_blocks=2)
    a, b = SessionKV(pool), SessionKV(pool)
    append(a, 9, 0)
    append(b, 4, 1)
    assert a.blocks_used() == L * 3 and b.blocks_used() == L * 1
    assert pool.blocks_used() == L * 4
    per_block = sum(t.numel() * t.element_size() for t in (
        pool.k[0][:, 0], pool.v[0][:, 0], pool.pos[0][0], pool.rope_pos[0][0]))
    assert pool.block_nbytes() == per_block
    assert pool.nbytes_used() == a.nbytes() + b.nbytes() == L * 4 * per_block
    a.free()
    assert pool.blocks_used() == L * 1 and a.blocks_used() == 0
    b.free()
    assert pool.blocks_used() == 0 and pool.nbytes_used() == 0


@given(plan=st.lists(st.tuples(st.integers(0, 2), st.integers(1, 11)), min_size=1, max_size=12),
       block_size=st.sampled_from([1, 3, 4, 7]))
def test_interleaved_sessions_read_back_exactly(plan: list[tuple[int, int]], block_size: int) -> None:
    """Any interleaving (fragmented tables, pool growth) reads back the appended K/V bit for bit."""
    pool = BlockPool(L, H, D, block_size=block_size, initial_blocks=1)
    caches = [SessionKV(pool) for _ in range(3)]
    written: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[], [], []]
    for step, (who, n) in enumerate(plan):
        written[who].append(append(caches[who], n, step))
    for cache, parts in zip(caches, written):
        for layer in range(L):
            k, v = cache.kv(layer)
            pos, rope_pos = cache.positions(layer)
            if parts:
                assert torch.equal(k, torch.cat([p[0] for p in parts], dim=1))
                assert torch.equal(v, torch.cat([p[1] for p in parts], dim=1))
            assert torch.equal(pos, torch.arange(cache.n_fed)) and torch.equal(rope_pos, pos)
            blocks = pool.keys_blocks(layer)  # the block-major [num_blocks, Hkv, bs, D] view
            assert blocks.shape[1:] == (H, block_size, D)
            for i, blk in enumerate(cache.layers[layer].blocks):
                span = k[:, i * block_size:(i + 1) * block_size]
                assert torch.equal(blocks[blk][:, :span.shape[1]], span)
        assert cache.blocks_used() == L * math.ceil(cache.n_fed / block_size)


class SinkWindow(PolicyBase):
    """Toy StreamingLLM: keep `sinks` first + `window` last tokens, RoPE positions contiguous."""

    name: ClassVar[str] = "toy-sink-window"

    def __init__(self, sinks: int, window: int) -> None:
        self.sinks, self.window = sinks, window
        self.evicted_positions: list[torch.Tensor] = []

    def decide(self, view: CacheView) -> Keep:
        t = view.length
        if t <= self.sinks + self.window:
            return Keep()
        idx = torch.cat([torch.arange(self.sinks), torch.arange(t - self.window, t)])
        return Keep(indices=idx, rope_positions=torch.arange(idx.numel()))

    def evicted(self, layer: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        assert keys.shape[1] == values.shape[1] == positions.shape[0]
        if layer == 0:
            self.evicted_positions.append(positions.clone())

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "sinks": self.sinks, "window": self.window}


def test_keep_with_reassigned_positions_equals_rotating_raw_keys_there() -> None:
    """Contract 5 on the cache side: kept keys end up rotated exactly at the assigned positions."""
    rope = Rope(D, 10000.0)
    pool = BlockPool(L, H, D, block_size=4)
    cache = SessionKV(pool)
    raw = rand(23, 0)
    values = rand(23, 1)
    cos, sin = rope.cos_sin(range(0, 23))
    pos = torch.arange(23)
    for layer in range(L):
        cache.append(layer, apply_rope(raw, cos, sin), values, pos, pos)
    cache.n_fed = 23
    policy = SinkWindow(sinks=2, window=5)
    apply_policy(cache, policy, lambda k, d: rerotate(k, d, rope))
    keep = torch.tensor([0, 1, 18, 19, 20, 21, 22])
    c2, s2 = rope.cos_sin(range(0, 7))
    for layer in range(L):
        view = layer_view(cache, layer)
        assert torch.equal(view.positions, keep)
        assert torch.equal(view.rope_positions, torch.arange(7))
        assert_close(view.keys, apply_rope(raw[:, keep], c2, s2))
        assert torch.equal(view.values, values[:, keep])
        assert cache.layers[layer].next_rope == 7
    assert torch.equal(policy.evicted_positions[0], torch.arange(2, 18))
    assert cache.blocks_used() == L * 2  # 7 tokens in blocks of 4: the freed blocks went back
    assert pool.blocks_used() == L * 2
    # new tokens continue at RoPE position 7 and absolute position 23
    k_new, v_new = rand(1, 2), rand(1, 3)
    c7, s7 = rope.cos_sin(range(7, 8))
    cache.append(0, apply_rope(k_new, c7, s7), v_new, torch.tensor([23]), torch.tensor([7]))
    assert torch.equal(layer_view(cache, 0).positions[-1:], torch.tensor([23]))
