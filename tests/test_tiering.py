"""TieredSessions: an engine's sessions under the memory-budget scheduler (tiny random Llama).

Guarantees checked: outputs equal a run where every session stays live (greedy tokens equal,
logits within the fp32 tolerance), with total state >= 10x the device + host budgets; the device
tier never holds more than its budget (live tensor storages) and the engine never more than
`max_live` sessions; a spill through every tier and back restores the session bit-exactly.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from streamctx import Engine
from streamctx.schedulers.memory_budget import MemoryBudgetScheduler
from streamctx.schedulers.placement import LRU, Lookahead
from streamctx.storage import DiskTier, MemoryTier
from streamctx.tiering import TieredSessions
from tests.fixtures.tiny_models import make_tiny_llama
from tests.tolerances import assert_close

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 173
DEVICE_BUDGET = HOST_BUDGET = 64 * 1024


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiering") / "tiny", hidden=32, heads=2, kv_heads=1,
                           head_dim=16, layers=2, vocab_size=VOCAB, seed=5)


def _workload(n_sessions: int, turns: int, seed: int) -> list[tuple[str, list[int]]]:
    rng = random.Random(seed)
    order = [f"s{i}" for i in range(n_sessions) for _ in range(turns)]
    rng.shuffle(order)
    return [(sid, [rng.randrange(VOCAB) for _ in range(rng.randint(16, 30))]) for sid in order]


def _turn(s, ids: list[int]) -> tuple[torch.Tensor, list[int]]:
    logits = s.feed(ids, return_logits=True).logits.clone()
    return logits, s.generate(3).token_ids


def _reference(folder: Path, work: list[tuple[str, list[int]]]) -> list[tuple[torch.Tensor, list[int]]]:
    engine = Engine.load(folder, block_size=8)
    out = [_turn(engine.session(sid), ids) for sid, ids in work]
    for s in list(engine.sessions.values()):
        s.close()
    return out


def _check_against_reference(engine: Engine, tiered: TieredSessions, work, ref, *, hint: int) -> None:
    sched = tiered.scheduler
    device_budget, host_budget = sched.tiers[0].capacity, sched.tiers[1].capacity
    for i, (sid, ids) in enumerate(work):
        if hint:
            tiered.hint_upcoming([w[0] for w in work[i + 1:i + 1 + hint]])
        logits, tokens = _turn(tiered.session(sid), ids)
        assert tokens == ref[i][1], f"turn {i} of {sid}: greedy tokens differ"
        assert_close(logits, ref[i][0], msg=f"turn {i} of {sid}")
        assert sched.live_device_bytes() <= device_budget
        assert len(engine.sessions) <= tiered.max_live
    tiered.release_all()
    total = sum(t["used"] for t in sched.stats()["tiers"].values())
    assert total >= 10 * (device_budget + host_budget), f"total state {total} B is under 10x the budgets"


def test_outputs_equal_unbounded_with_device_host_disk(folder: Path, tmp_path: Path) -> None:
    work = _workload(80, 3, seed=0)
    ref = _reference(folder, work)
    engine = Engine.load(folder, block_size=8)
    disk = DiskTier(tmp_path)
    sched = MemoryBudgetScheduler([MemoryTier("device", "cpu", DEVICE_BUDGET),
                                   MemoryTier("host", "cpu", HOST_BUDGET), disk], Lookahead(LRU()))
    tiered = TieredSessions(engine, sched, max_live=2)
    try:
        _check_against_reference(engine, tiered, work, ref, hint=4)
        st = tiered.stats()
    finally:
        sched.close()
        disk.close()
    assert st["spills"] > 0 and st["restores"] > 0 and st["tiers"]["disk"]["sessions"] > 0
    assert st["prefetches"] > 0 and st["prefetch_hits"] > 0
    assert st["releases"] == st["new"] + st["checkouts"]  # every stint in the engine ended in a spill
    assert st["new"] == 80 and st["live_sessions"] == 0
    assert set(st["tier_bytes"]) == {"device", "host", "disk"}


def test_outputs_equal_unbounded_with_a_peer_tier(folder: Path, tmp_path: Path, ray_local) -> None:
    from streamctx.storage.peer import PeerTier, spawn_state_stores

    work = _workload(48, 3, seed=1)
    ref = _reference(folder, work)
    engine = Engine.load(folder, block_size=8)
    disk = DiskTier(tmp_path)
    stores = spawn_state_stores(2, 96 * 1024)
    small = 40 * 1024
    sched = MemoryBudgetScheduler([MemoryTier("device", "cpu", small), MemoryTier("host", "cpu", small),
                                   PeerTier(stores), disk])
    tiered = TieredSessions(engine, sched, max_live=1)
    try:
        _check_against_reference(engine, tiered, work, ref, hint=0)
        st = tiered.stats()
    finally:
        sched.close()
        disk.close()
        for s in stores:
            ray_local.kill(s)
    assert st["tiers"]["peer"]["sessions"] > 0 and st["tiers"]["disk"]["sessions"] > 0
    assert any(k.endswith("->device") and k.startswith("peer") for k in st["moves"])


def test_spill_through_every_tier_is_bit_exact(folder: Path, tmp_path: Path) -> None:
    engine = Engine.load(folder, block_size=8)
    disk = DiskTier(tmp_path)
    # fill_first=False: a demoted state cascades device -> host -> disk one tier at a time.
    sched = MemoryBudgetScheduler([MemoryTier("device", "cpu", 16 * 1024), MemoryTier("host", "cpu", 16 * 1024),
                                   disk], LRU(), fill_first=False)
    tiered = TieredSessions(engine, sched, max_live=1)
    try:
        s = tiered.session("a")
        s.messages.append({"role": "user", "content": "hello there"})  # chat history travels in the meta
        s.feed(list(range(40)))
        s.generate(2)
        s._flush()  # the state as save() will see it
        before = engine.model.state_to_blob(s.state)
        before = type(before)(before.kind, {k: v.clone() for k, v in before.tensors.items()}, dict(before.meta))
        logits, messages = s.last_logits.clone(), list(s.messages)
        tiered.release("a")
        for i in range(12):  # push "a" down to disk
            tiered.session(f"b{i}").feed(list(range(30)))
        tiered.release_all()
        assert sched.tier_of("a") == "disk"
        back = tiered.session("a")
        assert engine.model.state_to_blob(back.state).equal(before)
        assert torch.equal(back.last_logits, logits) and back.messages == messages
        moves = sched.stats()["moves"]
        assert {"device->host", "host->disk", "disk->device"} <= set(moves)
    finally:
        sched.close()
        disk.close()


def test_close_frees_every_copy_and_release_is_checked(folder: Path) -> None:
    engine = Engine.load(folder, block_size=8)
    sched = MemoryBudgetScheduler([MemoryTier("device", "cpu", DEVICE_BUDGET), MemoryTier("host", "cpu", None)])
    tiered = TieredSessions(engine, sched, max_live=1)
    with tiered.use("x") as s:
        s.feed([1, 2, 3])
    assert tiered.live() == [] and sched.tier_of("x") == "device"
    with tiered.use("x") as s:  # a checkout from the device tier
        s.feed([4])
    tiered.close("x")
    assert sched.sessions() == [] and engine.sessions == {}
    assert tiered.stats()["drops"] == 1 and tiered.stats()["closes"] == 1
    with pytest.raises(KeyError, match="not live"):
        tiered.release("x")
    with pytest.raises(ValueError, match="max_live"):
        TieredSessions(engine, sched, max_live=0)


def test_snapshot_covers_live_and_spilled_sessions_and_restores(folder: Path, tmp_path: Path) -> None:
    engine = Engine.load(folder, block_size=8)
    disk = DiskTier(tmp_path)
    sched = MemoryBudgetScheduler([MemoryTier("device", "cpu", 16 * 1024), disk])
    tiered = TieredSessions(engine, sched, max_live=1)
    try:
        for i in range(5):
            tiered.session(f"s{i}").feed(list(range(i + 3, i + 40)))
        assert tiered.live() == ["s4"] and sched.tier_of("s0") == "disk"
        snap = tiered.snapshot()
        assert sorted(snap) == [f"s{i}" for i in range(5)]
        before = {sid: tiered.session(sid).feed([7], return_logits=True).logits for sid in ("s0", "s4")}
        tiered.restore(snap)
        assert engine.sessions == {} and sorted(tiered.session_ids()) == sorted(snap)
        after = {sid: tiered.session(sid).feed([7], return_logits=True).logits for sid in ("s0", "s4")}
        for sid in before:
            assert torch.equal(before[sid], after[sid])
    finally:
        sched.close()
        disk.close()


def test_tiered_sessions_factory_builds_the_usual_tiers(folder: Path, tmp_path: Path) -> None:
    from streamctx.tiering import tiered_sessions

    engine = Engine.load(folder, block_size=8)
    tiered = tiered_sessions(engine, 16 * 1024, host_budget=16 * 1024, spill_dir=str(tmp_path), max_live=2)
    try:
        assert [t.name for t in tiered.scheduler.tiers] == ["device", "host", "disk"]
        for i in range(8):
            tiered.session(f"s{i}").feed(list(range(3, 40)))
        tiered.release_all()
        assert tiered.stats()["tiers"]["disk"]["sessions"] > 0
        spill_dir = tiered.scheduler.tiers[-1].path
        assert any(spill_dir.iterdir())
    finally:
        tiered.close_tiers()
    assert not spill_dir.exists()
