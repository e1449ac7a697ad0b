"""Memory-budget scheduler: where each session's state lives (device, host, peer, disk).

Tiers are ordered fastest first; tier 0 is the device (GPU memory, or the engine's working pool on
a CPU-only machine) and is where the engine reads state. A full tier demotes its policy's first
victim to the fastest lower tier with room (or, when none has room, one tier down, cascading); a read of a state not on the device restores it there (a miss,
timed as stall). With `hint_upcoming` the dataflow runtime says which sessions have records queued;
`prefetch()` (or the background prefetcher) brings their state to the device before their turn,
evicting only sessions whose next use is later (Belady's rule on the known queue).

How the engine uses it (one scheduler per engine; all methods are thread-safe):

    sched.admit(sid, blob)            # new or updated state after a turn (unpins sid)
    blob = sched.get(sid, pin=True)   # state on the device for the next turn; pinned until admit/unpin
    sched.hint_upcoming(queue_sids)   # sessions with queued records, next first
    sched.drop(sid)                   # session ended: state freed and accounted
    sched.stats()                     # bytes per tier, spills, restores, hits/misses, stall time

Guarantees: tier 0 never holds more than its budget (checked on the live tensors' storages, see
`live_device_bytes`); every move is bit-exact; a failed move (full or unwritable tier) raises a clear
error and leaves the state where it was.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Any, Sequence

from streamctx.state import StateBlob
from streamctx.storage.base import TierFullError, TierStore
from streamctx.storage.memory import MemoryTier

from .placement import Entry, Lookahead, LRU, PlacementPolicy, PolicyContext

_FAR = 1 << 62


class MemoryBudgetScheduler:
    """Places session state across `tiers` (tier 0 the device) under their byte budgets."""

    def __init__(self, tiers: Sequence[TierStore], policy: PlacementPolicy | None = None, *,
                 fill_first: bool = True) -> None:
        """fill_first: a victim goes to the fastest lower tier that has room without evicting
        anything (one move); only when none has room does it cascade one tier down, evicting there.
        With `False` demotion always cascades (every state passes through every tier)."""
        if not tiers:
            raise ValueError("MemoryBudgetScheduler needs at least a device tier")
        if not isinstance(tiers[0], MemoryTier) or tiers[0].capacity is None:
            raise ValueError("tier 0 must be a MemoryTier with a byte capacity (the device budget)")
        self.tiers = list(tiers)
        self.device: MemoryTier = tiers[0]
        self.policy: PlacementPolicy = policy if policy is not None else Lookahead(LRU())
        self.fill_first = fill_first
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._level: dict[str, int] = {}
        self._nbytes: dict[str, int] = {}
        self._last: dict[str, int] = {}
        self._prio: dict[str, int] = {}
        self._pinned: set[str] = set()
        self._busy: set[str] = set()
        self._prefetched: set[str] = set()
        self._inflight: set[str] = set()  # being read by the prefetcher, outside the lock
        self._queue: list[str] = []
        self._clock = 0
        self._moves: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0.0])  # count, bytes, seconds
        self._counts = dict.fromkeys(
            ["hits", "misses", "prefetch_hits", "prefetches", "late_prefetches", "admits", "drops"], 0
        )
        self._stall_s = 0.0
        self._thread: threading.Thread | None = None
        self._stop = False

    # ---- engine-facing API -------------------------------------------------------------------

    def admit(self, session_id: str, blob: StateBlob, *, priority: int | None = None) -> None:
        """Store new or updated state on the device (demoting others as needed); unpins the session."""
        with self._lock:
            tier0 = self.device
            need = tier0.charge(blob)
            old = self._level.get(session_id)
            freed = self._nbytes[session_id] if old == 0 else 0
            self._busy.add(session_id)
            try:
                self._make_room(0, need - freed)
                if old == 0:
                    tier0.delete(session_id)
                    del self._level[session_id]
                tier0.put(session_id, blob)
                if old is not None and old != 0:  # the new state is in place before the old one goes
                    self.tiers[old].delete(session_id)
            finally:
                self._busy.discard(session_id)
            self._level[session_id] = 0
            self._nbytes[session_id] = need
            if priority is not None or session_id not in self._prio:
                self._prio[session_id] = priority or 0
            self._touch(session_id)
            self._pinned.discard(session_id)
            self._prefetched.discard(session_id)
            self._counts["admits"] += 1
            self._wake.notify_all()

    def get(self, session_id: str, *, pin: bool = False) -> StateBlob:
        """The session's state on the device (restored there if needed). `pin`: keep it there until
        the next `admit` or `unpin` of this session."""
        t0 = time.perf_counter()
        with self._lock:
            self._require(session_id)
            late = session_id in self._inflight
            while session_id in self._inflight:  # a prefetch of it is under way: wait for it
                self._wake.wait()
            level = self._require(session_id)
            if late:  # not on the device when asked: a miss, though a shorter stall
                self._counts["misses"] += 1
                self._counts["late_prefetches"] += 1
            elif level == 0:
                self._counts["hits"] += 1
                if session_id in self._prefetched:
                    self._counts["prefetch_hits"] += 1
            if level != 0:
                if not late:
                    self._counts["misses"] += 1
                self._busy.add(session_id)
                try:
                    self._bring_to_device(session_id, max_pos=None)
                finally:
                    self._busy.discard(session_id)
            self._prefetched.discard(session_id)
            self._consume(session_id)
            self._touch(session_id)
            if pin:
                self._pinned.add(session_id)
            blob = self.device.get(session_id)
            self._stall_s += time.perf_counter() - t0
            self._wake.notify_all()
            return blob

    def peek(self, session_id: str) -> StateBlob:
        """The state wherever it is, without moving it or counting a hit (for checkpoints)."""
        with self._lock:
            while session_id in self._inflight:
                self._wake.wait()
            return self.tiers[self._require(session_id)].get(session_id)

    def unpin(self, session_id: str) -> None:
        with self._lock:
            self._pinned.discard(session_id)

    def touch(self, session_id: str) -> None:
        """Mark the session as just used (for recency policies) without moving it."""
        with self._lock:
            self._require(session_id)
            self._touch(session_id)

    def set_priority(self, session_id: str, priority: int) -> None:
        with self._lock:
            self._require(session_id)
            self._prio[session_id] = priority

    def drop(self, session_id: str) -> None:
        """Forget a session (ended or expired): its state is freed in whichever tier holds it."""
        with self._lock:
            level = self._require(session_id)
            self.tiers[level].delete(session_id)
            for d in (self._level, self._nbytes, self._last, self._prio):
                d.pop(session_id, None)
            self._pinned.discard(session_id)
            self._prefetched.discard(session_id)
            self._queue = [s for s in self._queue if s != session_id]
            self._counts["drops"] += 1

    def hint_upcoming(self, session_ids: Sequence[str]) -> None:
        """The sessions with records queued, next first (replaces the previous hint)."""
        with self._lock:
            self._queue = [s for s in session_ids if s in self._level]
            self._wake.notify_all()

    def prefetch(self, limit: int | None = None) -> int:
        """Bring queued sessions' state to the device in queue order; returns how many moved."""
        moved = 0
        while limit is None or moved < limit:
            if not self._prefetch_one():
                break
            moved += 1
        return moved

    def start_prefetcher(self) -> None:
        """Prefetch in a background thread (reads outside the lock, so `get` interleaves)."""
        with self._lock:
            if self._thread is not None:
                return
            self._stop = False
            self._thread = threading.Thread(target=self._prefetch_loop, name="streamctx-prefetch", daemon=True)
            self._thread.start()

    def stop_prefetcher(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
            self._stop = True
            self._wake.notify_all()
        if thread is not None:
            thread.join()

    @property
    def prefetcher_running(self) -> bool:
        return self._thread is not None

    def close(self) -> None:
        self.stop_prefetcher()

    # ---- inspection --------------------------------------------------------------------------

    def tier_of(self, session_id: str) -> str:
        with self._lock:
            return self.tiers[self._require(session_id)].name

    def sessions(self) -> list[str]:
        with self._lock:
            return list(self._level)

    def session_nbytes(self) -> dict[str, int]:
        """Bytes of each held session's state."""
        with self._lock:
            return dict(self._nbytes)

    def live_device_bytes(self) -> int:
        """Bytes of the storages the device tier really holds (not the scheduler's accounting)."""
        with self._lock:
            return self.device.live_bytes()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            tiers = {
                t.name: {"capacity": t.capacity, "used": t.used(),
                         "sessions": sum(1 for lv in self._level.values() if lv == i)}
                for i, t in enumerate(self.tiers)
            }
            moves = {k: {"count": int(c), "bytes": int(b), "seconds": s,
                         "bandwidth_Bps": (b / s if s > 0 else None)} for k, (c, b, s) in self._moves.items()}
            spills = sum(int(v[0]) for k, v in self._moves.items() if _is_spill(k, self.tiers))
            gets = self._counts["hits"] + self._counts["misses"]
            return {
                "tiers": tiers,
                "device_live_bytes": self.device.live_bytes(),
                "moves": moves,
                "spills": spills,
                "restores": sum(int(v[0]) for v in self._moves.values()) - spills,
                **self._counts,
                "hit_rate": self._counts["hits"] / gets if gets else None,
                "stall_s": self._stall_s,
            }

    def reset_stats(self) -> None:
        """Zero the counters (hits, misses, moves, stall); placement is unchanged."""
        with self._lock:
            self._counts = dict.fromkeys(self._counts, 0)
            self._moves.clear()
            self._stall_s = 0.0

    # ---- internals ---------------------------------------------------------------------------

    def _require(self, session_id: str) -> int:
        try:
            return self._level[session_id]
        except KeyError:
            raise KeyError(f"unknown session {session_id!r}: admit its state first") from None

    def _touch(self, session_id: str) -> None:
        self._clock += 1
        self._last[session_id] = self._clock

    def _consume(self, session_id: str) -> None:
        if self._queue and self._queue[0] == session_id:
            self._queue.pop(0)
        elif session_id in self._queue:
            self._queue.remove(session_id)

    def _positions(self) -> dict[str, int]:
        pos: dict[str, int] = {}
        for i, s in enumerate(self._queue):
            pos.setdefault(s, i)
        return pos

    def _make_room(self, level: int, need: int, *, max_pos: int | None = None) -> None:
        """Demote victims from `level` until `need` bytes are free there.

        max_pos: only sessions whose next queued use is after this position (or none) may leave.
        """
        tier = self.tiers[level]
        if tier.capacity is None or need <= 0:
            return
        if need > tier.capacity:
            raise TierFullError(f"{tier.name} tier budget is {tier.capacity} bytes; a state of {need} bytes cannot fit")
        positions = self._positions()
        ctx = PolicyContext(upcoming=positions, now=self._clock)
        while not tier.can_fit(need):
            candidates = [
                Entry(s, self._nbytes[s], self._last.get(s, 0), self._prio.get(s, 0))
                for s in tier.keys()
                if s not in self._busy and s not in self._pinned
                and (max_pos is None or positions.get(s, _FAR) > max_pos)
            ]
            if not candidates:
                raise TierFullError(
                    f"{tier.name} tier cannot free {need} bytes ({tier.capacity - tier.used()} of "
                    f"{tier.capacity} free; every resident session is pinned, in use or needed sooner)"
                )
            victim = self.policy.eviction_order(candidates, ctx)[0].session_id
            self._demote(victim, level)

    def _demote(self, session_id: str, level: int) -> None:
        if level + 1 >= len(self.tiers):
            raise TierFullError(
                f"{self.tiers[level].name} tier is full and there is no tier below it for session {session_id!r}"
            )
        need = self._nbytes[session_id]
        if self.fill_first:
            for dst in range(level + 1, len(self.tiers)):
                if self.tiers[dst].can_fit(need):
                    self._move(session_id, level, dst)
                    self._prefetched.discard(session_id)
                    return
        self._busy.add(session_id)
        try:
            # Cascade one tier down; a tier whose residents are all busy (e.g. the session being
            # restored from it) is skipped.
            for dst in range(level + 1, len(self.tiers)):
                try:
                    self._make_room(dst, need)
                except TierFullError:
                    if dst == len(self.tiers) - 1:
                        raise
                    continue
                self._move(session_id, level, dst)
                break
        finally:
            self._busy.discard(session_id)
        self._prefetched.discard(session_id)

    def _bring_to_device(self, session_id: str, *, max_pos: int | None) -> None:
        self._make_room(0, self._nbytes[session_id], max_pos=max_pos)
        self._move(session_id, self._level[session_id], 0)

    def _move(self, session_id: str, src: int, dst: int) -> None:
        t0 = time.perf_counter()
        blob = self.tiers[src].get(session_id)
        self.tiers[dst].put(session_id, blob)  # raises with nothing changed if dst refuses
        self.tiers[src].delete(session_id)
        self._level[session_id] = dst
        self._record_move(src, dst, self._nbytes[session_id], time.perf_counter() - t0)

    def _record_move(self, src: int, dst: int, nbytes: int, seconds: float) -> None:
        rec = self._moves[f"{self.tiers[src].name}->{self.tiers[dst].name}"]
        rec[0] += 1
        rec[1] += nbytes
        rec[2] += seconds

    def _next_prefetch(self) -> tuple[str, int] | None:
        """The first queued session not on the device, with its queue position, if the queued
        sessions up to and including it fit in the device budget together."""
        budget = self.device.capacity or 0
        cum = 0
        seen: set[str] = set()
        for pos, sid in enumerate(self._queue):
            if sid in seen:
                continue
            seen.add(sid)
            cum += self._nbytes[sid]
            if cum > budget:
                return None
            if self._level[sid] != 0 and sid not in self._inflight:
                return sid, pos
        return None

    def _prefetch_one(self) -> bool:
        """Move the next queued session to the device, evicting only sessions needed later.

        The read from the slow tier runs without the lock, so `get` and `admit` of other sessions
        proceed meanwhile; the device put happens under the lock with the budget checked again.
        True when a move happened.
        """
        with self._lock:
            pick = self._next_prefetch()
            if pick is None:
                return False
            sid, pos = pick
            src = self._level[sid]
            try:
                self._make_room(0, self._nbytes[sid], max_pos=pos)
            except TierFullError:
                return False
            self._inflight.add(sid)
            self._busy.add(sid)
        t0 = time.perf_counter()
        blob: StateBlob | None = None
        try:
            blob = self.tiers[src].get(sid)
        except Exception:  # noqa: BLE001 - dropped or replaced meanwhile, or a failed read: no move
            blob = None
        finally:
            with self._lock:
                self._inflight.discard(sid)
                self._busy.discard(sid)
                moved = blob is not None and self._finish_prefetch(sid, src, pos, blob, t0)
                self._wake.notify_all()
        return moved

    def _finish_prefetch(self, sid: str, src: int, pos: int, blob: StateBlob, t0: float) -> bool:
        if self._level.get(sid) != src:  # admitted anew or dropped while we read it
            return False
        need = self._nbytes[sid]
        if not self.device.can_fit(need):
            try:
                self._make_room(0, need, max_pos=pos)
            except TierFullError:
                return False
        self.device.put(sid, blob)
        self.tiers[src].delete(sid)
        self._level[sid] = 0
        self._record_move(src, 0, need, time.perf_counter() - t0)
        self._prefetched.add(sid)
        self._counts["prefetches"] += 1
        return True

    def _prefetch_loop(self) -> None:
        while True:
            with self._lock:
                if self._stop:
                    return
            try:
                moved = self._prefetch_one()
            except Exception:  # noqa: BLE001 - a failed prefetch only costs a later miss
                moved = False
            if not moved:
                with self._lock:
                    if self._stop:
                        return
                    self._wake.wait(timeout=0.05)


def _is_spill(move: str, tiers: Sequence[TierStore]) -> bool:
    names = [t.name for t in tiers]
    src, dst = move.split("->")
    return names.index(dst) > names.index(src)
