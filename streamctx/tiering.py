"""An engine's sessions under the memory-budget scheduler: idle state spills, restored before use.

`TieredSessions(engine, scheduler)` hands out live `Session`s by id, like `engine.session(sid)`,
while keeping at most `max_live` of them in the engine's KV pool. A session that is released (or
pushed out as the least recently used live one) is saved (`Session.save()`, the exact state:
KV, positions, last logits, chat history, policy state) as a `StateBlob` and admitted to the
scheduler, which places it on the device, host, peer or disk tier under their byte budgets. Asking
for it again restores it from wherever it is (a prefetch, hinted by `hint_upcoming`, has already
brought it to the device tier when the hint came early enough).

    tiered = TieredSessions(engine, MemoryBudgetScheduler([device, host, peer, disk]), max_live=4)
    s = tiered.session("conv-42")       # live; restored from its tier if it was spilled
    s.feed("..."); s.generate(8)
    tiered.release("conv-42")           # optional: spill now (else when max_live is exceeded)
    tiered.hint_upcoming(["conv-7", "conv-9"])   # queued next: prefetched toward the device
    tiered.close("conv-42")             # session ended: state freed in every tier
    tiered.stats()

Memory: the scheduler's device tier holds the snapshots of idle sessions (its budget is checked on
the live tensors, `MemoryBudgetScheduler.live_device_bytes`); live sessions hold their KV in the
engine's pool (`working_bytes` in `stats()`), at most `max_live` of them. A live session's
snapshot is not kept while it is live (no double holding): it is read from its tier, restored,
and dropped from the scheduler; releasing admits the new snapshot.

Exactness: save -> tier moves -> restore is bit-exact (each tier is), so a session gives the same
outputs as one that never left the engine, up to one difference in how work is chunked: saving
flushes a pending generated token (a one-token forward) that a never-saved session would feed
together with its next input (DESIGN contract 8: same tokens, logits within tolerance).

Lost state: when a tier loses a spilled state (a peer store's node died), using the session, a
snapshot or a demotion that reads it raises `StateLostError`; the session never continues from
empty state. `restore()` (from a checkpoint) forgets every session and has the tiers replace lost
stores (`replace_lost`).

Not thread-safe (the engine is not); the scheduler's background prefetcher is.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from streamctx.engine import Engine, EngineError, Session
from streamctx.schedulers.memory_budget import MemoryBudgetScheduler
from streamctx.state import StateBlob

__all__ = ["TieredSessions", "tiered_sessions"]

log = logging.getLogger(__name__)


class TieredSessions:
    """Live sessions of `engine` (at most `max_live`), the rest spilled through `scheduler`."""

    def __init__(self, engine: Engine, scheduler: MemoryBudgetScheduler, *, max_live: int = 1,
                 prefetch_on_hint: bool = True) -> None:
        if max_live < 1:
            raise ValueError(f"max_live must be >= 1, got {max_live}")
        self.engine = engine
        engine.tiering = self  # engine.stats() reports the tiers
        self.scheduler = scheduler
        self.max_live = max_live
        self.prefetch_on_hint = prefetch_on_hint
        self._live: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._counts = dict.fromkeys(["new", "checkouts", "releases", "auto_releases", "closes"], 0)
        self._save_s = 0.0
        self._restore_s = 0.0
        self.peer_unavailable: str | None = None  # why a configured peer tier was left out

    # ---- the engine-facing API -----------------------------------------------------------------
    def session(self, session_id: str) -> Session:
        """The live session `session_id`: already live, restored from its tier, or new."""
        live = self._live.get(session_id)
        if live is not None and not live.closed:
            self._live.move_to_end(session_id)
            return live
        self._live.pop(session_id, None)
        self._make_room(keep=session_id)
        if session_id in self.engine.sessions:
            raise EngineError(f"session {session_id!r} is live in the engine outside TieredSessions")
        if self._known(session_id):
            s = self._restore(session_id)
            self._counts["checkouts"] += 1
        else:
            s = self.engine.session(session_id)
            self._counts["new"] += 1
        self._live[session_id] = s
        return s

    @contextmanager
    def use(self, session_id: str) -> Iterator[Session]:
        """`with tiered.use(sid) as s: ...`: the session, released when the block ends."""
        s = self.session(session_id)
        try:
            yield s
        finally:
            if not s.closed and self._live.get(session_id) is s:
                self.release(session_id)

    def release(self, session_id: str) -> None:
        """Spill a live session now: its exact state goes to the scheduler, its KV back to the pool.
        If the scheduler cannot take it (a full or failed tier), the session stays live."""
        s = self._live.get(session_id)
        if s is None:
            raise KeyError(f"session {session_id!r} is not live")
        if s.closed:  # closed by its user: nothing to keep
            del self._live[session_id]
            self._forget(session_id)
            return
        t0 = time.perf_counter()
        blob = StateBlob.from_bytes(s.save())
        self.scheduler.admit(session_id, blob)
        del self._live[session_id]
        s.close()
        self._save_s += time.perf_counter() - t0
        self._counts["releases"] += 1

    def close(self, session_id: str) -> None:
        """The session ended: its live state and any spilled copy are freed."""
        s = self._live.pop(session_id, None)
        if s is not None:
            s.close()
        self._forget(session_id)
        self._counts["closes"] += 1

    def hint_upcoming(self, session_ids: Sequence[str]) -> None:
        """Sessions with queued work, next first: their state moves toward the device ahead of use."""
        self.scheduler.hint_upcoming([s for s in session_ids if s not in self._live])
        if self.prefetch_on_hint and not self.scheduler.prefetcher_running:
            self.scheduler.prefetch()

    def release_all(self) -> None:
        for sid in list(self._live):
            self.release(sid)

    def close_tiers(self) -> None:
        """Stop the prefetcher and remove what the tiers hold outside memory (the spill directory)."""
        self.scheduler.close()
        for tier in self.scheduler.tiers:
            close = getattr(tier, "close", None)
            if close is not None:
                close()

    def snapshot(self) -> dict[str, bytes]:
        """Every session's exact state (`Session.save()` bytes), live or spilled; nothing moves."""
        out = {sid: s.save() for sid, s in self._live.items() if not s.closed}
        for sid in self.scheduler.sessions():
            out[sid] = self.scheduler.peek(sid).to_bytes()
        return out

    def restore(self, states: dict[str, bytes]) -> None:
        """Forget every session (lost states included), have the tiers replace stores they lost,
        then take `states` (from `snapshot`) as spilled sessions."""
        for sid in [*self._live, *self.scheduler.sessions()]:
            self.close(sid)
        for tier in self.scheduler.tiers:
            replace_lost = getattr(tier, "replace_lost", None)
            if callable(replace_lost):
                replace_lost()
        for sid, data in states.items():
            self.scheduler.admit(sid, StateBlob.from_bytes(data))

    # ---- inspection ----------------------------------------------------------------------------
    def live(self) -> list[str]:
        return list(self._live)

    def session_ids(self) -> list[str]:
        """Every session held: live ones first, then spilled ones."""
        return [*self._live, *(s for s in self.scheduler.sessions() if s not in self._live)]

    def session_nbytes(self) -> dict[str, int]:
        """State bytes per session: live ones (KV in the engine's pool), then spilled snapshots."""
        m = self.engine.model
        out = {sid: m.state_nbytes(s.state) for sid, s in self._live.items() if not s.closed}
        for sid, n in self.scheduler.session_nbytes().items():
            out.setdefault(sid, n)
        return out

    def working_bytes(self) -> int:
        """KV/state bytes the live sessions hold in the engine."""
        return sum(self.engine.model.state_nbytes(s.state) for s in self._live.values() if not s.closed)

    def stats(self) -> dict[str, Any]:
        """The scheduler's stats (bytes per tier, spills, restores, hit rate, stall) plus the
        engine side: live sessions, their working bytes, save/restore seconds."""
        st = self.scheduler.stats()
        st["drops"] -= self._counts["checkouts"]  # a checkout leaves the scheduler too; count ended sessions only
        gets = st["hits"] + st["misses"]
        st.update(
            live_sessions=len(self._live), working_bytes=self.working_bytes(),
            tier_bytes={name: t["used"] for name, t in st["tiers"].items()},
            prefetch_hit_rate=(st["prefetch_hits"] / gets if gets else None),
            save_s=self._save_s, restore_s=self._restore_s,
            stall_s=st["stall_s"] + self._restore_s,
            **self._counts,
        )
        peer = [t.peer_stats() for t in self.scheduler.tiers if callable(getattr(t, "peer_stats", None))]
        if peer or self.peer_unavailable is not None:
            st["peer"] = peer[0] if peer else {"unavailable": self.peer_unavailable, "stores": 0}
        return st

    # ---- internals -----------------------------------------------------------------------------
    def _known(self, session_id: str) -> bool:
        try:
            self.scheduler.tier_of(session_id)
        except KeyError:
            return False
        return True

    def _forget(self, session_id: str) -> None:
        if self._known(session_id):
            self.scheduler.drop(session_id)

    def _make_room(self, keep: str) -> None:
        while len(self._live) >= self.max_live:
            victim = next(s for s in self._live if s != keep)
            self.release(victim)
            self._counts["auto_releases"] += 1

    def _restore(self, session_id: str) -> Session:
        # The scheduler's own read (a restore to the device tier, counted as hit or miss, timed as
        # its stall); then into the engine, and out of the scheduler while live.
        blob = self.scheduler.get(session_id, pin=True)
        t0 = time.perf_counter()
        try:
            s = self.engine.session(session_id, state=blob.to_bytes())
        except Exception:
            self.scheduler.unpin(session_id)
            raise
        self.scheduler.drop(session_id)
        self._restore_s += time.perf_counter() - t0
        return s


def tiered_sessions(engine: Engine, device_budget: int, *, host_budget: int | None = None,
                    peer_budget: int | None = None, peer_stores: int = 1, peer_tier: Any = None,
                    spill_dir: str | None = None, max_live: int = 1,
                    background_prefetch: bool = False) -> TieredSessions:
    """`TieredSessions` over the usual tiers: device (`device_budget` bytes), host (`host_budget`,
    None: unbounded, then nothing goes further), peer, and disk (a private spill directory under
    `spill_dir`, or the system temp dir). Placement: lookahead over LRU.

    Peer tier (needs a bounded host tier): `peer_tier`, a `PeerTier` over stores the caller placed;
    or `peer_budget` bytes over `peer_stores` state-store actors that `PeerTier.on_other_nodes`
    spreads over the Ray nodes other than this process's. Where there is no other node (a single
    node, or no Ray in this process) the peer tier is left out, host spills straight to disk, and
    the reason is logged and reported in `stats()["peer"]["unavailable"]`.

    The caller closes the tiers when done (`.close_tiers()`: the prefetcher, the spill directory,
    the peer stores this call started)."""
    from streamctx.schedulers.placement import LRU, Lookahead
    from streamctx.storage import DiskTier, MemoryTier

    if (peer_budget is not None or peer_tier is not None) and host_budget is None:
        raise ValueError("a peer tier needs a host_budget: with an unbounded host tier nothing spills further")
    if peer_budget is not None and peer_tier is not None:
        raise ValueError("give either peer_budget (stores placed on other nodes) or peer_tier, not both")
    unavailable = None
    if peer_budget is not None:
        from streamctx.storage.peer import PeerTier, PeerUnavailableError

        try:
            peer_tier = PeerTier.on_other_nodes(int(peer_budget), peer_stores)
        except PeerUnavailableError as exc:
            unavailable = str(exc)
            log.warning("peer tier left out: %s; sessions spill from host straight to disk", exc)
    tiers: list[Any] = [MemoryTier("device", engine.model.device, device_budget),
                        MemoryTier("host", "cpu", host_budget, pin_memory=True)]
    if host_budget is not None:
        if peer_tier is not None:
            tiers.append(peer_tier)
        tiers.append(DiskTier(spill_dir))
    sched = MemoryBudgetScheduler(tiers, Lookahead(LRU()))
    if background_prefetch:
        sched.start_prefetcher()
    tiered = TieredSessions(engine, sched, max_live=max_live)
    tiered.peer_unavailable = unavailable
    return tiered
