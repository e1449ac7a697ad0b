"""Peer tier: StateBlob bytes held by state-store Ray actors (on other nodes, or locally in tests).

State moves in bulk as one numpy uint8 buffer plus a small header (`packing.py`): numpy passes
through Ray's object store without pickling tensors. Each actor copies what it receives into its own
heap, so its memory is explicit and does not depend on the sender's object lifetimes. The tensors
are sent as zero-copy uint8 views (Ray copies them into its object store once). A new state
goes to the store with the most free budget (tracked locally, so choosing costs no round trip).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from streamctx.state import StateBlob

from .base import StorageError, TierFullError
from .packing import pack_views, unpack_blob


class StateStore:
    """The actor body: keyed (header, buffer) pairs within a byte capacity."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: dict[str, tuple[dict[str, Any], np.ndarray]] = {}
        self._used = 0

    def put(self, key: str, header: dict[str, Any], parts: list[np.ndarray]) -> int:
        """Store the state's byte parts as one owned buffer (one copy out of the object store)."""
        if key in self._items:
            raise KeyError(f"state store already holds {key!r}")
        nbytes = sum(p.nbytes for p in parts)
        if self._used + nbytes > self.capacity:
            raise MemoryError(f"state store full: {nbytes} bytes needed, {self.capacity - self._used} free")
        buf = np.concatenate(parts) if parts else np.empty(0, dtype=np.uint8)
        self._items[key] = (header, buf)
        self._used += nbytes
        return nbytes

    def get(self, key: str) -> tuple[dict[str, Any], np.ndarray]:
        return self._items[key]

    def delete(self, key: str) -> int:
        _, buf = self._items.pop(key)
        self._used -= buf.nbytes
        return buf.nbytes

    def stats(self) -> dict[str, int]:
        return {"capacity": self.capacity, "used": self._used, "items": len(self._items)}


def spawn_state_stores(n: int, capacity: int, *, options: Sequence[dict[str, Any]] | None = None) -> list[Any]:
    """Start `n` state-store actors of `capacity` bytes each (Ray must be initialised).

    options: per-actor `.options(...)` (e.g. a NodeAffinitySchedulingStrategy or a custom resource
    that places each store on another node). Actors use no CPU slot and one torch-free thread.
    """
    import ray

    cls = ray.remote(num_cpus=0)(StateStore)
    opts = list(options) if options is not None else [{} for _ in range(n)]
    if len(opts) != n:
        raise ValueError(f"options has {len(opts)} entries for {n} state stores")
    return [cls.options(**o).remote(capacity) for o in opts]


class PeerTier:
    """Tier store over state-store actors; `capacity` is the sum of theirs."""

    def __init__(self, stores: Sequence[Any], *, name: str = "peer") -> None:
        import ray

        if not stores:
            raise ValueError("PeerTier needs at least one state-store actor")
        self._ray = ray
        self.name = name
        self.stores = list(stores)
        stats = ray.get([s.stats.remote() for s in self.stores])
        self._cap = [int(s["capacity"]) for s in stats]
        self._used_by = [int(s["used"]) for s in stats]
        self.capacity = sum(self._cap)
        self._where: dict[str, tuple[int, int]] = {}  # key -> (store index, bytes)

    def used(self) -> int:
        return sum(self._used_by)

    def charge(self, blob: StateBlob) -> int:
        return blob.nbytes()

    def can_fit(self, nbytes: int) -> bool:
        return max(c - u for c, u in zip(self._cap, self._used_by)) >= nbytes

    def put(self, key: str, blob: StateBlob) -> int:
        if key in self._where:
            raise StorageError(f"peer tier already holds session {key!r}")
        header, parts = pack_views(blob)
        nbytes = sum(p.nbytes for p in parts)
        free = [c - u for c, u in zip(self._cap, self._used_by)]
        best = max(range(len(free)), key=free.__getitem__)
        if free[best] < nbytes:
            raise TierFullError(
                f"peer tier is full: session {key!r} needs {nbytes} bytes, the freest store has {free[best]}"
            )
        try:
            # One argument: Ray serialises the list as one object, the arrays as out-of-band buffers.
            self._ray.get(self.stores[best].put.remote(key, header, parts))
        except Exception as exc:  # an actor error or a lost node: the caller keeps the state
            raise StorageError(f"peer store {best} could not take session {key!r}: {exc}") from exc
        self._where[key] = (best, nbytes)
        self._used_by[best] += nbytes
        return nbytes

    def get(self, key: str) -> StateBlob:
        if key not in self._where:
            raise KeyError(f"peer tier does not hold session {key!r}")
        idx, _ = self._where[key]
        try:
            header, buf = self._ray.get(self.stores[idx].get.remote(key))
        except Exception as exc:
            raise StorageError(f"peer store {idx} could not return session {key!r}: {exc}") from exc
        return unpack_blob(header, buf)

    def delete(self, key: str) -> None:
        idx, n = self._where.pop(key)
        self._used_by[idx] -= n
        self.stores[idx].delete.remote(key)  # fire and forget; the actor's order keeps it consistent

    def keys(self) -> Iterable[str]:
        return list(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def store_stats(self) -> list[dict[str, int]]:
        return self._ray.get([s.stats.remote() for s in self.stores])
