"""Fault injection for the recovery tests: seeded SIGKILLs of stage actor processes, and the
exactly-once check of a job's output against a fault-free run."""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa

from streamctx.dataflow.checkpoint import MANIFEST, state_file

TIMING = {"latency_ms"}
# KV bytes a session holds include decode headroom: `kv.batch.reserve_run` moves a growing layer
# into a fresh run with a quarter spare, so the block count depends on the session's history, and a
# restored session starts with exactly ceil(length / block). Everything the model computes
# (tokens, replies, context and cached lengths) is compared.
ACCOUNTING = {"state_bytes"}
IGNORED = TIMING | ACCOUNTING


@dataclass
class Killer:
    """`on_progress` hook: SIGKILLs a seeded-random stage actor when the output passes each of
    `at_rows`; with `between=(first, last, stage_index)` also kills stage `last`'s replica 0 once,
    while a checkpoint holds stage `first`'s state file but not stage `last`'s (no manifest yet)."""

    seed: int
    at_rows: list[int]
    store_root: Optional[Path] = None
    between: Optional[tuple[int, int]] = None
    executor: Any = None
    kills: list[str] = field(default_factory=list)
    between_kills: int = 0
    interrupted: Optional[str] = None

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.pending = sorted(self.at_rows)

    def on_start(self, executor: Any) -> None:
        self.executor = executor

    def __call__(self, progress: Any) -> None:
        if self.pending and progress.records_out >= self.pending[0]:
            self.pending.pop(0)
            pids = self.executor.pids()
            victim = self.rng.choice(sorted(pids))
            self._kill(pids[victim], f"{victim[0]}[{victim[1]}] at {progress.records_out} rows")
        if self.between is not None and not self.between_kills:
            self._maybe_kill_between()

    def _maybe_kill_between(self) -> None:
        assert self.store_root is not None and self.between is not None
        first, last = self.between
        if not self.store_root.is_dir():
            return
        for d in sorted(self.store_root.glob("chk-*"), reverse=True):
            if (d / MANIFEST).exists():
                return  # the newest checkpoint is complete: nothing in between right now
            # Wait a moment for the fast stage's file (the barrier is queued behind its batches).
            deadline = time.monotonic() + 1.0
            while not (d / state_file(first, 0)).exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            if (d / state_file(first, 0)).exists() and not (d / state_file(last, 0)).exists():
                name = self.executor.plan[last].name
                self._kill(self.executor.pids()[(name, 0)], f"{name}[0] between snapshots of {d.name}")
                # The checkpoint it interrupted must never complete.
                self.interrupted = d.name
                self.between_kills += 1
            return

    def _kill(self, pid: int, what: str) -> None:
        os.kill(pid, signal.SIGKILL)
        self.kills.append(what)


def check_line(check: dict[str, int]) -> str:
    """The printed summary of an `exactly_once` result (what a test's `-s` output quotes)."""
    return (f"records checked: {check['checked']}, lost: {check['lost']}, duplicated: {check['duplicated']}, "
            f"unexpected: {check['unexpected']}, different: {check['different']}")


def exactly_once(expected: pa.Table, got: pa.Table) -> dict[str, int]:
    """Compare outputs row by row (timing and KV-block accounting columns dropped): counts of rows
    checked, lost, duplicated and differing. Keys are (offset, session_id, turn): one output row
    per record."""
    exp = [{k: v for k, v in r.items() if k not in IGNORED} for r in expected.to_pylist()]
    out = [{k: v for k, v in r.items() if k not in IGNORED} for r in got.to_pylist()]
    key = lambda r: (r["offset"], r["session_id"], r["turn"])  # noqa: E731
    seen: dict[Any, int] = {}
    for r in out:
        seen[key(r)] = seen.get(key(r), 0) + 1
    exp_keys = {key(r) for r in exp}
    by_key = {key(r): r for r in out}
    diff_cols: dict[str, int] = {}
    for r in exp:
        o = by_key.get(key(r))
        for c in (r.keys() | o.keys()) if o is not None and o != r else ():
            if r.get(c) != o.get(c):
                if diff_cols.get(c, 0) < 5:
                    print(f"[exactly_once] {key(r)} {c}: expected {r.get(c)!r}, got {o.get(c)!r}; "
                          f"n_context_tokens {r.get('n_context_tokens')}")
                diff_cols[c] = diff_cols.get(c, 0) + 1
    if diff_cols:
        print(f"[exactly_once] rows differ in columns {diff_cols}")
    return {
        "checked": len(exp),
        "lost": sum(1 for k in exp_keys if k not in seen),
        "duplicated": sum(n - 1 for n in seen.values() if n > 1),
        "unexpected": sum(1 for k in seen if k not in exp_keys),
        "different": sum(1 for r in exp if key(r) in by_key and by_key[key(r)] != r),
        "order_equal": int(exp == out),
    }
