"""Dataflow benchmark: the runtime's overhead against hand-written Ray, and the model stage against
the in-process Engine.

Cells (each in its own process, peak RSS per cell):
- pass_streamctx / pass_raw: the same records (session-keyed turns with a ~1 KB text payload)
  through three stages. streamctx: a job with the segment stage and two pass-through user stages
  on a local Ray (record validation, routing, bounded in-flight, sink included). raw: a chain of
  three pass-through Ray actors fed pre-built Arrow batches of the same size, chained by object
  reference, with the same in-flight window and results fetched to the driver. Records/s, MB/s,
  p50/p99 batch latency (submit to result in the driver).
- model_engine / model_local / model_ray[_2]: a stream of interleaved chat sessions with replies
  through a tiny random Llama (and SmolLM2 on a short stream): end-to-end tokens/s (tokens fed and
  generated, summed over sessions) of run_job vs the in-process Engine processing the same records
  in the same order. Engine loading and actor start-up are excluded from both.

Run: flock /tmp/streamctx-bench.lock .venv/bin/python benchmarks/dataflow.py [--cap 900] [--only pass]
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness  # noqa: E402
from benchmarks.harness import Cell  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "dataflow"
N_RECORDS = 20_000
BATCH = 256
IN_FLIGHT = 8 * BATCH


def _records(n: int, sessions: int = 200, text_bytes: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    turn = [0] * sessions
    out = []
    filler = "x" * (text_bytes - 20)
    for _ in range(n):
        s = rng.randrange(sessions)
        out.append({"session_id": f"session-{s}", "turn": turn[s], "role": "user", "text": f"{turn[s]:06d} {filler}"})
        turn[s] += 1
    return out


class PassThrough:
    def process(self, batch: Any) -> Any:
        return batch


def _ray_init() -> Any:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback-only benchmark instance
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}})
    return ray


def pass_streamctx(n: int = N_RECORDS) -> dict[str, Any]:
    from streamctx.dataflow import run_job
    from streamctx.spec import JobSpec

    _ray_init()
    records = _records(n)
    counted = {"rows": 0}

    def sink(batch: Any) -> None:
        counted["rows"] += batch.num_rows

    spec = JobSpec.from_dict({
        "name": "bench", "source": {"type": "iterator", "obj": records}, "model": None,
        "runner": {"replicas": 1, "batch_size": BATCH, "max_in_flight": IN_FLIGHT},
        "stages": [{"name": "p1", "cls": PassThrough}, {"name": "p2", "cls": PassThrough}],
        "sink": {"type": "callback", "fn": sink},
    })
    res = run_job(spec, runner="ray")
    assert counted["rows"] == n and res.dead_letters == 0
    return {"records_per_s": n / res.elapsed_s, "mb_per_s": res.metrics["bytes_in"] / 1e6 / res.elapsed_s,
            "p50_ms": res.metrics["latency_p50_ms"], "p99_ms": res.metrics["latency_p99_ms"],
            "elapsed_s": res.elapsed_s, "throttled_s": res.metrics["throttled_s"]}


def pass_raw(n: int = N_RECORDS) -> dict[str, Any]:
    from collections import deque

    import numpy as np
    import pyarrow as pa

    ray = _ray_init()
    records = _records(n)

    @ray.remote(num_cpus=0)
    class Stage:
        def step(self, batch: Any) -> Any:
            return batch

        def ready(self) -> bool:
            return True

    stages = [Stage.remote() for _ in range(3)]
    ray.get([s.ready.remote() for s in stages])
    t0 = time.perf_counter()
    inflight: deque = deque()
    lat: list[float] = []
    rows = nbytes = 0
    for i in range(0, n, BATCH):
        while inflight and len(inflight) * BATCH >= IN_FLIGHT:
            ref, ts = inflight.popleft()
            rows += ray.get(ref).num_rows
            lat.append(time.perf_counter() - ts)
        batch = pa.RecordBatch.from_pylist(records[i:i + BATCH])
        nbytes += batch.nbytes
        ref: Any = batch
        for s in stages:
            ref = s.step.remote(ref)
        inflight.append((ref, time.perf_counter()))
    while inflight:
        ref, ts = inflight.popleft()
        rows += ray.get(ref).num_rows
        lat.append(time.perf_counter() - ts)
    elapsed = time.perf_counter() - t0
    assert rows == n
    return {"records_per_s": n / elapsed, "mb_per_s": nbytes / 1e6 / elapsed,
            "p50_ms": float(np.percentile(lat, 50)) * 1e3, "p99_ms": float(np.percentile(lat, 99)) * 1e3,
            "elapsed_s": elapsed}


# --- model stage ---------------------------------------------------------------------------------


def _chat_records(sessions: int, turns: int, max_new: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    queues = []
    for s in range(sessions):
        q = []
        for t in range(turns):
            q.append({"session_id": f"conv-{s}", "turn": t, "role": "user",
                      "text": f"Question {t} of conversation {s}: what happened in year {1800 + 7 * t + s}?",
                      "generate": True, "max_new_tokens": max_new, "end": t == turns - 1})
        queues.append(q)
    slots = [i for i, q in enumerate(queues) for _ in q]
    rng.shuffle(slots)
    pos = [0] * sessions
    out = []
    for i in slots:
        out.append(queues[i][pos[i]])
        pos[i] += 1
    return out


def _model_source(model: str) -> str:
    if model == "smollm2":
        return "smollm2"
    from tests.fixtures.tiny_models import make_tiny_llama

    folder = Path(tempfile.mkdtemp()) / "tiny"
    return str(make_tiny_llama(folder, hidden=128, layers=4, heads=4, kv_heads=2))


def _stream_size(model: str) -> tuple[int, int, int]:
    return (4, 3, 8) if model == "smollm2" else (8, 4, 16)


def model_engine(model: str) -> dict[str, Any]:
    """The peer: the same records, in the same order, through one in-process Engine."""
    import torch

    from streamctx.engine import Engine

    torch.set_num_threads(1)
    src = _model_source(model)
    records = _chat_records(*_stream_size(model))
    engine = Engine.load(src)
    t0 = time.perf_counter()
    tokens = 0
    for r in records:
        s = engine.session(r["session_id"])
        s.chat(r["role"], r["text"])
        if r["generate"]:
            s.chat_reply(r["max_new_tokens"])
        if r["end"]:
            tokens += s.n_tokens
            s.close()
    elapsed = time.perf_counter() - t0
    return {"tokens": tokens, "tokens_per_s": tokens / elapsed, "elapsed_s": elapsed}


def model_job(model: str, runner: str, replicas: int = 1) -> dict[str, Any]:
    import torch

    from streamctx.dataflow import run_job
    from streamctx.spec import JobSpec

    torch.set_num_threads(1)
    src = _model_source(model)
    if runner == "ray":
        _ray_init()
    records = _chat_records(*_stream_size(model))
    spec = JobSpec.from_dict({
        "name": "bench-model", "source": {"type": "iterator", "obj": records},
        "model": {"path": None if src == "smollm2" else src, "name": "smollm2", "num_cpus": 1},
        "runner": {"replicas": replicas, "batch_size": 4, "max_in_flight": 64},
    })
    res = run_job(spec, runner=runner)
    assert res.dead_letters == 0, res.dead_letter.to_pylist()
    # Tokens per session = its last row's context size (every session ends with an `end` record).
    last: dict[str, int] = {}
    for row in res.outputs.to_pylist():
        last[row["session_id"]] = row["n_context_tokens"]
    tokens = sum(last.values())
    return {"tokens": tokens, "tokens_per_s": tokens / res.elapsed_s, "elapsed_s": res.elapsed_s,
            "p50_ms": res.metrics["latency_p50_ms"], "p99_ms": res.metrics["latency_p99_ms"]}


CELLS = [
    Cell("pass_raw", pass_raw, {}, group="passthrough", timeout_s=300),
    Cell("pass_streamctx", pass_streamctx, {}, group="passthrough", timeout_s=300),
] + [
    c for model in ("tiny", "smollm2") for c in (
        Cell(f"{model}_engine", model_engine, {"model": model}, group=model, timeout_s=600),
        Cell(f"{model}_local", model_job, {"model": model, "runner": "local"}, group=model, timeout_s=600),
        Cell(f"{model}_ray", model_job, {"model": model, "runner": "ray"}, group=model, timeout_s=600),
        Cell(f"{model}_ray_2", model_job, {"model": model, "runner": "ray", "replicas": 2}, group=model,
             timeout_s=600),
    )
]

COLUMNS = ["cell", "status", "records_per_s", "mb_per_s", "tokens", "tokens_per_s", "vs_peer", "p50_ms", "p99_ms",
           "elapsed_s", "peak_rss_mib"]


def _postprocess(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ok = {r["cell"]: r for r in rows if r.get("status") == "ok"}
    for r in rows:
        if r.get("status") != "ok":
            continue
        if r["cell"] == "pass_streamctx" and "pass_raw" in ok:
            r["vs_peer"] = r["records_per_s"] / ok["pass_raw"]["records_per_s"]
        for model in ("tiny", "smollm2"):
            peer = ok.get(f"{model}_engine")
            if r["cell"].startswith(f"{model}_") and r["cell"] != f"{model}_engine" and peer:
                assert r["tokens"] == peer["tokens"], (r["cell"], r["tokens"], peer["tokens"])
                r["vs_peer"] = r["tokens_per_s"] / peer["tokens_per_s"]
    return rows


if __name__ == "__main__":
    harness.main(CELLS, results=RESULTS, prefix="dataflow", columns=COLUMNS, postprocess=_postprocess,
                 combined_dir=RESULTS.parent,
                 title="Dataflow: runtime vs raw Ray actor chain; model stage vs in-process Engine")
