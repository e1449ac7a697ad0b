"""Keyed stages and the host that runs one replica of one (DESIGN.md contracts 7 and 9).

A stage is any object with `process(batch: pa.RecordBatch) -> pa.RecordBatch | None`, optionally
`end_session(session_id)`, `session_bytes() -> dict[str, int]` and `close()`; a stage with neither
session hook is stateless and skips the lifecycle bookkeeping. A `StageHost` wraps
one replica of it with the session lifecycle: it ends a session's state in the stage on an `end`
record, when the segment stage marks a new incarnation (`_fresh`, after an idle TTL), and when a
session has been idle past the TTL; it dead-letters the batch when the stage raises (except
`StateLostError`: state lost with a peer node fails the call, and the runtime recovers the job from
its last checkpoint); it accounts live sessions and their bytes. The same host runs in-process
(local runner) and inside a Ray actor.

The built-in `SegmentStage` is the lifecycle authority: turn order, duplicates, idle TTLs.

Checkpoints: `StageHost.snapshot()` returns the replica's state as `StateBlob` bytes (the host's
live-session table and counters plus the stage's own named blobs) and `restore(data)` puts it back.
A stage takes part through `snapshot() -> dict[str, bytes]` and `restore(blobs)`; a keyed user
stage without them cannot be checkpointed (a clear error when the job starts).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

import pyarrow as pa
import pyarrow.compute as pc

from streamctx.dataflow.records import CORE_NAMES, dead_row
from streamctx.spec import SessionsSpec
from streamctx.state import StateBlob
from streamctx.storage.base import StateLostError

HOST_STATE_KIND = "streamctx.stage_host"


@dataclass
class Envelope:
    """What travels between stages: one Arrow batch (or None when everything was dropped) plus
    the dead-letter rows produced upstream, so they reach the driver in order with the batch."""

    batch: Optional[pa.RecordBatch]
    dead: list[dict[str, Any]] = field(default_factory=list)


class _Live(NamedTuple):
    """When a live session was last seen: stream ordinal and monotonic time."""

    last_seq: int
    last_t: float


class SegmentStage:
    """Per-session turn order and lifecycle.

    For each record, in arrival order: a session idle past the TTL is ended first; a turn at or
    below the session's last processed turn is dead-lettered as a duplicate; otherwise the record
    passes with `_fresh` set when it starts a new session incarnation. An `end` record ends it.
    """

    name = "segment"

    def __init__(self, sessions: SessionsSpec) -> None:
        self.ttl_records = sessions.idle_ttl_records
        self.ttl_s = sessions.idle_ttl_s
        self.last_turn: dict[str, int] = {}
        self.ended = {"end": 0, "ttl": 0, "close": 0}

    def process_envelope(self, batch: pa.RecordBatch, live: dict[str, _Live], now: float
                         ) -> tuple[Optional[pa.RecordBatch], list[dict[str, Any]]]:
        sids = batch.column("session_id").to_pylist()
        turns = batch.column("turn").to_pylist()
        seqs = batch.column("_seq").to_pylist()
        ends = batch.column("end").to_pylist()
        offsets = batch.column("_offset").to_pylist()
        keep: list[int] = []
        fresh: list[bool] = []
        dead: list[dict[str, Any]] = []
        for i, sid in enumerate(sids):
            st = live.get(sid)
            if st is not None and self._expired(st, seqs[i], now):
                self._end(sid, live, "ttl")
                st = None
            last = self.last_turn.get(sid, -1)
            if turns[i] <= last:
                dead.append(dead_row(offsets[i], f"duplicate turn {turns[i]} (last processed turn {last})",
                                     stage=self.name, session_id=sid, turn=turns[i]))
                continue
            keep.append(i)
            fresh.append(st is None)
            self.last_turn[sid] = turns[i]
            live[sid] = _Live(seqs[i], now)
            if ends[i]:
                self._end(sid, live, "end")
        if not keep:
            return None, dead
        out = batch.take(pa.array(keep, type=pa.int64()))
        return out.append_column("_fresh", pa.array(fresh, type=pa.bool_())), dead

    def _expired(self, st: _Live, seq: int, now: float) -> bool:
        return (self.ttl_records is not None and seq - st.last_seq > self.ttl_records) or (
            self.ttl_s is not None and now - st.last_t > self.ttl_s)

    def _end(self, sid: str, live: dict[str, _Live], why: str) -> None:
        live.pop(sid, None)
        self.last_turn.pop(sid, None)
        self.ended[why] += 1

    def end_session(self, session_id: str) -> None:
        self.last_turn.pop(session_id, None)

    def session_bytes(self) -> dict[str, int]:
        return {}

    def snapshot(self) -> dict[str, bytes]:
        return {"last_turn": json.dumps(self.last_turn, sort_keys=True).encode(),
                "ended": json.dumps(self.ended).encode()}

    def restore(self, blobs: dict[str, bytes]) -> None:
        self.last_turn = {str(k): int(v) for k, v in json.loads(blobs.get("last_turn", b"{}")).items()}
        self.ended = {"end": 0, "ttl": 0, "close": 0, **json.loads(blobs.get("ended", b"{}"))}


class StageHost:
    """One replica of one stage with the session lifecycle around it."""

    def __init__(self, name: str, stage: Any, sessions: SessionsSpec) -> None:
        self.name = name
        self.stage = stage
        self.sessions = sessions
        self.live: dict[str, _Live] = {}
        self.ended = {"end": 0, "ttl": 0, "close": 0}
        self.peak_live = 0
        self.peak_bytes = 0
        self.calls = 0
        self.records = 0
        self.busy_s = 0.0
        self.errors = 0
        self._next_sweep_seq: float = 0
        self._next_sweep_t: float = 0
        self._has_end = callable(getattr(stage, "end_session", None))
        self._has_bytes = callable(getattr(stage, "session_bytes", None))
        # Built-in stages may dead-letter single records: process_dead(batch) -> (batch, dead rows).
        self._has_dead = callable(getattr(stage, "process_dead", None))
        # A stage without per-session hooks holds no session state: no lifecycle to track.
        self.keyed = isinstance(stage, SegmentStage) or self._has_end or self._has_bytes

    # --- the data path ---------------------------------------------------------------------------

    def step(self, env: Envelope) -> Envelope:
        if env.batch is None or env.batch.num_rows == 0:
            return Envelope(None, env.dead)
        t0 = time.perf_counter()
        now = time.monotonic()
        batch = env.batch
        self.calls += 1
        self.records += batch.num_rows
        dead = list(env.dead)
        if isinstance(self.stage, SegmentStage):
            out, more = self.stage.process_envelope(batch, self.live, now)
            dead += more
            self._account()
            self._sweep(batch, now)
        else:
            self._before(batch, now)
            try:
                if self._has_dead:
                    out, more = self.stage.process_dead(batch)
                    dead += more
                else:
                    out = self.stage.process(batch)
            except StateLostError:  # state gone with a peer node: recovered from a checkpoint, never dead-lettered
                raise
            except Exception as exc:  # a user stage's failure dead-letters its batch; the job goes on
                self.errors += 1
                out = None
                dead += _dead_batch(batch, self.name, f"stage {self.name!r} raised {type(exc).__name__}: {exc}")
            if out is not None and not self._has_dead:
                out = _reattach(batch, out)
            self._account()  # before `end` records free their sessions: peaks include them
            self._after(batch, now)
        self.busy_s += time.perf_counter() - t0
        return Envelope(out if out is not None and out.num_rows else None, dead)

    def _before(self, batch: pa.RecordBatch, now: float) -> None:
        if not self.keyed or "_fresh" not in batch.schema.names:
            return
        sids = batch.column("session_id").to_pylist()
        for sid, fresh in zip(sids, batch.column("_fresh").to_pylist()):
            if fresh and sid in self.live:  # the segment stage ended the old incarnation (idle TTL)
                self._end(sid, "ttl")
        seqs = batch.column("_seq").to_pylist()
        for sid, seq in zip(sids, seqs):
            self.live[sid] = _Live(seq, now)

    def _after(self, batch: pa.RecordBatch, now: float) -> None:
        if not self.keyed:
            return
        if "end" in batch.schema.names:
            mask = batch.column("end")
            if pc.any(mask).as_py():
                for sid in pc.filter(batch.column("session_id"), mask).to_pylist():
                    if sid in self.live:
                        self._end(sid, "end")
        self._sweep(batch, now)

    def _sweep(self, batch: pa.RecordBatch, now: float) -> None:
        """End sessions idle past the TTL.

        A replica receives batches split by route, and the parts' ordinals interleave, so `live`
        is not ordered by last record; a full scan runs only when the oldest survivor of the previous scan
        could have expired (`_next_sweep_*`), which keeps sweeps amortised O(1) per record.
        """
        ttl_r, ttl_s = self.sessions.idle_ttl_records, self.sessions.idle_ttl_s
        if ttl_r is None and ttl_s is None:
            return
        lo, hi = pc.min_max(batch.column("_seq")).values()
        max_seq = hi.as_py()
        if ttl_r is not None:  # sessions touched by this batch were last seen at `lo` or later
            self._next_sweep_seq = min(self._next_sweep_seq, lo.as_py() + ttl_r + 1)
        if max_seq < self._next_sweep_seq and now < self._next_sweep_t:
            return
        oldest_seq, oldest_t = float("inf"), float("inf")
        for sid, st in list(self.live.items()):
            if (ttl_r is not None and max_seq - st.last_seq > ttl_r) or (ttl_s is not None and now - st.last_t > ttl_s):
                self._end(sid, "ttl")
            else:
                oldest_seq, oldest_t = min(oldest_seq, st.last_seq), min(oldest_t, st.last_t)
        self._next_sweep_seq = oldest_seq + ttl_r + 1 if ttl_r is not None else float("inf")
        self._next_sweep_t = oldest_t + ttl_s if ttl_s is not None else float("inf")

    def _end(self, sid: str, why: str) -> None:
        self.live.pop(sid, None)
        if isinstance(self.stage, SegmentStage):
            self.stage.last_turn.pop(sid, None)
        elif self._has_end:
            self.stage.end_session(sid)
        self.ended[why] += 1

    def _account(self) -> None:
        self.peak_live = max(self.peak_live, len(self.live))
        if self._has_bytes:
            self.peak_bytes = max(self.peak_bytes, sum(self.stage.session_bytes().values()))

    # --- checkpoints -----------------------------------------------------------------------------

    @property
    def checkpointable(self) -> bool:
        """Stateless stages always are; keyed ones need `snapshot()` and `restore()`."""
        if isinstance(self.stage, SegmentStage) or not self.keyed:
            return True
        return callable(getattr(self.stage, "snapshot", None)) and callable(getattr(self.stage, "restore", None))

    def snapshot(self) -> bytes:
        """This replica's state as `StateBlob` bytes: stage blobs as uint8 tensors, the rest in meta."""
        if not self.checkpointable:
            raise TypeError(f"stage {self.name!r} keeps session state but has no snapshot()/restore() hooks")
        hook = getattr(self.stage, "snapshot", None)
        blobs: dict[str, bytes] = hook() if self.keyed and callable(hook) else {}
        keys = sorted(blobs)
        tensors = {f"b{i}": _u8(blobs[k]) for i, k in enumerate(keys)}
        meta = {"stage": self.name, "keys": keys,
                "live": {sid: st.last_seq for sid, st in self.live.items()}, "ended": self.ended,
                "peak_live": self.peak_live, "peak_bytes": self.peak_bytes, "calls": self.calls,
                "records": self.records, "errors": self.errors}
        return StateBlob(HOST_STATE_KIND, tensors, meta).to_bytes()

    def restore(self, data: Optional[bytes]) -> None:
        """Replace this replica's state with a snapshot (None: the empty state of a new job).

        Restored sessions count as seen now for the wall-clock TTL (monotonic clocks are per process).
        """
        if data is None:
            blob = StateBlob(HOST_STATE_KIND, {}, {"stage": self.name, "keys": [], "live": {},
                                                  "ended": {"end": 0, "ttl": 0, "close": 0}, "peak_live": 0,
                                                  "peak_bytes": 0, "calls": 0, "records": 0, "errors": 0})
        else:
            blob = StateBlob.from_bytes(data, expect_kind=HOST_STATE_KIND)
        meta = blob.meta
        if meta["stage"] != self.name:
            raise ValueError(f"checkpoint state of stage {meta['stage']!r} given to stage {self.name!r}")
        hook = getattr(self.stage, "restore", None)
        if self.keyed and callable(hook):
            hook({k: blob.tensors[f"b{i}"].numpy().tobytes() for i, k in enumerate(meta["keys"])})
        now = time.monotonic()
        self.live = {sid: _Live(int(seq), now) for sid, seq in meta["live"].items()}
        self.ended = dict(meta["ended"])
        self.peak_live, self.peak_bytes = int(meta["peak_live"]), int(meta["peak_bytes"])
        self.calls, self.records, self.errors = int(meta["calls"]), int(meta["records"]), int(meta["errors"])
        self._next_sweep_seq, self._next_sweep_t = 0, 0  # the next batch rescans every live session

    # --- control ---------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        seg_ended = self.stage.ended if isinstance(self.stage, SegmentStage) else None
        ended = {k: self.ended[k] + (seg_ended[k] if seg_ended else 0) for k in self.ended}
        return {
            "stage": self.name,
            "live": len(self.live),
            "bytes": sum(self.stage.session_bytes().values()) if self._has_bytes else 0,
            "peak_live": self.peak_live,
            "peak_bytes": self.peak_bytes,
            "ended": ended,
            "calls": self.calls,
            "records": self.records,
            "busy_s": self.busy_s,
            "errors": self.errors,
            # A model stage under a memory budget: its tiers (bytes, spills, restores, prefetch hits, stall).
            "tiers": self.stage.tier_stats() if callable(getattr(self.stage, "tier_stats", None)) else None,
        }

    def finish(self) -> dict[str, Any]:
        """End every session still live (the stream is over) and report."""
        for sid in list(self.live):
            self._end(sid, "close")
        if callable(getattr(self.stage, "close", None)):
            self.stage.close()
        return self.stats()


def _u8(data: bytes) -> Any:
    import torch

    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def _reattach(inp: pa.RecordBatch, out: pa.RecordBatch) -> pa.RecordBatch:
    """Keep the routing/lifecycle columns a user stage dropped (when it kept the rows)."""
    if out.num_rows != inp.num_rows:
        return out
    for name in CORE_NAMES + ["_fresh"]:
        if name in inp.schema.names and name not in out.schema.names:
            out = out.append_column(inp.schema.field(name), inp.column(name))
    return out


def _dead_batch(batch: pa.RecordBatch, stage: str, reason: str) -> list[dict[str, Any]]:
    names = batch.schema.names
    offs = batch.column("_offset").to_pylist() if "_offset" in names else [None] * batch.num_rows
    sids = batch.column("session_id").to_pylist() if "session_id" in names else [None] * batch.num_rows
    turns = batch.column("turn").to_pylist() if "turn" in names else [None] * batch.num_rows
    return [dead_row(o, reason, stage=stage, session_id=s, turn=t) for o, s, t in zip(offs, sids, turns)]

