from __future__ import annotations

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
