from __future__ import annotations

import os

import pytest

from streamctx.storage import TierFullError
from streamctx.storage.peer import PeerTier, spawn_state_stores
from tests.storage.blobs import kv_blob


def test_peer_tier_roundtrip_and_choice_by_free_budget(ray_local) -> None:
    blob = kv_blob(7, 40)  # ~15 KB
    n = blob.nbytes()
    stores = spawn_state_stores(2, capacity=3 * n)
    tier = PeerTier(stores)
    assert tier.capacity == 6 * n
    for i in range(6):
        tier.put(f"s{i}", kv_blob(i, 40))
    # Chosen by free budget: the six states are spread three and three.
    assert sorted(s["items"] for s in tier.store_stats()) == [3, 3]
    for i in range(6):
        assert tier.get(f"s{i}").equal(kv_blob(i, 40))
    with pytest.raises(TierFullError, match="peer tier is full"):
        tier.put("extra", blob)
    tier.delete("s0")
    tier.put("extra", blob)
    assert tier.get("extra").equal(blob)
    assert tier.used() == 6 * n
    for s in stores:
        ray_local.kill(s)


def test_failed_store_loses_nothing_not_yet_confirmed(ray_local) -> None:
    stores = spawn_state_stores(1, capacity=10**8)
    tier = PeerTier(stores)
    tier.put("a", kv_blob(1, 8))
    assert tier.get("a").equal(kv_blob(1, 8))  # confirmed: now held by the store
    ray_local.kill(stores[0])
    tier.put("b", kv_blob(2, 8))  # the store is gone: the driver's copy keeps serving it
    assert tier.get("b").equal(kv_blob(2, 8))
    assert tier.failed_puts() == 1


# ---- three-node cluster (own pytest process: pytest -m cluster) ---------------------------------
@pytest.fixture(scope="module")
def three_nodes():
    """A head (the driver's node) and two peer nodes with custom resources `peer_a`, `peer_b`."""
    os.environ["RAY_AUTH_MODE"] = "disabled"  # loopback-only test cluster
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.fail("cluster tests must run in their own pytest process (pytest -m cluster)")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1, resources={"peer_a": 1})
    c.add_node(num_cpus=1, resources={"peer_b": 1})
    c.wait_for_nodes()
    ray.init(address=c.address, runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()
    c.shutdown()


@pytest.mark.cluster
def test_sessions_spill_to_stores_on_peer_nodes(three_nodes, tmp_path) -> None:
    """An engine's sessions (tiny model) spill through stores on two other nodes: outputs equal the
    all-live run, the device budget holds, and each peer node holds some sessions' state."""
    from streamctx import Engine
    from streamctx.schedulers.memory_budget import MemoryBudgetScheduler
    from streamctx.storage import DiskTier, MemoryTier
    from streamctx.tiering import TieredSessions
    from tests.fixtures.tiny_models import make_tiny_llama
    from tests.test_tiering import VOCAB, _check_against_reference, _reference, _workload

    ray = three_nodes
    folder = make_tiny_llama(tmp_path / "tiny", hidden=32, heads=2, kv_heads=1, head_dim=16, layers=2,
                             vocab_size=VOCAB, seed=5)
    stores = spawn_state_stores(2, 128 * 1024, options=[{"resources": {"peer_a": 1}}, {"resources": {"peer_b": 1}}])
    driver_node = ray.get_runtime_context().get_node_id()
    store_nodes = ray.get([s.node_id.remote() for s in stores])
    assert len(set(store_nodes)) == 2 and driver_node not in store_nodes

    work = _workload(40, 2, seed=2)
    ref = _reference(folder, work)
    engine = Engine.load(folder, block_size=8)
    disk = DiskTier(tmp_path)
    small = 24 * 1024
    peer = PeerTier(stores)
    sched = MemoryBudgetScheduler([MemoryTier("device", "cpu", small), MemoryTier("host", "cpu", small), peer, disk])
    tiered = TieredSessions(engine, sched, max_live=1)
    try:
        _check_against_reference(engine, tiered, work, ref, hint=2)
        st = tiered.stats()
        held = peer.store_stats()
    finally:
        sched.close()
        disk.close()
    assert all(h["items"] > 0 for h in held), held
    assert st["moves"]["peer->device"]["count"] > 0 and st["tiers"]["peer"]["sessions"] > 0
