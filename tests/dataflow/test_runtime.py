"""The dataflow runtime on the local and Ray runners: identical outputs, per-session order,
session lifecycle, backpressure and dead letters."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streamctx.dataflow import run_job
from streamctx.spec import JobSpec
from tests.dataflow import stages
from tests.dataflow.streams import conversations, interleave

HIST = "tests.dataflow.stages:History"


@pytest.fixture(scope="module")
def ray_stages(ray_local):
    """Ray workers cannot import the tests package: ship the test stages by value."""
    ray_local.cloudpickle.register_pickle_by_value(sys.modules[stages.__name__])
    yield ray_local


def _spec(records: list[dict[str, Any]] | Any, *, replicas: int = 2, stage_list: list[dict] | None = None,
          **sections: Any) -> JobSpec:
    data: dict[str, Any] = {
        "name": "t", "source": {"type": "iterator", "obj": records}, "model": None,
        "runner": {"replicas": replicas, "batch_size": 16, "key_groups": 32},
        "stages": stage_list if stage_list is not None else [
            {"name": "history", "cls": stages.History, "replicas": 3},
            {"name": "upper", "cls": stages.Upper, "place": "post_model"},
        ],
    }
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return JobSpec.from_dict(data)


def _by_session(table: pa.Table) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for row in table.to_pylist():
        out.setdefault(row["session_id"], []).append(row)
    return out


def test_local_and_ray_identical_with_per_session_order(ray_stages) -> None:
    convs = conversations(12, 7)
    records = interleave(convs, seed=3)
    local = run_job(_spec(records), runner="local")
    ray_res = run_job(_spec(records), runner="ray")
    assert local.records_out == ray_res.records_out == len(records)
    assert local.dead_letters == ray_res.dead_letters == 0
    # Identical, row order included (delivery is in submission order on both runners).
    assert local.outputs.equals(ray_res.outputs)
    # Per-session order: each row's history is exactly its session's texts so far, in turn order.
    for sid, rows in _by_session(ray_res.outputs).items():
        assert [r["turn"] for r in rows] == list(range(7))
        for r in rows:
            assert r["history"] == "|".join(f"{sid} says {t}" for t in range(r["turn"] + 1)).upper()
    # Replicas really were used: three history replicas all saw records.
    assert ray_res.metrics["stages"]["history"]["replicas"] == 3


@pytest.mark.parametrize("runner", ["local", "ray"])
def test_end_records_free_all_session_state(runner: str, ray_stages) -> None:
    records = interleave(conversations(9, 4), seed=1)
    res = run_job(_spec(records), runner=runner)
    assert res.sessions.ended == {"end": 9, "ttl": 0, "close": 0}
    assert res.sessions.live == 0 and res.sessions.bytes == 0
    hist = res.metrics["stages"]["history"]
    assert hist["peak_session_bytes"] > 0  # state did exist while running
    assert hist["ended"]["end"] == 9 and hist["ended"]["close"] == 0


def test_idle_ttl_ends_sessions_and_a_returning_session_starts_fresh() -> None:
    # Sessions one after another, no `end` records: each is idle while the later ones run.
    convs = conversations(6, 3, end=False)
    records = [r for c in convs for r in c]
    # s0 comes back long after its TTL ran out: a new incarnation, with empty history.
    records.append({"session_id": "s0", "turn": 5, "role": "user", "text": "back again"})
    res = run_job(_spec(records, replicas=1, sessions={"idle_ttl_records": 4}), runner="local")
    assert res.dead_letters == 0
    # Seqs: s_k's last record is 3k+2; s0 returns at 18. Idle means more than 4 records since:
    # s0..s3 time out; s4 (last 14), s5 and s0's new incarnation are live when the stream ends.
    assert res.sessions.ended == {"end": 0, "ttl": 4, "close": 3}
    assert res.sessions.live == 0 and res.sessions.bytes == 0
    last = res.outputs.to_pylist()[-1]
    assert last["history"] == "BACK AGAIN"
    # With the TTL but also a final `end` for everyone, nothing is left to close.
    tail = [{"session_id": f"s{i}", "turn": 9, "role": "user", "text": "bye", "end": True} for i in (5, 0)]
    res2 = run_job(_spec(records + tail, replicas=1, sessions={"idle_ttl_records": 4}), runner="local")
    assert res2.sessions.ended == {"end": 2, "ttl": 5, "close": 0}


def test_idle_ttl_on_ray_matches_local(ray_stages) -> None:
    records = interleave(conversations(10, 5, end=False), seed=7)
    spec = lambda: _spec(records, sessions={"idle_ttl_records": 6})  # noqa: E731
    a, b = run_job(spec(), runner="local"), run_job(spec(), runner="ray")
    assert a.outputs.equals(b.outputs)
    assert a.sessions.ended == b.sessions.ended and a.sessions.ended["ttl"] > 0
    assert b.sessions.live == 0 and b.sessions.bytes == 0


@pytest.mark.parametrize("runner", ["local", "ray"])
def test_backpressure_bounds_in_flight_records_with_a_slow_sink(runner: str, ray_stages) -> None:
    bound, n = 24, 240
    produced = 0
    received = 0
    worst = 0

    def source():
        nonlocal produced
        for r in interleave(conversations(8, n // 8, end=False), seed=5):
            produced += 1
            yield r

    def slow_sink(batch: pa.RecordBatch) -> None:
        nonlocal received, worst
        # Measured from inside: everything read from the source but not yet in the sink.
        worst = max(worst, produced - received)
        received += batch.num_rows
        time.sleep(0.01)

    spec = _spec(source(), runner={"batch_size": 8, "max_in_flight": bound},
                 sink={"type": "callback", "fn": slow_sink})
    res = run_job(spec, runner=runner)
    assert received == res.records_out == n
    assert 0 < worst <= bound
    assert res.metrics["in_flight"]["max_records"] <= bound
    depth = res.metrics["queue_depth"]
    assert set(depth) == {"segment", "history", "upper", "sink"}
    # Queued batches never exceed what the bound allows in flight (every edge, sink included).
    assert all(0 <= d["max"] <= res.metrics["in_flight"]["max_batches"] for d in depth.values())
    if runner == "ray":
        assert res.metrics["throttled_s"] > 0  # the slow consumer really slowed the source


def test_bad_records_go_to_dead_letters_and_the_job_finishes(tmp_path: Path) -> None:
    good = [json.dumps(r).encode() for r in conversations(2, 3)[0]]
    lines = [
        good[0],
        b'{"session_id": "s0", "turn": "1", "role": "user", "text": "x"}',  # wrong type
        b'{"session_id": "s0", "turn": 1, "role": "robot", "text": "x"}',   # bad role
        b'{"session_id": "s0", "role": "user", "text": "x"}',               # missing turn
        b'{"session_id": "s0", "turn": 1',                                  # bad JSON
        b'{"session_id": "s0", "turn": 1, "role": "user", "text": "\xff\xfe"}',  # invalid UTF-8
        b'[1, 2]',                                                          # not an object
        good[1],
        good[1],                                                            # duplicate turn
        b'{"session_id": "s0", "turn": 0, "role": "user", "text": "late"}',  # at or below last turn
        good[2],
    ]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    spec = JobSpec.from_dict({
        "name": "bad", "source": {"type": "jsonl", "path": "in.jsonl"}, "model": None,
        "runner": {"type": "local", "batch_size": 4},
        "stages": [{"name": "history", "cls": HIST}],
        "sink": {"type": "parquet", "path": "out"},
    }, base_dir=tmp_path)
    progress = []
    res = run_job(spec, on_progress=progress.append)
    assert res.records_in == len(lines)
    assert res.records_out == 3 and res.dead_letters == 8
    last = progress[-1]
    assert (last.records_in, last.records_out, last.dead_letters, last.in_flight) == (len(lines), 3, 8, 0)
    # Parts are committed when the sink closes: until then a replay would start from the beginning.
    assert last.last_offset == 0
    assert res.last_offset == (tmp_path / "in.jsonl").stat().st_size
    out = pq.read_table(sorted((tmp_path / "out").glob("part-*.parquet")))
    assert out.column("history").to_pylist()[-1] == "s0 says 0|s0 says 1|s0 says 2"
    dead = pq.read_table(sorted((tmp_path / "out" / "dead_letter").glob("part-*.parquet"))).to_pylist()
    reasons = [d["reason"] for d in dead]
    assert any(r.startswith("turn:") for r in reasons)
    assert any(r.startswith("role:") for r in reasons)
    assert any("turn: Field required" in r for r in reasons)
    assert any(r.startswith("bad JSON") for r in reasons)
    assert any(r.startswith("invalid UTF-8") for r in reasons)
    assert any("must be a JSON object" in r for r in reasons)
    dups = [d for d in dead if d["stage"] == "segment"]
    assert [d["turn"] for d in dups] == [1, 0] and all("duplicate turn" in d["reason"] for d in dups)
    assert all(d["offset"] is not None for d in dead)
    assert not list((tmp_path / "out").glob("*.tmp")) and not list((tmp_path / "out").glob(".*.tmp"))


@pytest.mark.parametrize("runner", ["local", "ray"])
def test_a_failing_user_stage_dead_letters_its_batch_and_the_job_goes_on(runner: str, ray_stages) -> None:
    records = [r for c in conversations(4, 3) for r in c]
    spec = _spec(records, runner={"batch_size": 3}, stage_list=[
        {"name": "fail", "cls": stages.FailOn, "kwargs": {"bad": "s1 says 1"}}])
    res = run_job(spec, runner=runner)
    assert res.records_out + res.dead_letters == len(records)
    assert res.dead_letters >= 1
    assert all("raised RuntimeError" in r for r in res.dead_letter.column("reason").to_pylist())
    assert res.metrics["stages"]["fail"]["errors"] >= 1


def test_resume_offset_replays_exactly_the_rest(tmp_path: Path) -> None:
    recs = [r for c in conversations(3, 4) for r in c]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    base = {"name": "r", "model": None, "runner": {"type": "local", "batch_size": 5},
            "stages": [{"name": "p", "cls": "tests.dataflow.stages:PassThrough"}]}
    full = run_job(JobSpec.from_dict({**base, "source": {"type": "jsonl", "path": "in.jsonl"}}, base_dir=tmp_path))
    assert full.last_offset == (tmp_path / "in.jsonl").stat().st_size
    # Stop after 7 records (a source that ends early), then resume from the recorded offset.
    first = run_job(JobSpec.from_dict({**base, "source": {"type": "iterator", "obj": recs[:7]}}))
    assert first.last_offset == 7
    offsets = full.outputs.column("offset").to_pylist()
    rest = run_job(JobSpec.from_dict(
        {**base, "source": {"type": "jsonl", "path": "in.jsonl", "start_offset": offsets[7]}}, base_dir=tmp_path))
    assert rest.outputs.column("offset").to_pylist() == offsets[7:]


def test_wall_clock_idle_ttl_ends_a_quiet_session() -> None:
    def source():
        yield {"session_id": "a", "turn": 0, "role": "user", "text": "first"}
        yield {"session_id": "b", "turn": 0, "role": "user", "text": "other", "end": True}
        time.sleep(0.3)  # "a" is idle for longer than its TTL
        yield {"session_id": "a", "turn": 1, "role": "user", "text": "second", "end": True}

    res = run_job(_spec(source(), replicas=1, runner={"batch_size": 1}, sessions={"idle_ttl_s": 0.1}),
                  runner="local")
    assert res.outputs.column("history").to_pylist() == ["FIRST", "OTHER", "SECOND"]
    assert res.sessions.ended == {"end": 2, "ttl": 1, "close": 0}
    assert res.sessions.live == 0 and res.sessions.bytes == 0


def test_unplaceable_stage_actors_fail_clearly_instead_of_hanging(ray_stages) -> None:
    spec = _spec([], runner={"start_timeout_s": 3}, stage_list=[
        {"name": "nowhere", "cls": stages.PassThrough, "resources": {"no_such_node": 1}}])
    with pytest.raises(RuntimeError, match="not placed within 3 s.*no_such_node"):
        run_job(spec, runner="ray")
