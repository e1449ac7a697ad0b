"""`run_job`: drive a job's records from its source through the stage graph to its sink.

The driver reads the source, validates records (bad ones go straight to the dead-letter sink),
routes each batch by session key group and keeps at most `runner.max_in_flight` records between
the source and the sink: when the bound is reached it waits for the oldest batch and writes it to
the sink before reading more, so a slow sink slows the source and memory stays bounded. Outputs
are delivered in submission order, which makes them identical on the local and Ray runners.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from typing import Any, Callable, Optional

import numpy as np

from streamctx.dataflow.executors import LocalExecutor, RayExecutor
from streamctx.dataflow.plan import build_plan, partition
from streamctx.dataflow.records import dead_table, public_view, validate_records
from streamctx.dataflow.result import JobResult, Progress, SessionStats
from streamctx.dataflow.stages import Envelope
from streamctx.io import MemorySink, open_sink, open_source
from streamctx.spec import JobSpec


def run_job(
    spec: JobSpec,
    *,
    runner: Optional[str] = None,
    address: Optional[str] = None,
    on_progress: Optional[Callable[[Progress], None]] = None,
) -> JobResult:
    """Run `spec` to the end of its source; outputs go to its sink.

    runner: "local" (in-process) or "ray" (a local Ray started on demand, or `address`);
    defaults to `spec.runner.type`. on_progress: called in this process after each sink write.
    """
    kind = runner or spec.runner.type
    if kind not in ("local", "ray"):
        raise ValueError(f"runner must be 'local' or 'ray', got {kind!r}")
    plan = build_plan(spec)
    executor: Any = LocalExecutor(plan) if kind == "local" else RayExecutor(
        plan, address=address or spec.runner.address, start_timeout_s=spec.runner.start_timeout_s)
    try:
        return _Driver(spec, kind, plan, executor, on_progress).run()
    finally:
        executor.shutdown()


class _Driver:
    def __init__(self, spec: JobSpec, kind: str, plan: list, executor: Any,
                 on_progress: Optional[Callable[[Progress], None]]) -> None:
        self.spec, self.kind, self.plan, self.ex = spec, kind, plan, executor
        self.on_progress = on_progress
        self.sink = open_sink(spec)
        self.dl_sink = open_sink(spec, dead_letter=True)
        # (handle, records, source offset to resume from once delivered (-1: none), submit time)
        self.inflight: deque[tuple[Any, int, int, float]] = deque()
        self.inflight_records = 0
        self.n_in = self.n_out = self.n_dead = 0
        self.bytes_in = 0
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

    def run(self) -> JobResult:
        spec = self.spec
        bound = spec.runner.max_in_flight
        bs = min(spec.runner.batch_size, bound)
        raws_it = open_source(spec).records()
        seq = 0
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
            batch, dead, seq = validate_records(raws, seq)
            self._dead(dead)
            resume = raws[-1].next_offset
            if batch is None:  # all dead: the offset moves on with the last batch still in flight
                if self.inflight:
                    self.inflight[-1] = (*self.inflight[-1][:2], resume, self.inflight[-1][3])
                else:
                    self.resume_offset = resume
                    self._commit_point()
                continue
            self.bytes_in += batch.nbytes
            parts = partition(batch, self.plan, spec.runner.key_groups)
            now = time.perf_counter()
            for i, (route, part) in enumerate(parts):
                # Only the last part of a batch moves the resume offset past the batch.
                off = resume if i == len(parts) - 1 else -1
                self.inflight.append((self.ex.submit(route, Envelope(part)), part.num_rows, off, now))
                self.inflight_records += part.num_rows
            self.max_inflight_records = max(self.max_inflight_records, self.inflight_records)
            self.max_inflight_batches = max(self.max_inflight_batches, len(self.inflight))
        self._drain(block=True)
        stats = self.ex.finish()
        files = self.sink.close() + self.dl_sink.close()
        self._commit_point()
        return self._result(stats, files)

    # --- delivery --------------------------------------------------------------------------------

    def _drain(self, *, block: bool) -> None:
        while self.inflight and (block or self.ex.done(self.inflight[0][0])):
            self._drain_one()

    def _drain_one(self) -> None:
        handle, n, off, t_sub = self.inflight.popleft()
        env: Envelope = self.ex.result(handle)
        self.inflight_records -= n
        self.latencies.append((time.perf_counter() - t_sub, n))
        t = time.perf_counter()
        if env.batch is not None and env.batch.num_rows:
            out = public_view(env.batch)
            self.sink.write(out)
            self.n_out += out.num_rows
        self._dead(env.dead)
        self.sink_s += time.perf_counter() - t
        if off >= 0:
            self.resume_offset = off
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
        depths = self.ex.queue_depths([h for h, *_ in self.inflight])
        self.depth_samples += 1
        for i, d in enumerate(depths):
            self.depth_max[i] = max(self.depth_max[i], d)
            self.depth_sum[i] += d

    def _dead(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            self.dl_sink.write(dead_table(rows))
            self.n_dead += len(rows)

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
