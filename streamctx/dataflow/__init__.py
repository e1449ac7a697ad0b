"""The streaming dataflow runtime: keyed stages on Ray actors (or in-process), Arrow batches between
them, bounded in-flight data, session lifecycle (DESIGN.md contracts 7 and 9).

`run_job(spec)` runs a `streamctx.spec.JobSpec` to completion and returns a `JobResult`.
"""

from __future__ import annotations

from streamctx.dataflow.job import run_job
from streamctx.dataflow.result import JobResult, Progress, SessionStats
from streamctx.dataflow.routing import key_group, replica_of

__all__ = ["JobResult", "Progress", "SessionStats", "key_group", "replica_of", "run_job"]
