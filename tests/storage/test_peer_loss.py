"""A lost peer store (its process or node died): reading state it held raises `StateLostError`
(never an empty or stale state), it leaves the tier's capacity, and `replace_lost` starts a new
store once its sessions are forgotten. Then `TieredSessions` on a tiny model: a lost spilled
session fails its checkout, a snapshot and every retry; restoring from a snapshot taken before the
loss gives the outputs of a run that never spilled."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from streamctx.storage import DiskTier, MemoryTier, StateLostError, StorageError, TierFullError
from streamctx.storage.peer import PeerTier, PeerUnavailableError, spawn_state_stores
from tests.storage.blobs import kv_blob


def _respawn(capacity: int, occupied: list[str]) -> Any:
    return spawn_state_stores(1, capacity)[0]  # one node here: the replacement runs beside the lost one


def _kill(ray: Any, store: Any, tier: PeerTier | None = None, key: str | None = None) -> None:
    """Kill a store and wait until it is gone (`ray.kill` returns before the process dies); with
    `tier` and `key` (a state it held), also until reading that state fails: a copy cached in this
    node's object store stays readable for a moment after its owner died (the right bytes)."""
    ray.kill(store)
    for _ in range(300):
        try:
            ray.get(store.pid.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("a killed store still answers after 30 s")
    if tier is not None:
        for _ in range(300):
            try:
                tier.get(str(key))
            except StateLostError:
                return
            time.sleep(0.1)
        pytest.fail(f"the state of {key!r} stayed readable 30 s after its store died")


def test_a_lost_store_raises_state_lost_and_leaves_the_capacity(ray_local) -> None:
    n = kv_blob(0, 8).nbytes()
    stores = spawn_state_stores(2, capacity=10 * n)
    tier = PeerTier(stores)
    for i in range(4):
        tier.put(f"s{i}", kv_blob(i, 8))
    on_first = [k for k in tier.keys() if tier._where[k][0] == 0]
    for i in range(4):  # confirmed: the stores own the only copies now
        assert tier.get(f"s{i}").equal(kv_blob(i, 8))
    assert len(on_first) == 2 and tier.capacity == 20 * n
    _kill(ray_local, stores[0], tier, on_first[0])

    for k in on_first:
        with pytest.raises(StateLostError, match=f"session {k!r}"):
            tier.get(k)
        with pytest.raises(StateLostError):  # and on every retry: never an empty state
            tier.get(k)
    assert not isinstance(StateLostError("x"), StorageError)  # no caller holds the state any more
    for k in set(tier.keys()) - set(on_first):
        assert tier.get(k).equal(kv_blob(int(k[1:]), 8))
    assert tier.lost_stores() == [0]
    assert tier.capacity == 10 * n and tier.used() == 2 * n
    st = tier.peer_stats()
    assert st["live_stores"] == 1 and st["lost_stores"] == 1 and st["lost_reads"] >= 4
    added = 0
    with pytest.raises(TierFullError, match="peer tier is full"):
        for i in range(4, 20):  # new states go to the live store only, until it is full
            tier.put(f"s{i}", kv_blob(i, 8))
            added += 1
    assert tier.get("s4").equal(kv_blob(4, 8))
    assert added == 8 and ray_local.get(stores[1].stats.remote())["items"] == 10
    assert tier.replace_lost() == 0  # no respawn: the lost store stays out
    ray_local.kill(stores[1])


def test_replace_lost_starts_a_new_store_once_its_sessions_are_forgotten(ray_local) -> None:
    tier = PeerTier(spawn_state_stores(1, capacity=1 << 20), respawn=_respawn)
    tier.put("a", kv_blob(1, 8))
    assert tier.get("a").equal(kv_blob(1, 8))
    old = tier.stores[0]
    _kill(ray_local, old)
    # The ping finds it gone, but session "a" still refers to it: not replaced yet.
    assert tier.replace_lost() == 0 and tier.lost_stores() == [0] and tier.capacity == 0
    assert not tier.can_fit(1)
    with pytest.raises(TierFullError, match="no live store"):
        tier.put("b", kv_blob(2, 8))
    with pytest.raises(StateLostError):
        tier.get("a")  # known lost: no read is tried
    tier.delete("a")  # forgotten (the dataflow runtime does this when it restores a checkpoint)
    assert tier.replace_lost() == 1
    assert tier.lost_stores() == [] and tier.capacity == 1 << 20 and tier.stores[0] is not old
    tier.put("b", kv_blob(2, 8))
    assert tier.get("b").equal(kv_blob(2, 8))
    assert tier.peer_stats()["replaced_stores"] == 1
    ray_local.kill(tier.stores[0])


def test_a_put_to_a_dead_store_keeps_the_state_and_marks_the_store_lost(ray_local) -> None:
    stores = spawn_state_stores(1, capacity=1 << 20)
    tier = PeerTier(stores)
    _kill(ray_local, stores[0])
    tier.put("a", kv_blob(1, 8))  # not awaited: the caller's object keeps the state
    assert tier.get("a").equal(kv_blob(1, 8))
    assert tier.failed_puts() == 1 and tier.lost_stores() == [0]


def test_no_other_node_is_a_clear_reason(ray_local) -> None:
    with pytest.raises(PeerUnavailableError, match="no alive Ray node other than this one"):
        PeerTier.on_other_nodes(1 << 20, 2)
    with pytest.raises(ValueError, match="budget >= stores"):
        PeerTier.on_other_nodes(1, 2)


# ---- TieredSessions over a peer tier that loses a store ------------------------------------------
@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.fixtures.tiny_models import make_tiny_llama
    from tests.test_tiering import VOCAB

    return make_tiny_llama(tmp_path_factory.mktemp("peer_loss") / "tiny", hidden=32, heads=2, kv_heads=1,
                           head_dim=16, layers=2, vocab_size=VOCAB, seed=5)


@pytest.mark.usefixtures("one_torch_thread")
def test_tiered_sessions_never_continue_a_lost_session(folder: Path, tmp_path: Path, ray_local) -> None:
    from streamctx import Engine
    from streamctx.schedulers.memory_budget import MemoryBudgetScheduler
    from streamctx.tiering import TieredSessions
    from tests.test_tiering import _reference, _turn, _workload
    from tests.tolerances import assert_close

    work = _workload(12, 3, seed=3)
    cut = 2 * len(work) // 3  # the loss happens here
    ref = _reference(folder, work)
    engine = Engine.load(folder, block_size=8)
    peer = PeerTier(spawn_state_stores(1, 1 << 20), respawn=_respawn)
    disk = DiskTier(tmp_path)
    small = 40 * 1024  # about one session after three turns
    sched = MemoryBudgetScheduler([MemoryTier("device", "cpu", small), MemoryTier("host", "cpu", small), peer, disk])
    tiered = TieredSessions(engine, sched, max_live=1)

    def run(part: range) -> None:
        for i in part:
            sid, ids = work[i]
            logits, tokens = _turn(tiered.session(sid), ids)
            assert tokens == ref[i][1], f"turn {i} of {sid}: greedy tokens differ"
            assert_close(logits, ref[i][0], msg=f"turn {i} of {sid}")

    try:
        run(range(cut))
        tiered.release_all()
        snap = tiered.snapshot()  # reads the peer-spilled states back: a complete checkpoint
        on_peer = [sid for sid in sched.sessions() if sched.tier_of(sid) == "peer"]
        assert on_peer and set(snap) == set(sched.sessions())
        lost = on_peer[0]
        _kill(ray_local, peer.stores[0], peer, lost)

        for _ in range(2):  # a retry fails too: the session is never rebuilt from empty state
            with pytest.raises(StateLostError, match=repr(lost)):
                tiered.session(lost)
            assert lost not in engine.sessions and lost not in tiered.live()
        with pytest.raises(StateLostError):
            tiered.snapshot()

        tiered.restore(snap)  # what the dataflow runtime does after the failure
        st = tiered.stats()["peer"]
        assert st["replaced_stores"] == 1 and st["live_stores"] == 1 and st["lost_stores"] == 1
        run(range(cut, len(work)))  # outputs equal the run that never spilled
        assert tiered.stats()["tiers"]["peer"]["sessions"] + len(tiered.live()) > 0
    finally:
        sched.close()
        disk.close()
        ray_local.kill(peer.stores[0])


def test_tiered_sessions_without_another_node_leave_the_peer_tier_out(folder: Path, tmp_path: Path,
                                                                      ray_local, caplog) -> None:
    from streamctx import Engine
    from streamctx.tiering import tiered_sessions

    engine = Engine.load(folder, block_size=8)
    with caplog.at_level("WARNING", logger="streamctx.tiering"):
        tiered = tiered_sessions(engine, 16 * 1024, host_budget=16 * 1024, peer_budget=1 << 20, peer_stores=2,
                                 spill_dir=str(tmp_path))
    try:
        assert [t.name for t in tiered.scheduler.tiers] == ["device", "host", "disk"]
        assert "no alive Ray node other than this one" in tiered.stats()["peer"]["unavailable"]
        assert "peer tier left out" in caplog.text
    finally:
        tiered.close_tiers()
    with pytest.raises(ValueError, match="needs a host_budget"):
        tiered_sessions(engine, 16 * 1024, peer_budget=1 << 20)
