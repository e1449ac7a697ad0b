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

A new state goes to the live store with the most free budget (tracked locally: choosing costs no
round trip); stores also enforce their capacity.

Losing a store (its process or node died) loses the states it confirmed: reading one raises
`StateLostError`, never an empty or stale state, and the store no longer counts toward the tier's
capacity. `PeerTier.on_other_nodes` places its own stores on nodes other than the caller's and,
through `replace_lost()`, replaces lost ones once their sessions are forgotten (the dataflow
runtime does that when it restores a replica from a checkpoint).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import Counter
from typing import Any, Callable, Iterable, Sequence

from streamctx.state import StateBlob

from .base import StateLostError, StorageError, TierFullError
from .packing import pack_views, unpack_parts

log = logging.getLogger(__name__)

STORE_NAME_PREFIX = "streamctx-state-store-"  # named actors: `ray.util.list_named_actors()` finds them


class PeerUnavailableError(RuntimeError):
    """No peer tier can be placed: Ray is not running in this process, or no other node is alive."""


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

    def pid(self) -> int:
        """The store's worker process id (fault-injection tests)."""
        import os

        return os.getpid()


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


def spawn_state_stores_elsewhere(n: int, capacity: int, *, occupied: Sequence[str] = (),
                                 start_timeout_s: float = 60.0) -> list[Any]:
    """Start `n` named state stores of `capacity` bytes on alive nodes other than this process's,
    each on the node holding the fewest stores so far (counting `occupied`: node ids of stores
    already placed). Hard node affinity (Ray's soft affinity may place a store on any node while a
    new node's resources are not yet known to the scheduler); a store whose node died before it
    started is started again on another node. Raises `PeerUnavailableError` with the reason when
    Ray is not initialised here or no other node is alive."""
    import ray

    if not ray.is_initialized():
        raise PeerUnavailableError("Ray is not initialised in this process (the local runner), so there are "
                                   "no peer nodes")
    here = ray.get_runtime_context().get_node_id()
    placed: list[Any] = []
    occupied = list(occupied)
    for _ in range(3):
        nodes = sorted(nd["NodeID"] for nd in ray.nodes() if nd["Alive"] and nd["NodeID"] != here)
        if not nodes:
            raise PeerUnavailableError(f"no alive Ray node other than this one ({here[:12]}) to hold state stores")
        started = _start_on(_spread(n - len(placed), nodes, occupied), capacity)
        for node, store in started:
            try:
                ray.get(store.stats.remote(), timeout=start_timeout_s)
            except Exception:  # noqa: BLE001 - its node died meanwhile (or it never started): try another
                ray.kill(store)
                continue
            placed.append(store)
            occupied.append(node)
        if len(placed) == n:
            return placed
    for store in placed:
        ray.kill(store)
    raise PeerUnavailableError(f"state stores did not start on the other nodes {nodes} within three tries")


def _spread(n: int, nodes: list[str], occupied: Sequence[str]) -> list[str]:
    """`n` nodes for new stores, each the one holding the fewest stores so far (ties: by id)."""
    load = Counter({nd: 0 for nd in nodes})
    load.update(o for o in occupied if o in load)
    out = []
    for _ in range(n):
        node = min(nodes, key=lambda nd: (load[nd], nd))
        load[node] += 1
        out.append(node)
    return out


def _start_on(nodes: list[str], capacity: int) -> list[tuple[str, Any]]:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    opts = [{"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False),
             "name": STORE_NAME_PREFIX + uuid.uuid4().hex[:12]} for node in nodes]
    return list(zip(nodes, spawn_state_stores(len(nodes), capacity, options=opts)))


def _is_gone(exc: BaseException) -> bool:
    """Whether a Ray error means the store (its process or node) is gone for good."""
    import ray

    ex = ray.exceptions
    return isinstance(exc, (ex.RayActorError, ex.ObjectLostError, ex.OwnerDiedError, ex.NodeDiedError))


class PeerTier:
    """Tier store over state-store actors; `capacity` is the sum of the live ones'.

    respawn: makes a replacement for a lost store, `(capacity, node ids of the live stores) ->
    store handle` (raising `PeerUnavailableError` when it cannot); without it lost stores stay out.
    get_timeout_s: a store-owned state that cannot be read within this time counts as lost.
    """

    def __init__(self, stores: Sequence[Any], *, name: str = "peer",
                 respawn: Callable[[int, list[str]], Any] | None = None, get_timeout_s: float = 60.0) -> None:
        import ray

        if not stores:
            raise ValueError("PeerTier needs at least one state-store actor")
        self._ray = ray
        self.name = name
        self.get_timeout_s = get_timeout_s
        self.stores = list(stores)
        n = len(self.stores)
        info = ray.get([s.stats.remote() for s in self.stores] + [s.node_id.remote() for s in self.stores])
        stats, self.nodes = info[:n], [str(x) for x in info[n:]]
        self._cap = [int(s["capacity"]) for s in stats]
        self._used_by = [int(s["used"]) for s in stats]
        self._lost: dict[int, str] = {}  # store index -> why it counts as lost
        self.capacity = sum(self._cap)
        self._where: dict[str, tuple[int, int]] = {}  # key -> (store index, bytes)
        self._headers: dict[str, dict[str, Any]] = {}
        self._pending: dict[str, tuple[Any, Any]] = {}  # key -> (store's answer, driver's object)
        self._owned: dict[str, Any] = {}  # key -> the store-owned object (or the driver's, on failure)
        self._on_store: set[str] = set()  # keys whose only copy is the store's (lost with it)
        self._failed = 0
        self._counts = dict.fromkeys(["lost_stores", "replaced_stores", "lost_reads"], 0)
        self._respawn = respawn
        self._owns_stores = False  # `on_other_nodes`: close() ends the stores
        self.unavailable: str | None = None  # why a lost store could not be replaced
        # Guards the bookkeeping: a background prefetcher reads while the engine thread spills.
        self._lock = threading.RLock()

    @classmethod
    def on_other_nodes(cls, budget: int, stores: int = 1, *, name: str = "peer",
                       get_timeout_s: float = 60.0) -> "PeerTier":
        """A peer tier of `budget` bytes over `stores` stores of `budget // stores` bytes each,
        spread over the alive nodes other than this process's. The tier owns them: `close()` ends
        them and `replace_lost()` replaces lost ones. Raises `PeerUnavailableError` (with the
        reason) when there is no other node."""
        if stores < 1 or budget < stores:
            raise ValueError(f"a peer tier needs stores >= 1 and budget >= stores, got {stores} stores, "
                             f"{budget} bytes")
        each = budget // stores
        tier = cls(spawn_state_stores_elsewhere(stores, each), name=name, get_timeout_s=get_timeout_s,
                   respawn=lambda cap, occupied: spawn_state_stores_elsewhere(1, cap, occupied=occupied)[0])
        tier._owns_stores = True
        return tier

    # ---- the TierStore interface ---------------------------------------------------------------
    def used(self) -> int:
        return sum(u for i, u in enumerate(self._used_by) if i not in self._lost)

    def charge(self, blob: StateBlob) -> int:
        return blob.nbytes()

    def can_fit(self, nbytes: int) -> bool:
        free = self._free()
        return bool(free) and max(free.values()) >= nbytes

    def _free(self) -> dict[int, int]:
        return {i: c - u for i, (c, u) in enumerate(zip(self._cap, self._used_by)) if i not in self._lost}

    def put(self, key: str, blob: StateBlob) -> int:
        with self._lock:
            return self._put(key, blob)

    def _put(self, key: str, blob: StateBlob) -> int:
        if key in self._where:
            raise StorageError(f"peer tier already holds session {key!r}")
        self._reap()
        header, parts = pack_views(blob)
        nbytes = sum(p.nbytes for p in parts)
        free = self._free()
        if not free:
            raise TierFullError(f"peer tier has no live store for session {key!r} ({len(self._lost)} lost)")
        best = max(free, key=free.__getitem__)
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
            self._on_store.add(key)
        except Exception as exc:  # noqa: BLE001 - the store failed; the driver's object still holds the state
            self._owned[key] = local
            self._failed += 1
            if _is_gone(exc):
                self._mark_lost(self._where[key][0], f"{type(exc).__name__} on put")

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
            on_store = key in self._on_store
            if on_store and idx in self._lost:
                self._counts["lost_reads"] += 1
                raise StateLostError(f"the state of session {key!r} was on peer store {idx} (node "
                                     f"{self.nodes[idx][:12]}), which is lost: {self._lost[idx]}")
        try:
            parts = self._ray.get(owned, timeout=self.get_timeout_s)
        except Exception as exc:
            with self._lock:
                if on_store and _is_gone(exc):
                    self._mark_lost(idx, f"{type(exc).__name__} on read")
                self._counts["lost_reads"] += 1
            raise StateLostError(f"the state of session {key!r} on peer store {idx} (node {self.nodes[idx][:12]}) "
                                 f"cannot be read: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                                 ) from exc
        return unpack_parts(header, parts)

    def delete(self, key: str) -> None:
        with self._lock:
            idx, n = self._where.pop(key)
            self._used_by[idx] -= n
            self._headers.pop(key)
            self._pending.pop(key, None)
            self._owned.pop(key, None)
            self._on_store.discard(key)
            lost = idx in self._lost
        if not lost:
            self.stores[idx].delete.remote(key)  # fire and forget; calls from one caller run in order

    def keys(self) -> Iterable[str]:
        return list(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    # ---- lost stores ---------------------------------------------------------------------------
    def _mark_lost(self, idx: int, why: str) -> None:
        if idx in self._lost:
            return
        self._lost[idx] = why
        self.capacity = sum(c for i, c in enumerate(self._cap) if i not in self._lost)
        self._counts["lost_stores"] += 1
        held = sum(1 for k, (i, _) in self._where.items() if i == idx and k in self._on_store)
        log.warning("peer tier: state store %d on node %s is lost (%s); %d session state(s) on it are gone",
                    idx, self.nodes[idx][:12], why, held)

    def lost_stores(self) -> list[int]:
        with self._lock:
            return sorted(self._lost)

    def replace_lost(self, ping_timeout_s: float = 10.0) -> int:
        """Ping the live stores (one that is gone or silent for `ping_timeout_s` counts as lost),
        then replace every lost store that holds no session any more by a new one (`respawn`; for
        `on_other_nodes`, on another node). A lost store that cannot be
        replaced (no other node is alive) stays out of the capacity; the reason is in `unavailable`
        and the log. Returns the number of stores replaced."""
        ray = self._ray
        with self._lock:
            live = [i for i in range(len(self.stores)) if i not in self._lost]
        pings = {i: self.stores[i].stats.remote() for i in live}
        ready, _ = ray.wait(list(pings.values()), num_returns=len(pings), timeout=ping_timeout_s)
        ready_ids = {r.hex() for r in ready}
        for i, ref in pings.items():
            why = None
            if ref.hex() not in ready_ids:
                why = f"no answer within {ping_timeout_s:g} s"
            else:
                try:
                    ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - any failed ping: the store cannot be trusted
                    why = f"{type(exc).__name__} on ping"
            if why is not None:
                with self._lock:
                    self._mark_lost(i, why)
        if self._respawn is None:
            return 0
        replaced = 0
        with self._lock:
            for i in sorted(self._lost):
                if any(idx == i for idx, _ in self._where.values()):
                    continue  # sessions still refer to it: replace it once they are forgotten
                occupied = [nd for j, nd in enumerate(self.nodes) if j not in self._lost]
                try:
                    store = self._respawn(self._cap[i], occupied)
                    node = ray.get(store.node_id.remote(), timeout=ping_timeout_s)
                except PeerUnavailableError as exc:
                    if self.unavailable != str(exc):
                        log.warning("peer tier: lost store %d not replaced: %s; states spill past it", i, exc)
                    self.unavailable = str(exc)
                    break
                old = self.stores[i]
                self.stores[i], self.nodes[i], self._used_by[i] = store, str(node), 0
                del self._lost[i]
                self.capacity = sum(c for j, c in enumerate(self._cap) if j not in self._lost)
                self._counts["replaced_stores"] += 1
                replaced += 1
                self.unavailable = None
                try:
                    ray.kill(old)
                except Exception:  # noqa: BLE001 - already gone with its node
                    pass
        return replaced

    # ---- inspection and shutdown ---------------------------------------------------------------
    def store_stats(self) -> list[dict[str, int]]:
        with self._lock:
            for key in list(self._pending):
                self._confirm(key)
        return self._ray.get([s.stats.remote() for s in self.stores])

    def failed_puts(self) -> int:
        """Puts a store did not take (their states are served from the driver's objects)."""
        return self._failed

    def peer_stats(self) -> dict[str, Any]:
        """Stores (live, lost so far, replaced), their nodes, failed puts, reads of lost state."""
        with self._lock:
            return {"stores": len(self.stores), "live_stores": len(self.stores) - len(self._lost),
                    "nodes": list(self.nodes), "failed_puts": self._failed, "unavailable": self.unavailable,
                    **self._counts}

    def close(self) -> None:
        """End the stores this tier started (`on_other_nodes`); stores given to it are left alone."""
        if not self._owns_stores:
            return
        for s in self.stores:
            try:
                self._ray.kill(s)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self._owns_stores = False
