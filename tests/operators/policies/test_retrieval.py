"""Retrieval's evicted blocks at the real sizes (64-token blocks, a 508-token window, 512-token
prefill chunks, then decode steps) over a long stream: nothing is lost or stored twice, and the
stored keys do not drift however many decisions re-position them.

The exactness test (`test_policy_exactness.py`) checks attention at tiny sizes; this one checks
the storage a 16K passkey prompt relies on: after dozens of decisions every token is either in
the cache or in exactly one host block, in stream order, and every stored key equals its raw key
rotated at its gap slot. Keys are re-rotated by a position delta at each decision (stored rotated,
`R(p + d) = R(d) R(p)`), so the bound is the error of one fp32 RoPE rotation at the largest
position the stream used, times a small constant that does not grow with the stream.
"""

from __future__ import annotations

import torch

from streamctx.kv.apply import apply_policy
from streamctx.kv.cache import SessionKV
from streamctx.kv.pool import BlockPool
from streamctx.model.rope import Rope, apply_rope, inv_frequencies, rerotate
from streamctx.operators.policies import RetrievalPolicy
from streamctx.operators.policies.retrieval import HostBlocks

HKV, D, THETA = 1, 64, 1e5  # SmolLM2's head dim and RoPE theta


def rotated64(raw: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """fp64 RoPE of `raw [H, T, D]` at `positions [T]` (the reference)."""
    freqs = positions.double()[:, None] * inv_frequencies(D, THETA).double()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return apply_rope(raw.double(), emb.cos(), emb.sin())


def test_evicted_blocks_are_stored_once_in_order_at_their_gap_slot_without_drift() -> None:
    rope = Rope(D, THETA)
    policy = RetrievalPolicy(sinks=4, window=508, topk=8, block=64, slack=64)
    cache = SessionKV(BlockPool(1, HKV, D, block_size=64))
    chunks = [512] * 6 + [343] + [512] * 3 + [160] + [1] * 70 + [512] * 4 + [37]
    total = sum(chunks)
    g = torch.Generator().manual_seed(0)
    raw_k = torch.randn(HKV, total, D, generator=g)
    raw_v = torch.randn(HKV, total, D, generator=g)

    def rotate(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return rerotate(x, delta, rope)

    fed, decisions, top = 0, 0, 0
    for n in chunks:
        r0 = cache.layers[0].next_rope
        rpos = torch.arange(r0, r0 + n)
        top = max(top, r0 + n)
        cos, sin = rope.cos_sin(rpos)
        cache.append(0, apply_rope(raw_k[:, fed:fed + n], cos, sin), raw_v[:, fed:fed + n],
                     torch.arange(fed, fed + n), rpos)
        fed += n
        cache.n_fed += n
        before = cache.length(0)
        apply_policy(cache, policy, rotate)
        decisions += int(cache.length(0) < before)

        host = policy.host_blocks(0)
        kept, _ = cache.positions(0)
        stored = host.pos[:host.n].reshape(-1) if host is not None else torch.empty(0, dtype=torch.int64)
        assert torch.equal(stored, torch.arange(4, 4 + stored.numel())), "evicted blocks: whole, once, in order"
        assert torch.equal(torch.cat([kept[:4], stored, kept[4:]]), torch.arange(fed)), "cache + host = the stream"

    assert decisions >= 15 and host is not None and host.n >= 100
    # One fp32 rotation at the largest position used: the error scale of the model's own RoPE.
    probe = raw_k[:, :64]
    at_top = torch.full((64,), top - 1)
    cos, sin = rope.cos_sin(at_top)
    one_rotation = (apply_rope(probe, cos, sin).double() - rotated64(probe, at_top)).abs().max().item()

    slot = torch.arange(policy.block).repeat(host.n) + policy.sinks  # stored as if in the gap's first block
    want_k = rotated64(raw_k[:, host.pos[:host.n].reshape(-1)], slot)
    got_k = host.k[:, :host.n].reshape(HKV, -1, D).double()
    err = (got_k - want_k).abs().max().item()
    assert err <= 8 * one_rotation + 1e-6, f"stored keys drifted: {err:.2e} vs one rotation {one_rotation:.2e}"
    assert torch.equal(host.v[:, :host.n].reshape(HKV, -1, D), raw_v[:, host.pos[:host.n].reshape(-1)])
    kept, rope_kept = cache.positions(0)
    keys, _ = cache.kv(0)
    assert (keys.double() - rotated64(raw_k[:, kept], rope_kept)).abs().max().item() <= 8 * one_rotation + 1e-6

    # A fetched block at gap slot i sits at sinks + i * block + j: one more rotation, same bound.
    ids = torch.tensor([[0, host.n // 2, host.n - 1]])
    fk, fv = policy.fetch(host, ids, torch.device("cpu"), rotate)
    at = torch.cat([policy.sinks + i * policy.block + torch.arange(policy.block) for i in range(3)])
    want = rotated64(raw_k[:, host.pos[ids[0]].reshape(-1)], at)
    assert (fk[0].double() - want).abs().max().item() <= 8 * one_rotation + 1e-6
    assert torch.equal(fv[0], raw_v[:, host.pos[ids[0]].reshape(-1)])


def test_a_lone_query_picks_the_block_with_one_sharp_match_over_a_block_that_matches_on_average() -> None:
    """The last query of a feed (and each decode step) scores blocks by the attention mass they
    would get from it. A passkey block is one sharp match among 63 filler tokens: its mean key is
    weak, so mean representatives prefer a block of uniformly related filler; the exact mass does
    not (measured on SmolLM2 at 16K, depth 0.9: the key's blocks reached the last query in 13 of
    30 layers with means)."""
    d, bs = 16, 16
    u = torch.zeros(d)
    u[[d // 2 - 1, d - 1]] = 2 ** -0.5  # the slowest RoPE pair: scores barely depend on position
    host = HostBlocks(1, bs, d, torch.float32)
    k = 0.05 * torch.randn(1, 3, bs, d, generator=torch.Generator().manual_seed(0))
    k[0, 1, 3] = 6.0 * u  # block 1: one sharp match
    k[0, 2] = 0.6 * u  # block 2: every token a little related
    host.add(k, torch.zeros_like(k), torch.arange(3 * bs).view(3, bs))
    policy = RetrievalPolicy(sinks=0, window=16, topk=1, block=bs, slack=15, neighbors=False)
    q = 4.0 * u.expand(2, d)  # two query heads sharing the one KV head
    assert policy.select_exact(host, q).tolist() == [[1]]
    assert policy.select(host, q[:, None, None]).tolist() == [[2]], "means dilute the sharp match"
