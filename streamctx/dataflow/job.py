"""`run_job`: drive a job's records from its source through the stage graph to its sink.

The driver reads the source, validates records (bad ones travel with their batch to the
dead-letter sink), routes each batch by session key group and keeps at most `runner.max_in_flight`
records between the source and the sink: when the bound is reached it waits for the oldest batch
and writes it to the sink before reading more, so a slow sink slows the source and memory stays
bounded. Outputs are delivered in submission order, which makes them identical on the local and
Ray runners.

Checkpoints (`checkpoint.enabled`, Flink-style aligned barriers): every `interval_records` records
the driver queues a barrier (a snapshot call on every stage replica, behind the batches already
sent to it) into the same in-flight queue as the batches. When the barrier reaches the front, every
record before it is delivered: the sinks commit, and the manifest (source offset, stream ordinal,
sink positions, state files) completes the checkpoint. When a stage actor or node is lost, dead
actors are replaced, every replica is restored from the last checkpoint, the source replays from its
offset, and rows already written since that checkpoint are skipped by their (offset, session_id,
turn) key while the replay lasts: exactly-once output. `resume=True` does the same for a driver
that died, reading the rows its file sinks committed after the checkpoint.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa

from streamctx.dataflow.checkpoint import CheckpointError, CheckpointStore, Manifest, chk_dir
from streamctx.dataflow.executors import LocalExecutor, RayExecutor
from streamctx.dataflow.plan import build_plan, partition
from streamctx.dataflow.records import dead_table, public_view, validate_records
from streamctx.dataflow.result import JobResult, Progress, SessionStats
from streamctx.dataflow.stages import Envelope
from streamctx.io import FileSink, MemorySink, open_sink, open_source
from streamctx.spec import JobSpec


def run_job(
    spec: JobSpec,
    *,
    runner: Optional[str] = None,
    address: Optional[str] = None,
    on_progress: Optional[Callable[[Progress], None]] = None,
    resume: bool = False,
    on_start: Optional[Callable[[Any], None]] = None,
) -> JobResult:
    """Run `spec` to the end of its source; outputs go to its sink.

    runner: "local" (in-process) or "ray" (a local Ray started on demand, or `address`);
    defaults to `spec.runner.type`. on_progress: called in this process after each sink write.
    resume: continue from the job's last complete checkpoint (`checkpoint.enabled`); without it a
    checkpointed job starts over and drops its old checkpoints. on_start: called with the executor
    once the stage replicas are up (monitoring, fault-injection tests).
    """
    kind = runner or spec.runner.type
    if kind not in ("local", "ray"):
        raise ValueError(f"runner must be 'local' or 'ray', got {kind!r}")
    if resume and not spec.checkpoint.enabled:
        raise ValueError("resume needs checkpoints: set checkpoint.enabled: true in the job spec")
    plan = build_plan(spec)
    executor: Any = LocalExecutor(plan) if kind == "local" else RayExecutor(
        plan, address=address or spec.runner.address, start_timeout_s=spec.runner.start_timeout_s)
    try:
        driver = _Driver(spec, kind, plan, executor, on_progress, resume=resume)
        if on_start is not None:
            on_start(executor)
        return driver.run()
    finally:
        executor.shutdown()


@dataclass
class _Recovery:
    """Checkpoint and recovery bookkeeping of one run.

    delivered: keys of the rows written to the sinks since the last complete checkpoint; rows of
    records replayed after a failure (offset < replay_until) whose key is here are skipped.
    """

    last: Optional[Manifest] = None
    completed: int = 0
    count: int = 0
    replaced: int = 0
    skipped: int = 0
    replay_until: int = -1
    barrier_at_records: int = 0
    barrier_at_t: float = field(default_factory=time.monotonic)
    delivered: set[tuple[Any, ...]] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        return {"completed": self.completed, "last_id": self.last.ckpt_id if self.last else None,
                "recoveries": self.count, "replaced_actors": self.replaced, "replayed_rows_skipped": self.skipped,
                "failures": list(self.errors)}


def _failure_line(exc: BaseException) -> str:
    """One line naming a failure: for an error raised inside a stage actor, the stage's own error
    (`StateLostError: the state of session ...`), not Ray's wrapper."""
    cause = getattr(exc, "cause", None)
    err = cause if isinstance(cause, BaseException) else exc
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _out_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """An output row's identity: the record it answers (offset, session, turn)."""
    return (row["offset"], "out", row["session_id"], row["turn"])


def _dead_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["offset"], "dead", row["stage"], row["session_id"], row["turn"], row["reason"])


def _replayable(spec: JobSpec) -> bool:
    """Files always are; a Python source only when iterating it again starts over (not a generator)."""
    src = spec.source
    if src.type == "queue":
        return False
    return src.type != "iterator" or iter(src.obj) is not src.obj


def checkpoint_store(spec: JobSpec) -> CheckpointStore:
    """The job's checkpoint store: `checkpoint.filesystem` (Python only) with `checkpoint.path`, a
    filesystem URI, an absolute folder, or a folder inside the spec's folder (default
    `checkpoints/<job name>`; a relative path may not leave the spec's folder)."""
    c = spec.checkpoint
    path = c.path or f"checkpoints/{spec.name}"
    if c.filesystem is not None or "://" in path or Path(path).is_absolute():
        return CheckpointStore(path, c.filesystem)  # an explicit root: nothing is written outside it
    return CheckpointStore(str(spec.resolve_output(path)))


@dataclass
class _Part:
    """A part of a source batch in flight (handle None: nothing to collect, only dead letters
    and the offset to move on to)."""

    handle: Any
    records: int
    offset: int  # source offset to resume from once delivered (-1: none)
    t_submit: float
    dead: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Barrier:
    """A checkpoint barrier in flight: snapshot calls queued behind every batch submitted before it."""

    ckpt_id: int
    handle: Any
    offset: int
    seq: int
    records_in: int


class _Driver:
    def __init__(self, spec: JobSpec, kind: str, plan: list, executor: Any,
                 on_progress: Optional[Callable[[Progress], None]], *, resume: bool = False) -> None:
        self.spec, self.kind, self.plan, self.ex = spec, kind, plan, executor
        self.on_progress = on_progress
        self.sink = open_sink(spec)
        self.dl_sink = open_sink(spec, dead_letter=True)
        self.inflight: deque[_Part | _Barrier] = deque()
        self.inflight_records = 0
        self.n_in = self.n_out = self.n_dead = 0
        self.bytes_in = 0
        self.seq = 0
        self.read_from = spec.source.start_offset  # where the next source read starts
        self.read_pos = spec.source.start_offset  # the furthest source offset read so far
        self.resume_offset = spec.source.start_offset
        self.committed_offset = spec.source.start_offset
        self.max_inflight_records = 0
        self.max_inflight_batches = 0
        self.throttled_s = 0.0
        self.sink_s = 0.0
        self.latencies: list[tuple[float, int]] = []  # (seconds, records) per delivered part
        self.edges = [p.name for p in plan] + ["sink"]
        self.depth_max = [0] * len(self.edges)
        self.depth_sum = [0] * len(self.edges)
        self.depth_samples = 0
        self.t0 = time.perf_counter()
        self.ckpt = spec.checkpoint
        self.store = checkpoint_store(spec) if self.ckpt.enabled else None
        self.recovery = _Recovery()
        self.next_ckpt = 1
        if self.store is not None:
            self._start_checkpoints(resume)

    # --- checkpoints and recovery ----------------------------------------------------------------

    def _start_checkpoints(self, resume: bool) -> None:
        assert self.store is not None
        bad = self.ex.not_checkpointable()
        if bad:
            raise ValueError(f"checkpoint.enabled: stages {bad} keep session state but have no "
                             f"snapshot()/restore() hooks")
        rec = self.recovery
        if not resume:
            for cid in self.store.all_ids():  # a fresh run must never resume an older run's state
                self.store.fs.rmtree(chk_dir(cid))
            return
        m = self.store.latest()
        self.next_ckpt = self.store.next_id()
        if m is not None:
            plan = [(p.name, p.replicas) for p in self.plan]
            if m.plan != plan:
                raise CheckpointError(f"checkpoint {m.ckpt_id} in {self.store.root} was written by a job with "
                                      f"stages {m.plan}; this job has {plan}: resume needs the same stages "
                                      f"and replicas")
            self.ex.restore(self.store, m)
            self._rewind(m)
            rec.last = m
        # Parts the dead driver committed after its last checkpoint: their rows come again in the replay.
        for sink, key, name in ((self.sink, _out_key, "out"), (self.dl_sink, _dead_key, "dead_letter")):
            done = sink.committed_after(m.sinks.get(name) if m else None) if isinstance(sink, FileSink) else None
            if done is not None and done.num_rows:
                rec.delivered.update(key(r) for r in done.to_pylist())
                offs = [o for o in done.column("offset").to_pylist() if o is not None]
                rec.replay_until = max([rec.replay_until, *[o + 1 for o in offs]])

    def _rewind(self, m: Optional[Manifest]) -> None:
        start = self.spec.source.start_offset
        self.read_from = self.resume_offset = self.committed_offset = m.source_offset if m else start
        self.seq = m.seq if m else 0
        self.n_in = m.records_in if m else 0
        self.recovery.barrier_at_records = self.n_in
        self.recovery.barrier_at_t = time.monotonic()

    def _barrier_due(self) -> bool:
        rec, c = self.recovery, self.ckpt
        return self.store is not None and (self.n_in - rec.barrier_at_records >= c.interval_records or (
            c.interval_s is not None and time.monotonic() - rec.barrier_at_t >= c.interval_s))

    def _barrier(self, offset: int) -> None:
        assert self.store is not None
        rec = self.recovery
        rec.barrier_at_records, rec.barrier_at_t = self.n_in, time.monotonic()
        cid, self.next_ckpt = self.next_ckpt, self.next_ckpt + 1
        self.inflight.append(_Barrier(cid, self.ex.snapshot(cid, self.store), offset, self.seq, self.n_in))

    def _complete(self, b: _Barrier) -> None:
        """Every record before the barrier is in the sinks: commit them, then the manifest."""
        assert self.store is not None
        states = self.ex.snapshot_result(b.handle)
        self.sink.commit()
        self.dl_sink.commit()
        m = Manifest(b.ckpt_id, self.spec.name, b.offset, b.seq, b.records_in,
                     {"out": self.sink.position(), "dead_letter": self.dl_sink.position()}, states,
                     [(p.name, p.replicas) for p in self.plan])
        self.store.commit(m, keep=self.ckpt.keep)
        rec = self.recovery
        rec.last, rec.completed = m, rec.completed + 1
        # Outputs of records before the checkpoint can never be replayed again.
        rec.delivered = {k for k in rec.delivered if k[0] is not None and k[0] >= b.offset}

    def _recover(self, exc: BaseException) -> None:
        """A stage actor (or its node) was lost: new actors, every replica back to the last
        checkpoint, the source replays from its offset; outputs already delivered are skipped."""
        rec = self.recovery
        if not _replayable(self.spec):
            raise CheckpointError(f"cannot recover: the {self.spec.source.type} source cannot be read again from "
                                  f"an offset (a generator or a queue); use a list, a file or a re-iterable") from exc
        if rec.count >= self.ckpt.max_recoveries:
            raise CheckpointError(f"giving up after {rec.count} recoveries (checkpoint.max_recoveries)") from exc
        rec.count += 1
        rec.errors.append(_failure_line(exc))
        rec.replaced += self.ex.recover()
        assert self.store is not None
        self.ex.restore(self.store, rec.last)
        rec.replay_until = max(rec.replay_until, self.read_pos)
        self.inflight.clear()
        self.inflight_records = 0
        self._rewind(rec.last)

    def _skip_replayed(self, table: pa.Table, key: Callable[[dict[str, Any]], Any]) -> pa.Table:
        """Record what is written; while replaying, drop what was already written before the failure."""
        rec = self.recovery
        if self.store is None:
            return table
        rows = table.to_pylist()
        keys = [key(r) for r in rows]
        if rec.delivered and rec.replay_until > 0:
            keep = [i for i, (k, r) in enumerate(zip(keys, rows))
                    if not (k in rec.delivered and (r["offset"] is None or r["offset"] < rec.replay_until))]
            if len(keep) < len(rows):
                rec.skipped += len(rows) - len(keep)
                table = table.take(pa.array(keep, type=pa.int64()))
                keys = [keys[i] for i in keep]
        rec.delivered.update(keys)
        return table

    # --- the data path ---------------------------------------------------------------------------

    def run(self) -> JobResult:
        failure: Optional[BaseException] = None
        while True:
            try:
                if failure is not None:
                    self._recover(failure)
                    failure = None
                self._pump()
                stats = self.ex.finish()
                break
            except Exception as exc:
                if self.store is None or not self.ex.is_failure(exc):
                    raise
                failure = exc  # a failure during recovery itself starts the recovery over
        files = self.sink.close() + self.dl_sink.close()
        self._commit_point()
        return self._result(stats, files)

    def _pump(self) -> None:
        """Read from `read_from` to the end of the source, delivering everything."""
        spec = self.spec
        bound = spec.runner.max_in_flight
        bs = min(spec.runner.batch_size, bound)
        raws_it = open_source(spec, start_offset=self.read_from).records()
        self.read_pos = max(self.read_pos, self.read_from)
        while True:
            self._drain(block=False)
            if self.inflight and self.inflight_records + bs > bound:
                self._sample_depths()
            while self.inflight and self.inflight_records + bs > bound:
                t = time.perf_counter()
                self._drain_one()
                self.throttled_s += time.perf_counter() - t
            raws = list(itertools.islice(raws_it, bs))
            if not raws:
                break
            self.n_in += len(raws)
            batch, dead, self.seq = validate_records(raws, self.seq)
            resume = raws[-1].next_offset
            self.read_pos = max(self.read_pos, resume)
            now = time.perf_counter()
            if batch is None:  # all dead: delivered in order with what is in flight
                self.inflight.append(_Part(None, 0, resume, now, dead))
            else:
                self.bytes_in += batch.nbytes
                parts = partition(batch, self.plan, spec.runner.key_groups)
                for i, (route, part) in enumerate(parts):
                    # Only the last part of a batch moves the resume offset past the batch; the
                    # first carries the batch's dead letters (they travel with it, in order).
                    off = resume if i == len(parts) - 1 else -1
                    env = Envelope(part, dead if i == 0 else [])
                    self.inflight.append(_Part(self.ex.submit(route, env), part.num_rows, off, now))
                    self.inflight_records += part.num_rows
            if self._barrier_due():
                self._barrier(resume)
            self.max_inflight_records = max(self.max_inflight_records, self.inflight_records)
            self.max_inflight_batches = max(self.max_inflight_batches, len(self.inflight))
        self._drain(block=True)

    # --- delivery --------------------------------------------------------------------------------

    def _drain(self, *, block: bool) -> None:
        while self.inflight and (block or self._ready(self.inflight[0])):
            self._drain_one()

    def _ready(self, e: _Part | _Barrier) -> bool:
        if isinstance(e, _Barrier):
            return self.ex.snapshot_done(e.handle)
        return e.handle is None or self.ex.done(e.handle)

    def _drain_one(self) -> None:
        e = self.inflight[0]
        if isinstance(e, _Barrier):
            self._complete(e)
            self.inflight.popleft()
            return
        env: Envelope = self.ex.result(e.handle) if e.handle is not None else Envelope(None, e.dead)
        self.inflight.popleft()
        self.inflight_records -= e.records
        if e.records:
            self.latencies.append((time.perf_counter() - e.t_submit, e.records))
        t = time.perf_counter()
        if env.batch is not None and env.batch.num_rows:
            out = self._skip_replayed(pa.Table.from_batches([public_view(env.batch)]), _out_key)
            if out.num_rows:
                self.sink.write(out)
                self.n_out += out.num_rows
        self._dead(env.dead)
        self.sink_s += time.perf_counter() - t
        if e.offset >= 0:
            self.resume_offset = e.offset
        self._commit_point()
        if self.on_progress is not None:
            self.on_progress(Progress(self.n_in, self.n_out, self.n_dead, self.inflight_records,
                                      time.perf_counter() - self.t0, self.committed_offset))

    def _commit_point(self) -> None:
        """Everything before `resume_offset` is in the sinks; once they hold nothing uncommitted,
        a replay from there loses nothing (the offset a restart may use)."""
        if self.sink.flushed() and self.dl_sink.flushed():
            self.committed_offset = self.resume_offset

    def _sample_depths(self) -> None:
        """Batches queued on each edge, sampled whenever the in-flight bound throttles the source."""
        handles = [e.handle for e in self.inflight if isinstance(e, _Part) and e.handle is not None]
        depths = self.ex.queue_depths(handles)
        self.depth_samples += 1
        for i, d in enumerate(depths):
            self.depth_max[i] = max(self.depth_max[i], d)
            self.depth_sum[i] += d

    def _dead(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            table = self._skip_replayed(dead_table(rows), _dead_key)
            if table.num_rows:
                self.dl_sink.write(table)
                self.n_dead += table.num_rows

    # --- result ----------------------------------------------------------------------------------

    def _result(self, stats: list[list[dict[str, Any]]], files: list[str]) -> JobResult:
        elapsed = time.perf_counter() - self.t0
        sessions = SessionStats()
        stage_metrics = {}
        for p, reps in zip(self.plan, stats):
            stage_metrics[p.name] = {
                "replicas": p.replicas,
                "records": sum(s["records"] for s in reps),
                "calls": sum(s["calls"] for s in reps),
                "busy_s": sum(s["busy_s"] for s in reps),
                "errors": sum(s["errors"] for s in reps),
                "peak_live_sessions": sum(s["peak_live"] for s in reps),
                "peak_session_bytes": sum(s["peak_bytes"] for s in reps),
                "ended": {k: sum(s["ended"][k] for s in reps) for k in ("end", "ttl", "close")},
                "live_after": sum(s["live"] for s in reps),
                "bytes_after": sum(s["bytes"] for s in reps),
            }
            tiers = [s["tiers"] for s in reps if s.get("tiers")]
            if tiers:  # per replica: the memory-budget scheduler's stats (streamctx.tiering)
                stage_metrics[p.name]["tiers"] = tiers
            sessions.live += stage_metrics[p.name]["live_after"]
            sessions.bytes += stage_metrics[p.name]["bytes_after"]
            sessions.peak_live = max(sessions.peak_live, stage_metrics[p.name]["peak_live_sessions"])
            sessions.peak_bytes += stage_metrics[p.name]["peak_session_bytes"]
        # The segment stage is the lifecycle authority: its counts are the job's session counts.
        sessions.ended = dict(stage_metrics["segment"]["ended"])
        lat = _percentiles(self.latencies)
        metrics: dict[str, Any] = {
            "records_per_s": self.n_in / elapsed if elapsed > 0 else 0.0,
            "mb_per_s": self.bytes_in / 1e6 / elapsed if elapsed > 0 else 0.0,
            "bytes_in": self.bytes_in,
            "latency_p50_ms": lat[0] * 1e3,
            "latency_p99_ms": lat[1] * 1e3,
            "in_flight": {"bound": self.spec.runner.max_in_flight, "max_records": self.max_inflight_records,
                          "max_batches": self.max_inflight_batches},
            "throttled_s": self.throttled_s,
            # Edge "x": batches waiting to enter stage x (or the sink), sampled at each throttle.
            "queue_depth": {e: {"max": self.depth_max[i],
                                "mean": self.depth_sum[i] / self.depth_samples if self.depth_samples else 0.0}
                            for i, e in enumerate(self.edges)},
            "sink_s": self.sink_s,
            "stages": stage_metrics,
        }
        if self.store is not None:
            metrics["checkpoints"] = self.recovery.metrics()
        if isinstance(self.ex, RayExecutor):
            metrics["actor_startup_s"] = self.ex.startup_s
            metrics["nodes"] = {p.name: nodes for p, nodes in zip(self.plan, self.ex.nodes)}
        return JobResult(
            name=self.spec.name, runner=self.kind, records_in=self.n_in, records_out=self.n_out,
            dead_letters=self.n_dead, elapsed_s=elapsed, last_offset=self.committed_offset,
            sessions=sessions, metrics=metrics,
            outputs=self.sink.table() if isinstance(self.sink, MemorySink) else None,
            dead_letter=self.dl_sink.table() if isinstance(self.dl_sink, MemorySink) else None,
            sink_files=files,
        )


def _percentiles(samples: list[tuple[float, int]]) -> tuple[float, float]:
    """Record-weighted p50 and p99 of per-part latencies."""
    if not samples:
        return 0.0, 0.0
    secs = np.array([s for s, _ in samples])
    w = np.array([n for _, n in samples], dtype=np.float64)
    order = np.argsort(secs)
    cum = np.cumsum(w[order]) / w.sum()
    return float(secs[order][np.searchsorted(cum, 0.5)]), float(secs[order][min(np.searchsorted(cum, 0.99), len(cum) - 1)])
