"""The decode group's cache side: batched one-token appends and contiguous block runs
(`streamctx.kv.batch`, `BlockPool.allocate_run`) keep every session's contents exact."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from streamctx.kv import BlockPool, SessionKV
from streamctx.kv.batch import append_one_each, reserve_run

HKV, D = 2, 3


def _tok(seed: int) -> torch.Tensor:
    return torch.randn(HKV, 1, D, generator=torch.Generator().manual_seed(seed))


@given(ops=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 9)), min_size=1, max_size=60),
       block=st.sampled_from([1, 2, 3, 5]), layers=st.integers(1, 2))
def test_batched_appends_equal_plain_appends(ops, block, layers) -> None:
    """Random interleavings of plain appends (n tokens) and batched one-token appends of several
    sessions: each session's keys, values and positions are exactly what was appended, its layers
    are single runs after a batched append, and the pool's accounting adds up."""
    pool = BlockPool(layers, HKV, D, block_size=block, initial_blocks=1)
    caches = [SessionKV(pool) for _ in range(5)]
    want: list[list[tuple[torch.Tensor, int]]] = [[] for _ in caches]
    seed = 0
    for who, n in ops:
        if n == 0:  # a batched one-token append of sessions who..4
            group = caches[who:]
            ks = [_tok(seed + i) for i in range(len(group))]
            seed += len(group)
            for li in range(layers):
                pos = torch.tensor([c.n_fed for c in group])
                append_one_each(group, li, torch.stack([k[:, 0] for k in ks]), torch.stack([-k[:, 0] for k in ks]),
                                pos, [c.layers[li].next_rope for c in group])
            for c, k in zip(group, ks):
                want[caches.index(c)].append((k, c.n_fed))
                c.n_fed += 1
                assert all(t.contiguous for t in c.layers)
        else:  # a plain n-token append of one session (it may fragment)
            c = caches[who]
            for j in range(n):
                k = _tok(seed)
                seed += 1
                for li in range(layers):
                    c.append(li, k, -k, torch.tensor([c.n_fed]), torch.tensor([c.layers[li].next_rope]))
                want[who].append((k, c.n_fed))
                c.n_fed += 1
    for c, w in zip(caches, want):
        for li in range(layers):
            keys, values = c.kv(li)
            pos, rope = c.positions(li)
            assert keys.shape[1] == len(w) == c.layers[li].length
            if w:
                expect = torch.cat([k for k, _ in w], dim=1)
                assert torch.equal(keys, expect) and torch.equal(values, -expect)
                assert pos.tolist() == [p for _, p in w] == rope.tolist()
    assert pool.blocks_used() == sum(c.blocks_used() for c in caches)
    for c in caches:
        c.free()
    assert pool.blocks_used() == 0


def test_reserve_run_grows_in_place_then_moves_with_headroom() -> None:
    pool = BlockPool(1, HKV, D, block_size=2, initial_blocks=8)
    a, b = SessionKV(pool), SessionKV(pool)
    for i in range(2):
        a.append(0, _tok(i), _tok(i), torch.tensor([i]), torch.tensor([i]))
    reserve_run(a, 0, 1)  # blocks after a's run are free: extended in place
    assert a.layers[0].blocks == [0, 1] and a.layers[0].contiguous
    b.append(0, _tok(9), _tok(9), torch.tensor([0]), torch.tensor([0]))  # b takes block 2, right after a
    keys = a.kv(0)[0].clone()
    reserve_run(a, 0, 3)  # 5 tokens need 3 blocks: a moves to a fresh run with headroom
    t = a.layers[0]
    assert t.contiguous and len(t.blocks) == 3 + 1 and t.blocks == list(range(t.blocks[0], t.blocks[0] + 4))
    assert torch.equal(a.kv(0)[0], keys) and t.length == 2
    assert pool.blocks_used() == len(t.blocks) + len(b.layers[0].blocks)


def test_allocate_run_finds_gaps_and_grows_at_the_end() -> None:
    pool = BlockPool(1, HKV, D, block_size=4, initial_blocks=8)
    first = pool.allocate(0, 8)
    pool.release(0, [first[2], first[3], first[4], first[6]])
    assert pool.allocate_run(0, 3) == [2, 3, 4]  # the lowest gap of 3
    assert pool.allocate_run(0, 2) == [8, 9]  # only [6] is free: grow; 7 is used, so the run starts at 8
    pool.release(0, [7])
    run = pool.allocate_run(0, 4, after=5)  # 6, 7 free but 8, 9 taken: not in place
    assert run[0] != 6 and len(run) == 4 and run == list(range(run[0], run[0] + 4))
