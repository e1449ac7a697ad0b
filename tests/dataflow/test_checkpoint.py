"""Checkpoints on the local runner: the store's layout and checks, resuming a crashed driver with
exactly-once file output (hypothesis over crash points and intervals), refusals, and unwritable or
full checkpoint storage (EACCES/ENOSPC injected; tests run as root, so permissions alone never fail)."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamctx.dataflow import run_job
from streamctx.dataflow.checkpoint import MANIFEST, CheckpointError, CheckpointStore, Manifest, chk_dir
from streamctx.spec import JobSpec
from tests.dataflow.faults import exactly_once
from tests.dataflow.streams import conversations, interleave
from tests.fixtures.faulty_fs import Faults, faulty_filesystem, files_under, inject_faults

HIST = "tests.dataflow.stages:History"


class Crash(Exception):
    """The driver "dies" (raised from on_progress: nothing after it runs)."""


def _records(n_sessions: int = 8, turns: int = 12, seed: int = 5) -> list[dict[str, Any]]:
    recs = interleave(conversations(n_sessions, turns), seed=seed)
    # Two bad records: dead letters must be exactly-once too.
    recs.insert(17, {"session_id": "s1", "turn": "x", "role": "user", "text": "bad"})
    recs.insert(60, {"session_id": "s2", "turn": 1, "role": "robot", "text": "bad"})
    return recs


def _spec(base: Path, records: list[dict[str, Any]], *, interval: int = 10, rows_per_file: int = 7,
          replicas: int = 2, **ckpt: Any) -> JobSpec:
    base.mkdir(parents=True, exist_ok=True)
    (base / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return JobSpec.from_dict({
        "name": "ck", "source": {"type": "jsonl", "path": "in.jsonl"}, "model": None,
        "runner": {"type": "local", "replicas": replicas, "batch_size": 4, "key_groups": 16},
        "stages": [{"name": "history", "cls": HIST}],
        "sink": {"type": "parquet", "path": "out", "rows_per_file": rows_per_file},
        "checkpoint": {"enabled": True, "interval_records": interval, "path": "ckpt", **ckpt},
    }, base_dir=base)


def _read(folder: Path) -> pa.Table:
    parts = sorted(folder.glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts]) if parts else pa.table({})


def _crash_after(rows: int):
    def hook(p: Any) -> None:
        if p.records_out >= rows:
            raise Crash(f"driver killed after {p.records_out} rows")
    return hook


@pytest.fixture(scope="module")
def clean_runs(tmp_path_factory: pytest.TempPathFactory):
    """Fault-free (outputs, dead letters) per replica count (row order depends on the routing)."""
    runs: dict[int, tuple[pa.Table, pa.Table]] = {}

    def get(replicas: int = 2) -> tuple[pa.Table, pa.Table]:
        if replicas not in runs:
            base = tmp_path_factory.mktemp("clean")
            res = run_job(_spec(base, _records(), replicas=replicas))
            assert res.records_out == 96 and res.dead_letters == 2
            runs[replicas] = _read(base / "out"), _read(base / "out" / "dead_letter")
        return runs[replicas]
    return get


@pytest.fixture(scope="module")
def clean(clean_runs) -> tuple[pa.Table, pa.Table]:
    return clean_runs(2)


def test_store_layout_permissions_and_manifest(tmp_path: Path, clean) -> None:
    res = run_job(_spec(tmp_path, _records(), keep=2))
    store = CheckpointStore(str(tmp_path / "ckpt"))
    ids = store.complete_ids()
    assert len(ids) == 2 and ids == store.all_ids()  # older ones pruned
    assert res.metrics["checkpoints"]["completed"] == 8  # a barrier after every 12 records (3 batches of 4)
    m = store.latest()
    assert m is not None and m.ckpt_id == ids[-1] and m.job == "ck"
    assert m.plan == [("segment", 2), ("history", 2)] and m.records_in == 96 and m.seq == 94  # two records were invalid
    assert m.sinks["out"]["parts"] == len(list((tmp_path / "out").glob("part-*.parquet"))) - 1
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o700
    for p in (tmp_path / "ckpt").rglob("*"):
        assert p.stat().st_mode & 0o777 == (0o700 if p.is_dir() else 0o600), p
    d = tmp_path / "ckpt" / chk_dir(m.ckpt_id)
    assert sorted(x.name for x in d.iterdir()) == sorted([MANIFEST] + [e["file"] for s in m.states for e in s])
    assert Manifest.from_json((d / MANIFEST).read_bytes(), "x") == m
    # A state file that does not match its manifest hash is refused.
    f = d / m.states[1][0]["file"]
    f.write_bytes(f.read_bytes()[:-1] + b"!")
    with pytest.raises(CheckpointError, match="does not match its manifest hash"):
        store.read_state(m.ckpt_id, m.states[1][0])
    # A manifest of another format version is refused with the versions named.
    raw = json.loads((d / MANIFEST).read_bytes())
    raw["version"] = 99
    with pytest.raises(CheckpointError, match="version 99.*reads version 1"):
        Manifest.from_json(json.dumps(raw).encode(), "m")


@settings(max_examples=10)
@given(crash_at=st.integers(1, 95), interval=st.sampled_from([1, 3, 10, 37]),
       rows_per_file=st.sampled_from([1, 5, 64]), replicas=st.sampled_from([1, 3]))
def test_resume_after_a_driver_crash_is_exactly_once(tmp_path_factory: pytest.TempPathFactory, clean_runs,
                                                      crash_at: int, interval: int, rows_per_file: int,
                                                      replicas: int) -> None:
    base = tmp_path_factory.mktemp("resume")
    spec = _spec(base, _records(), interval=interval, rows_per_file=rows_per_file, replicas=replicas)
    with pytest.raises(Crash):
        run_job(spec, on_progress=_crash_after(crash_at))
    res = run_job(spec, resume=True)
    clean = clean_runs(replicas)
    check = exactly_once(clean[0], _read(base / "out"))
    assert check == {"checked": 96, "lost": 0, "duplicated": 0, "unexpected": 0, "different": 0, "order_equal": 1}
    dead = _read(base / "out" / "dead_letter")
    assert sorted(dead.column("offset").to_pylist()) == sorted(clean[1].column("offset").to_pylist())
    assert res.sessions.live == 0 and res.sessions.ended["end"] > 0


def test_resume_refusals(tmp_path: Path) -> None:
    spec = _spec(tmp_path, _records())
    with pytest.raises(Crash):
        run_job(spec, on_progress=_crash_after(40))
    other = _spec(tmp_path, _records(), replicas=3)
    with pytest.raises(CheckpointError, match=r"same stages and replicas"):
        run_job(other, resume=True)
    no_ckpt = JobSpec.from_dict({**spec.model_dump(exclude={"base_dir"}), "checkpoint": {"enabled": False}},
                                base_dir=tmp_path)
    with pytest.raises(ValueError, match="resume needs checkpoints"):
        run_job(no_ckpt, resume=True)
    keyed = JobSpec.from_dict({**spec.model_dump(exclude={"base_dir"}),
                               "stages": [{"name": "count", "cls": "tests.dataflow.stages:Counter"}]},
                              base_dir=tmp_path)
    with pytest.raises(ValueError, match=r"\['count'\] keep session state but have no snapshot\(\)/restore\(\)"):
        run_job(keyed)
    with pytest.raises(ValueError, match="escapes its root"):
        run_job(_spec(tmp_path / "esc", _records(), **{"path": "../../elsewhere"}))


@pytest.mark.parametrize("error,plan", [
    (errno.ENOSPC, {"after_bytes": 6000}),               # the disk fills up part-way through a file
    (errno.EACCES, {"on_call": 25, "sticky": True}),      # the folder becomes unwritable
])
def test_unwritable_or_full_checkpoint_storage_fails_clearly_and_loses_nothing(
        tmp_path: Path, clean, error: int, plan: dict[str, Any]) -> None:
    spec = _spec(tmp_path, _records())
    faults = Faults(error=error, **plan)
    with inject_faults(tmp_path / "ckpt", faults):
        with pytest.raises(CheckpointError) as info:
            run_job(spec)
    msg = str(info.value)
    assert faults.injected and str(tmp_path / "ckpt") in msg and f"errno {error}" in msg
    assert "last complete checkpoint is kept" in msg
    store = CheckpointStore(str(tmp_path / "ckpt"))
    m = store.latest()
    assert m is not None  # some checkpoints completed before the fault
    for stage in m.states:
        for e in stage:
            store.read_state(m.ckpt_id, e)  # intact: hashes match
    assert not [p for p in files_under(tmp_path / "ckpt") if p.name.endswith(".tmp")]
    # Storage fixed: resuming delivers everything exactly once.
    run_job(spec, resume=True)
    check = exactly_once(clean[0], _read(tmp_path / "out"))
    assert check["lost"] == check["duplicated"] == check["different"] == 0 and check["order_equal"] == 1


def test_pyarrow_filesystem_store_and_its_faults(tmp_path: Path, clean) -> None:
    (tmp_path / "fs").mkdir()
    faults = Faults(error=errno.ENOSPC, on_call=40)
    spec = _spec(tmp_path, _records(), path=str(tmp_path / "fs" / "ckpt"), filesystem=faulty_filesystem(faults))
    with pytest.raises(CheckpointError, match="No space left on device"):
        run_job(spec)
    assert faults.injected
    ok = _spec(tmp_path, _records(), path=str(tmp_path / "fs" / "ckpt"), filesystem=faulty_filesystem(Faults()))
    res = run_job(ok, resume=True)
    assert res.metrics["checkpoints"]["completed"] >= 1
    check = exactly_once(clean[0], _read(tmp_path / "out"))
    assert check["lost"] == check["duplicated"] == check["different"] == 0


def test_time_interval_barriers(tmp_path: Path) -> None:
    import time

    def slow():
        for r in _records():
            time.sleep(0.004)
            yield r

    spec = JobSpec.from_dict({
        "name": "timed", "source": {"type": "iterator", "obj": slow()}, "model": None,
        "runner": {"type": "local", "batch_size": 4}, "stages": [{"name": "history", "cls": HIST}],
        "checkpoint": {"enabled": True, "interval_records": 10**9, "interval_s": 0.05},
    }, base_dir=tmp_path)
    res = run_job(spec)
    assert res.records_out == 96
    # ~0.4 s of source at a barrier per 0.05 s; never more than one per batch.
    assert 3 <= res.metrics["checkpoints"]["completed"] <= 98 // 4
    assert CheckpointStore(str(tmp_path / "checkpoints" / "timed")).latest() is not None
