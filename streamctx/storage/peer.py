"""Peer tier: session state held by state-store Ray actors (on other nodes, or locally in tests).

State moves in bulk as per-tensor uint8 numpy buffers plus a small header (`packing.py`): numpy
passes through Ray's object store without pickling tensors. Data path:

- spill: the driver `ray.put`s the buffers (one copy, the same as a raw put) and asks the chosen
  store to take them; the store copies them into an object it owns (so the bytes live in the
  store's node and outlive the driver's copy) and returns its reference. The call is not awaited:
  the driver keeps its own object until the store confirms, so a failed store loses nothing (the
  state is then served from the driver's object).
- restore: the driver `ray.get`s the store-owned object directly by its reference (no actor call)
  and copies the bytes into fresh tensors (one copy, the same as a raw get that owns its result).

A new state goes to the store with the most free budget (tracked locally: choosing costs no round
trip); stores also enforce their capacity.
"""

from __future__ import annotations

import threading
from typing import Any, Iterable, Sequence

from streamctx.state import StateBlob

from .base import StorageError, TierFullError
from .packing import pack_views, unpack_parts


class StateStore:
    """The actor body: keyed objects it owns, within a byte capacity."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: dict[str, tuple[Any, int]] = {}
        self._used = 0

    def put(self, key: str, wrapped: list[Any], nbytes: int) -> list[Any]:
        """Take ownership of the parts behind `wrapped[0]` (an ObjectRef); returns [own ref]."""
        import ray

        if key in self._items:
            raise KeyError(f"state store already holds {key!r}")
        if self._used + nbytes > self.capacity:
            raise MemoryError(f"state store full: {nbytes} bytes needed, {self.capacity - self._used} free")
        own = ray.put(ray.get(wrapped[0]))  # a copy in this node's object store, owned by this actor
        self._items[key] = (own, nbytes)
        self._used += nbytes
        return [own]

    def delete(self, key: str) -> int:
        _, nbytes = self._items.pop(key)
        self._used -= nbytes
        return nbytes

    def stats(self) -> dict[str, int]:
        return {"capacity": self.capacity, "used": self._used, "items": len(self._items)}

    def node_id(self) -> str:
        """The Ray node this store runs on (hex)."""
        import ray

        return ray.get_runtime_context().get_node_id()


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
        self._headers: dict[str, dict[str, Any]] = {}
        self._pending: dict[str, tuple[Any, Any]] = {}  # key -> (store's answer, driver's object)
        self._owned: dict[str, Any] = {}  # key -> the store-owned object (or the driver's, on failure)
        self._failed = 0
        # Guards the bookkeeping: a background prefetcher reads while the engine thread spills.
        self._lock = threading.RLock()

    def used(self) -> int:
        return sum(self._used_by)

    def charge(self, blob: StateBlob) -> int:
        return blob.nbytes()

    def can_fit(self, nbytes: int) -> bool:
        return max(c - u for c, u in zip(self._cap, self._used_by)) >= nbytes

    def put(self, key: str, blob: StateBlob) -> int:
        with self._lock:
            return self._put(key, blob)

    def _put(self, key: str, blob: StateBlob) -> int:
        if key in self._where:
            raise StorageError(f"peer tier already holds session {key!r}")
        self._reap()
        header, parts = pack_views(blob)
        nbytes = sum(p.nbytes for p in parts)
        free = [c - u for c, u in zip(self._cap, self._used_by)]
        best = max(range(len(free)), key=free.__getitem__)
        if free[best] < nbytes:
            raise TierFullError(
                f"peer tier is full: session {key!r} needs {nbytes} bytes, the freest store has {free[best]}"
            )
        try:
            local = self._ray.put(parts)
            confirm = self.stores[best].put.remote(key, [local], nbytes)
        except Exception as exc:  # Ray refused the bytes: the caller keeps the state
            raise StorageError(f"peer tier could not send session {key!r}: {exc}") from exc
        self._where[key] = (best, nbytes)
        self._headers[key] = header
        self._pending[key] = (confirm, local)
        self._used_by[best] += nbytes
        return nbytes

    def _confirm(self, key: str) -> None:
        """Wait for the store's answer to a pending put; on failure keep serving the driver's copy."""
        confirm, local = self._pending.pop(key)
        try:
            (own,) = self._ray.get(confirm)
            self._owned[key] = own
        except Exception:  # noqa: BLE001 - the store failed; the driver's object still holds the state
            self._owned[key] = local
            self._failed += 1

    def _reap(self) -> None:
        """Collect answers of puts that have finished (no waiting)."""
        if not self._pending:
            return
        done, _ = self._ray.wait([c for c, _ in self._pending.values()], num_returns=len(self._pending), timeout=0)
        done_ids = {d.hex() for d in done}
        for key in [k for k, (c, _) in self._pending.items() if c.hex() in done_ids]:
            self._confirm(key)

    def get(self, key: str) -> StateBlob:
        with self._lock:
            if key not in self._where:
                raise KeyError(f"peer tier does not hold session {key!r}")
            if key in self._pending:
                self._confirm(key)
            owned, header, idx = self._owned[key], self._headers[key], self._where[key][0]
        try:
            parts = self._ray.get(owned)
        except Exception as exc:
            raise StorageError(f"peer store {idx} could not return session {key!r}: {exc}") from exc
        return unpack_parts(header, parts)

    def delete(self, key: str) -> None:
        with self._lock:
            idx, n = self._where.pop(key)
            self._used_by[idx] -= n
            self._headers.pop(key)
            self._pending.pop(key, None)
            self._owned.pop(key, None)
        self.stores[idx].delete.remote(key)  # fire and forget; calls from one caller run in order

    def keys(self) -> Iterable[str]:
        return list(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def store_stats(self) -> list[dict[str, int]]:
        with self._lock:
            for key in list(self._pending):
                self._confirm(key)
        return self._ray.get([s.stats.remote() for s in self.stores])

    def failed_puts(self) -> int:
        """Puts a store did not take (their states are served from the driver's objects)."""
        return self._failed
