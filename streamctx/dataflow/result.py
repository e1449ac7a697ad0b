"""What a job reports: progress while it runs and a `JobResult` at the end."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import pyarrow as pa


@dataclass(frozen=True)
class Progress:
    """A snapshot passed to `on_progress` after each batch reaches the sink.

    `last_offset` is the committed replay offset (see `JobResult.last_offset`).
    """

    records_in: int
    records_out: int
    dead_letters: int
    in_flight: int
    elapsed_s: float
    last_offset: int


@dataclass
class SessionStats:
    """Session accounting over all keyed stages (segment, user stages, model).

    `live`/`bytes`: what is still held at the end (zero after a finished stream).
    `peak_live`/`peak_bytes`: the largest values seen while running (sampled per stage replica).
    `ended`: why sessions ended: "end" record, "ttl", or "close" (still live when the stream ended).
    """

    live: int = 0
    bytes: int = 0
    peak_live: int = 0
    peak_bytes: int = 0
    ended: dict[str, int] = field(default_factory=lambda: {"end": 0, "ttl": 0, "close": 0})


@dataclass
class JobResult:
    """The outcome of `run_job`.

    outputs/dead_letter: the rows written (kept in memory only for the `memory` sink; None otherwise).
    metrics: throughput, in-flight bound, queue depths, throttled time, per-stage timings.
    last_offset: the source offset to replay from: every record before it is committed to the sink
    (for file sinks: in a committed part file).
    """

    name: str
    runner: str
    records_in: int
    records_out: int
    dead_letters: int
    elapsed_s: float
    last_offset: int
    sessions: SessionStats
    metrics: dict[str, Any]
    outputs: Optional[pa.Table] = None
    dead_letter: Optional[pa.Table] = None
    sink_files: list[str] = field(default_factory=list)
