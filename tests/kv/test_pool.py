"""The block pool's free list against a plain model of it: a set of free ids, lowest first."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from streamctx.kv import BlockPool

OPS = st.lists(st.tuples(st.sampled_from(["allocate", "run", "extend", "release"]), st.integers(1, 5),
                         st.integers(0, 10_000)), max_size=60)


@given(ops=OPS)
@settings(max_examples=80, deadline=None)
def test_free_list_matches_a_plain_model(ops: list[tuple[str, int, int]]) -> None:
    """Runs taken from the middle of the free ids leave stale heap entries behind; allocate must
    still hand out the lowest free ids, never one in use, and the counts must hold."""
    pool = BlockPool(1, 1, 4, block_size=2, initial_blocks=4)
    used: list[int] = []
    for op, n, pick in ops:
        total = pool.num_blocks(0)
        free = sorted(set(range(total)) - set(used))
        if op == "allocate":
            want = sorted(set(range(max(total, len(used) + n))) - set(used))[:n]
            got = pool.allocate(0, n)
            assert got == want
        elif op == "release":
            if not used:
                continue
            got = [used[pick % len(used)]]
            used.remove(got[0])
            pool.release(0, got)
            continue
        else:
            after = used[pick % len(used)] if op == "extend" and used else None
            got = pool.allocate_run(0, n, after=after)
            assert got == list(range(got[0], got[0] + n))  # consecutive
            if after is not None and all(after + 1 + i in free for i in range(n)) and after + n < total:
                assert got[0] == after + 1  # extended in place where it could be
        assert not set(got) & set(used), "an id in use was handed out again"
        used += got
        assert pool.blocks_used() == len(used)
        assert pool.k[0].shape == (1, pool.num_blocks(0), 2, 4)
