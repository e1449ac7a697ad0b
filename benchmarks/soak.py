"""Soak: steady multi-session load through the Ray runner with periodic SIGKILLs of stage actors.

Not a timing benchmark (run it without the bench lock). One cell streams an open-ended,
deterministic, replayable conversation stream (sessions start, run `turns` turns and end, `concurrent`
at a time) through segment -> model (tiny random Llama, 2 replicas each) with checkpoints, for
`minutes`; every `kill_every_s` a seeded-random stage actor is SIGKILLed. It reports:

- exactly-once: every record's output row arrived once (rows counted per source offset: lost = 0,
  duplicated = 0), and the replies and context lengths of a sample of sessions equal an in-process
  `Engine` fed the same turns (no restored session diverged);
- memory: resident set of the driver and of all stage actor processes, sampled every
  `sample_every_s`; the slope over the second half of the run (MB/min) and the last quarter's mean
  against the second quarter's (flat = no leak; a replaced actor starts small, so the actor total
  dips after each kill and regrows to its steady size);
- faults injected, recoveries, actors replaced, checkpoints completed, records/s.

    python benchmarks/soak.py --only smoke      # 2 minutes
    python benchmarks/soak.py --only soak-30    # 30 minutes (the issue's soak)

Stage actors import streamctx from the working tree when they (re)start: run it from a snapshot of
the code (e.g. `git archive HEAD`) when the tree is being edited, or a mid-edit file breaks the run.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "soak"
WORDS = ("the river", "a letter", "budget", "tomorrow", "seven", "why not", "the plan", "music", "north",
         "quickly", "history", "a small cat", "code", "ice", "the council", "maybe")


class Stream:
    """Record i is a pure function of i; the stream grows until `deadline`, and a replay (a second
    iteration) always reaches at least as far as any earlier one did: a log whose tail stopped
    being written at the deadline."""

    def __init__(self, concurrent: int, turns: int, deadline: float) -> None:
        self.concurrent, self.turns, self.deadline = concurrent, turns, deadline
        self.produced = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        i = 0
        while i < self.produced or time.monotonic() < self.deadline:
            yield self.record(i)
            i += 1
            self.produced = max(self.produced, i)

    @functools.lru_cache(maxsize=4)
    def _order(self, rnd: int) -> list[int]:
        """The order in which the sessions' slots speak in round `rnd`."""
        return random.Random(rnd).sample(range(self.concurrent), self.concurrent)

    def record(self, i: int) -> dict[str, Any]:
        rnd, j = divmod(i, self.concurrent)
        slot = self._order(rnd)[j]
        gen, turn = divmod(rnd, self.turns)
        h = hashlib.blake2b(i.to_bytes(8, "little"), digest_size=4).digest()
        text = " ".join(WORDS[b % len(WORDS)] for b in h)
        r: dict[str, Any] = {"session_id": f"s{slot}-{gen}", "turn": turn,
                             "role": "user" if turn % 2 == 0 else "assistant", "text": text}
        if turn % 4 == 3:
            r["generate"], r["max_new_tokens"] = True, 4
        if turn == self.turns - 1:
            r["end"] = True
        return r


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope, units per minute."""
    if len(points) < 3:
        return 0.0
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    return 60.0 * sum((t - mx) * (v - my) for t, v in points) / var if var else 0.0


def _reference_check(engine: Any, stream: Stream, n: int, sampled: dict[tuple[str, int], tuple[Any, int]],
                     every: int) -> tuple[int, int]:
    """(rows checked, rows different): the sampled sessions' replies and context lengths against
    `engine` fed each session's turns in order."""
    by_session: dict[str, list[dict[str, Any]]] = {}
    for i in range(n):
        r = stream.record(i)
        if int(r["session_id"].split("-")[0][1:]) % every == 0:
            by_session.setdefault(r["session_id"], []).append(r)
    checked = different = 0
    for sid, recs in by_session.items():
        s = engine.session(sid)
        for r in recs:
            s.chat(r["role"], r["text"])
            reply = s.chat_reply(r["max_new_tokens"]).text if r.get("generate") else None
            checked += 1
            if sampled.get((sid, r["turn"])) != (reply, s.n_tokens):
                different += 1
        s.close()
    return checked, different


def soak(minutes: float, kill_every_s: float, concurrent: int = 48, turns: int = 24, interval: int = 400,
         sample_every_s: float = 15.0, seed: int = 1, sample_sessions_every: int = 25) -> dict[str, Any]:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")  # discarded refs of killed actors
    import ray
    import torch

    from streamctx.dataflow import run_job
    from streamctx.engine import Engine
    from streamctx.spec import JobSpec
    from tests.fixtures.tiny_models import make_tiny_llama

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="streamctx-soak-"))
    tiny = make_tiny_llama(work / "tiny", hidden=64, layers=2, heads=2, kv_heads=1)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,  # never a shared Ray
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}})
    t_start = time.monotonic()
    stream = Stream(concurrent, turns, t_start + minutes * 60)
    counts = bytearray()
    sampled: dict[tuple[str, int], tuple[Any, int]] = {}
    rng = random.Random(seed)
    state: dict[str, Any] = {"ex": None, "last_kill": t_start, "last_sample": 0.0}
    kills: list[str] = []
    samples: list[dict[str, float]] = []

    def sink(batch: Any) -> None:
        cols = batch.to_pydict()
        for off, sid, turn, reply, n_ctx in zip(cols["offset"], cols["session_id"], cols["turn"],
                                                cols["reply"], cols["n_context_tokens"]):
            if off >= len(counts):
                counts.extend(bytes(off + 1 - len(counts) + 4096))
            counts[off] = min(255, counts[off] + 1)
            if int(sid.split("-")[0][1:]) % sample_sessions_every == 0:
                sampled[(sid, turn)] = (reply, n_ctx)

    def on_progress(p: Any) -> None:
        now = time.monotonic()
        ex = state["ex"]
        if now - state["last_sample"] >= sample_every_s:
            state["last_sample"] = now
            pids = ex.pids()
            samples.append({"t_s": round(now - t_start, 1), "driver_mb": round(_rss_mb(os.getpid()), 1),
                            "actors_mb": round(sum(_rss_mb(pid) for pid in pids.values()), 1),
                            "actors": len(pids), "records_in": p.records_in, "rows_out": p.records_out})
        if now - state["last_kill"] >= kill_every_s and now < stream.deadline:
            state["last_kill"] = now
            pids = ex.pids()
            if pids:
                victim = rng.choice(sorted(pids))
                os.kill(pids[victim], signal.SIGKILL)
                kills.append(f"{victim[0]}[{victim[1]}]@{now - t_start:.0f}s")

    spec = JobSpec.from_dict({
        "name": "soak", "source": {"type": "iterator", "obj": stream},
        "model": {"path": str(tiny), "max_new_tokens": 4, "replicas": 2, "num_cpus": 0},
        "runner": {"type": "ray", "replicas": 2, "batch_size": 32, "key_groups": 64, "max_in_flight": 256},
        "sink": {"type": "callback", "fn": sink},
        "checkpoint": {"enabled": True, "interval_records": interval, "path": str(work / "ckpt"), "keep": 2},
    }, base_dir=work)
    try:
        res = run_job(spec, on_progress=on_progress, on_start=lambda ex: state.update(ex=ex))
    except Exception as exc:  # keep what was measured: the samples say how far it got
        return {"minutes": round((time.monotonic() - t_start) / 60, 1), "records_in": stream.produced,
                "faults_injected": len(kills), "run_error": f"{type(exc).__name__}: {exc}"[:1000],
                "kills": kills, "rss_samples": samples}
    finally:
        ray.shutdown()

    n = stream.produced
    lost = sum(1 for c in counts[:n] if c == 0) + max(0, n - len(counts))
    dup = sum(c - 1 for c in counts[:n] if c > 1)
    # Sampled sessions against an in-process engine fed the same turns in order.
    different = checked = 0
    reference_error = None
    try:
        checked, different = _reference_check(Engine.load(str(tiny)), stream, n, sampled, sample_sessions_every)
    except Exception as exc:  # reported, never hidden: the row says the check did not run
        reference_error = f"{type(exc).__name__}: {exc}"[:1000]


    half = [(s["t_s"], s["actors_mb"]) for s in samples if s["t_s"] >= minutes * 30]
    half_d = [(s["t_s"], s["driver_mb"]) for s in samples if s["t_s"] >= minutes * 30]
    q = max(1, len(samples) // 4)
    ck = res.metrics["checkpoints"]
    return {
        "minutes": round((time.monotonic() - t_start) / 60, 1), "records_in": n, "rows_out_counted": sum(counts[:n]),
        "records_per_s": round(n / res.elapsed_s, 1),  # replayed records not counted twice
        "faults_injected": len(kills), "recoveries": ck["recoveries"], "actors_replaced": ck["replaced_actors"],
        "checkpoints": ck["completed"], "replayed_rows_skipped": ck["replayed_rows_skipped"],
        "lost": lost, "duplicated": dup, "sampled_rows_checked": checked, "sampled_rows_different": different,
        "reference_error": reference_error,
        "dead_letters": res.dead_letters, "live_sessions_after": res.sessions.live,
        "sessions_ended": res.sessions.ended,
        "actors_mb_q2": round(sum(s["actors_mb"] for s in samples[q:2 * q]) / q, 1) if len(samples) >= 4 else None,
        "actors_mb_q4": round(sum(s["actors_mb"] for s in samples[-q:]) / q, 1) if samples else None,
        "actors_mb_per_min_2nd_half": round(_slope(half), 2),
        "driver_mb_per_min_2nd_half": round(_slope(half_d), 2),
        "driver_mb_last": samples[-1]["driver_mb"] if samples else None,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "kills": kills, "rss_samples": samples,
    }


CELLS = [
    harness.Cell("smoke-2min", soak, {"minutes": 2.0, "kill_every_s": 20.0}, timeout_s=900),
    harness.Cell("soak-30min", soak, {"minutes": 30.0, "kill_every_s": 60.0}, timeout_s=3600),
]

if __name__ == "__main__":
    harness.main(CELLS, results=RESULTS, prefix="soak", title="Soak: steady load with actor SIGKILLs",
                 columns=["cell", "minutes", "records_in", "records_per_s", "faults_injected", "recoveries",
                          "checkpoints", "lost", "duplicated", "sampled_rows_checked", "sampled_rows_different",
                          "actors_mb_q2", "actors_mb_q4", "actors_mb_per_min_2nd_half",
                          "driver_mb_per_min_2nd_half", "peak_rss_mib", "load_avg_1m", "status"])
