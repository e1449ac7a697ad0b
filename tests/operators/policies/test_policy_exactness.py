"""The contract-5 check for every policy: attention over what it keeps (plus the keys it holds
outside the cache), at the positions it assigns, equals dense attention over exactly those keys at
those positions.

A stream of raw (un-rotated) keys/values/queries is fed in chunks through the real cache, RoPE and
`apply_policy`, with the model's attention step (`cache.append`, blockwise attention, the policy's
`observe`/`extend` hooks). The reference is built independently: the raw keys of the tokens the
cache reports (by original position), rotated at the RoPE positions it reports, plus each
policy's outside keys rebuilt from raw keys (retrieved blocks by their token positions, pooled
summaries as means over their token spans repeated `count` times, the compressive memory written
with the loop reference), attended by the naive dense attention one query at a time.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamctx.kv.apply import apply_policy
from streamctx.kv.cache import SessionKV
from streamctx.kv.pool import BlockPool
from streamctx.model.rope import Rope, apply_rope, rerotate
from streamctx.operators.attn import attention
from streamctx.operators.attn import naive
from streamctx.operators.memory import naive as mem_naive
from streamctx.operators.memory import gated_memory_attention
from streamctx.operators.policies import (
    CompressivePolicy, HeavyHitterPolicy, HierarchicalPolicy, RetrievalPolicy, SinkWindowPolicy, SnapKVPolicy,
)
from tests.tolerances import assert_close

HKV, GROUP, D = 2, 2, 16
HQ = HKV * GROUP


def small_policies() -> dict[str, object]:
    return {
        "sink_window": SinkWindowPolicy(sinks=3, window=20, slack=5),
        "heavy_hitter": HeavyHitterPolicy(heavy=9, recent=11, slack=4),
        "snapkv": SnapKVPolicy(selected=9, window=12, observe_window=5, kernel=3, slack=4),
        "hierarchical": HierarchicalPolicy(sinks=2, window=14, group=4, factor=2, per_level=3, levels=2, slack=3),
        "compressive": CompressivePolicy(sinks=2, window=15, gate=0.3, slack=4),
        "retrieval": RetrievalPolicy(sinks=2, window=13, topk=3, block=4, q_group=3, slack=3),
        "retrieval_bound": RetrievalPolicy(sinks=2, window=13, topk=2, block=4, q_group=2, slack=3,
                                           score="bound", neighbors=False),
    }


class Stream:
    """Raw q/k/v of a token stream and the model-side attention step over a one-layer cache."""

    def __init__(self, policy: object, t: int, seed: int, *, block_size: int = 4) -> None:
        g = torch.Generator().manual_seed(seed)
        self.policy = policy
        self.rope = Rope(D, 10000.0)
        self.q = torch.randn(HQ, t, D, generator=g)
        self.k = torch.randn(HKV, t, D, generator=g)
        self.v = torch.randn(HKV, t, D, generator=g)
        self.cache = SessionKV(BlockPool(1, HKV, D, block_size=block_size))
        self.fed = 0
        self.segments: list[torch.Tensor] = []  # positions each decision evicted (compressive's writes)

    def rotate(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return rerotate(x, delta, self.rope)

    def at(self, raw: torch.Tensor, rope_positions: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rope.cos_sin(rope_positions)
        return apply_rope(raw, cos, sin)

    def step(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Feed n tokens; returns (our output `[Hq, n, D]`, the reference, query RoPE positions)."""
        a, cache, pol = self.fed, self.cache, self.policy
        r0 = cache.layers[0].next_rope
        rpos = torch.arange(r0, r0 + n)
        q = self.at(self.q[:, a:a + n], rpos)
        past = cache.layers[0].length
        if getattr(pol, "observes_queries", False):
            pol.observe(0, q, rpos)
        cache.append(0, self.at(self.k[:, a:a + n], rpos), self.v[:, a:a + n], torch.arange(a, a + n), rpos)
        keys, values = cache.kv(0)
        out, lse, mass = attention(q[None], keys[None], values[None], causal=True, q_offset=past,
                                   return_lse=True, return_key_mass=True)
        if pol.needs_key_mass:
            cache.add_key_mass(0, mass[0].view(HKV, GROUP, -1).sum(1))
        out = out[0]
        if getattr(pol, "extends_attention", False):
            out = pol.extend(0, q, rpos, out, lse[0], self.rotate)
        ref = self.reference(q, rpos, past)
        self.fed += n
        cache.n_fed += n
        before = set(cache.positions(0)[0].tolist())
        apply_policy(cache, pol, self.rotate)
        gone = sorted(before - set(cache.positions(0)[0].tolist()))
        if gone:
            self.segments.append(torch.tensor(gone))
        return out, ref, rpos

    # -- the independent reference ---------------------------------------------------------------
    def extra_keys(self, i: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values `[Hkv, E, D]` query i of the step attends outside the cache."""
        pol = self.policy
        empty = torch.zeros(HKV, 0, D)
        if isinstance(pol, RetrievalPolicy):
            host = pol.host_blocks(0)
            if host is None or host.n == 0:
                return empty, empty
            m = min(pol.q_group, n)
            groups = -(-(n - 1) // m)  # groups of m over the first n - 1 queries, the last alone
            row = groups if i == n - 1 else (i + groups * m - (n - 1)) // m
            ids = pol.last_selection[0][row]
            pos = host.pos[ids].reshape(-1)
            rope = torch.cat([torch.arange(pol.block) + pol.sinks + j * pol.block for j in range(len(ids))])
            return self.at(self.k[:, pos], rope), self.v[:, pos]
        if isinstance(pol, HierarchicalPolicy):
            summ = pol.summaries(0)
            if summ is None:
                return empty, empty
            rope = pol.summary_positions(summ.n.numel())
            ks, vs = [], []
            for j, (start, cnt) in enumerate(zip(summ.start.tolist(), summ.n.long().tolist())):
                span = slice(start, start + cnt)
                k = self.at(self.k[:, span].mean(1, keepdim=True), rope[j:j + 1])
                ks.append(k.expand(HKV, cnt, D))
                vs.append(self.v[:, span].mean(1, keepdim=True).expand(HKV, cnt, D))
            return torch.cat(ks, 1), torch.cat(vs, 1)
        return empty, empty

    def reference(self, q: torch.Tensor, q_rope: torch.Tensor, past: int) -> torch.Tensor:
        pos, rope = self.cache.positions(0)
        keys, vals = self.at(self.k[:, pos], rope), self.v[:, pos]
        n = q.shape[1]
        rows = []
        for i in range(n):
            ek, ev = self.extra_keys(i, n)
            vis = past + i + 1  # causal: kept slots up to this query's own
            k = torch.cat([ek, keys[:, :vis]], 1)
            v = torch.cat([ev, vals[:, :vis]], 1)
            rows.append(naive.attention(q[None, :, i:i + 1], k[None], v[None], causal=False)[0])
        ref = torch.cat(rows, 1)
        if isinstance(self.policy, CompressivePolicy) and self.segments:
            state = (torch.zeros(1, HKV, D, D), torch.zeros(1, HKV, D))
            for seg in self.segments:  # one write per decision, in order
                state = mem_naive.memory_update(self.k[None, :, seg], self.v[None, :, seg], state,
                                                rule=self.policy.rule)
            M, z = (s.repeat_interleave(GROUP, dim=1) for s in state)
            raw_q = self.q[:, self.fed:self.fed + n]
            read = mem_naive.memory_retrieve(raw_q[None], (M, z))
            ref = gated_memory_attention(ref[None], read, torch.tensor(self.policy.gate))[0]
        return ref


def run(policy: object, chunks: list[int], seed: int = 0) -> Stream:
    s = Stream(policy, sum(chunks), seed)
    for n in chunks:
        out, ref, rpos = s.step(n)
        assert_close(out, ref)
        cap = policy.attended_cap(n)  # type: ignore[attr-defined]
        assert int(rpos.max()) < cap, "RoPE positions must stay inside the attended budget"
        assert s.cache.length(0) <= policy.capacity + policy.slack  # type: ignore[attr-defined]
    return s


@pytest.mark.parametrize("name", list(small_policies()))
def test_policy_attention_equals_dense_attention_over_what_it_keeps(name: str) -> None:
    policy = small_policies()[name]
    s = run(policy, [17, 1, 9, 23, 1, 1, 31, 5, 13, 2, 29, 1])
    assert s.segments, "the stream must have evicted something"


@settings(max_examples=12)
@given(name=st.sampled_from(sorted(small_policies())),
       chunks=st.lists(st.sampled_from([1, 2, 3, 5, 7, 11, 13, 29]), min_size=3, max_size=9),
       seed=st.integers(0, 2**16))
def test_policy_exactness_over_random_splits(name: str, chunks: list[int], seed: int) -> None:
    run(small_policies()[name], chunks + [31], seed)


def test_sink_window_positions_are_inside_the_cache() -> None:
    policy = SinkWindowPolicy(sinks=3, window=20, slack=5)
    s = run(policy, [13] * 12)
    pos, rope = s.cache.positions(0)
    assert pos[:3].tolist() == [0, 1, 2]
    assert rope.tolist() == list(range(pos.numel()))
    assert pos[3:].tolist() == list(range(s.fed - pos.numel() + 3, s.fed))
    assert s.cache.layers[0].next_rope == pos.numel()


@pytest.mark.parametrize("score", ["mean", "bound"])
def test_retrieval_recalls_a_planted_block(score: str) -> None:
    """Keys of one block point along u; a query along u retrieves that block and reads its values."""
    policy = RetrievalPolicy(sinks=2, window=16, topk=1, block=8, q_group=4, slack=7, score=score)
    s = Stream(policy, 200, seed=3)
    g = torch.Generator().manual_seed(7)
    u = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)
    s.k.mul_(0.1)
    planted = slice(42, 50)  # block 5 of the evicted stream (sinks 0,1; blocks start at 2)
    s.k[:, planted] = 4.0 * u
    s.v[:, planted] = 5.0
    for _ in range(9):
        s.step(20)
    host = policy.host_blocks(0)
    assert host is not None and host.n >= 10
    assert host.pos[5].tolist() == list(range(42, 50))
    s.q[:, 180:] = 4.0 * u  # the last queries look for u (RoPE keeps the block near)
    out, ref, _ = s.step(20)
    assert_close(out, ref)
    assert policy.last_selection[0][-1].tolist() == [5]
    assert out[:, -1].mean() > 2.5, "the planted values must dominate the read"
    assert policy.host_nbytes() == host.n * (HKV * 8 * D * 2 + HKV * D * 3) * 4


def test_retrieval_last_query_retrieves_for_itself() -> None:
    """The last query of a chunk predicts the next token: it must get the block it looks for even
    when the other queries of its group all prefer another block (a passkey question after
    filler whose queries favour some filler block)."""
    policy = RetrievalPolicy(sinks=2, window=16, topk=1, block=8, q_group=4, slack=7, neighbors=False)
    s = Stream(policy, 200, seed=3)
    g = torch.Generator().manual_seed(7)
    u, w = torch.nn.functional.normalize(torch.randn(2, D, generator=g), dim=1)
    w = torch.nn.functional.normalize(w - (w @ u) * u, dim=0)
    s.k.mul_(0.1)
    s.k[:, 42:50], s.v[:, 42:50] = 4.0 * u, 5.0  # block 5: what the last query looks for
    s.k[:, 90:98], s.v[:, 90:98] = 4.0 * w, -5.0  # block 11: what the rest of the chunk looks for
    for _ in range(9):
        s.step(20)
    s.q[:, 180:199] = 4.0 * w
    s.q[:, 199] = 1.5 * u  # a weaker peak than its group's: a shared group's max picks block 11
    out, ref, _ = s.step(20)
    assert_close(out, ref)
    assert policy.last_selection[0][-1].tolist() == [5]
    assert policy.last_selection[0][-2].tolist() == [11]
    assert out[:, -1].mean() > 0, "the last query must read the block it looks for"


def test_retrieval_adds_the_better_neighbour_of_each_chosen_block() -> None:
    policy = RetrievalPolicy(topk=4, block=4, slack=3)
    score = torch.tensor([[0.0, 0.1, 0.9, 0.2, 0.0, 0.0, 0.05, 0.8, 0.0, 0.3]])
    assert policy.pick(score).tolist() == [[2, 3, 6, 7]]
    assert RetrievalPolicy(topk=4, block=4, slack=3, neighbors=False).pick(score).tolist() == [[2, 3, 7, 9]]


def test_heavy_hitter_keeps_the_keys_with_most_mass() -> None:
    policy = HeavyHitterPolicy(heavy=4, recent=8, slack=0)
    s = Stream(policy, 64, seed=1)
    hot = [5, 17, 30]
    u = torch.zeros(D)
    u[[D // 2 - 1, D - 1]] = 2 ** -0.5  # the slowest RoPE pair: scores barely depend on distance
    s.q[:] = 4.0 * u
    s.k.mul_(0.1)
    s.k[:, hot] = 6.0 * u
    for _ in range(8):
        s.step(8)
    kept = set(s.cache.positions(0)[0].tolist())
    assert set(hot) <= kept
    assert math.isclose(len(kept), 12)
