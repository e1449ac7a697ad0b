"""Exactly-once recovery on real Ray: seeded SIGKILLs of stage actor processes during a 500-turn
multi-session stream through a tiny random Llama; the output equals a fault-free run, row for row.

The counts (faults injected, records checked, losses and duplicates found) are printed: run with
`-s` to see them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from streamctx.dataflow import run_job
from streamctx.dataflow.checkpoint import CheckpointStore
from streamctx.spec import JobSpec
from tests.dataflow import faults, stages
from tests.dataflow.streams import multi_session_stream
from tests.fixtures.tiny_models import make_tiny_llama

SEGMENT, SLOW = 0, 3  # stage indexes: segment, history, model, slow_snapshot


@pytest.fixture(scope="module")
def ray_stages(ray_local):
    ray_local.cloudpickle.register_pickle_by_value(sys.modules[stages.__name__])
    yield ray_local


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", hidden=32, layers=2, heads=2, kv_heads=1)


def spec_for(tiny: Path, records: list[dict[str, Any]], base: Path, *, interval: int = 50) -> JobSpec:
    return JobSpec.from_dict({
        "name": "recover", "source": {"type": "iterator", "obj": records},
        "model": {"path": str(tiny), "max_new_tokens": 3, "replicas": 2, "num_cpus": 0},
        "runner": {"type": "ray", "replicas": 2, "batch_size": 10, "key_groups": 32, "max_in_flight": 60},
        "stages": [
            {"name": "history", "cls": stages.History, "replicas": 2},
            {"name": "slow_snapshot", "cls": stages.SlowSnapshot, "kwargs": {"seconds": 0.4}, "replicas": 1,
             "place": "post_model"},
        ],
        "checkpoint": {"enabled": True, "interval_records": interval, "path": "ckpt"},
    }, base_dir=base)


def test_sigkilled_stage_actors_recover_with_exactly_once_output(ray_stages, tiny: Path, tmp_path: Path) -> None:
    records = multi_session_stream()
    clean = run_job(spec_for(tiny, records, tmp_path / "clean"))
    assert clean.records_out == len(records) == 500 and clean.dead_letters == 0
    assert clean.metrics["checkpoints"]["completed"] >= 9

    killer = faults.Killer(seed=7, at_rows=[60, 170, 260, 390], store_root=tmp_path / "faulty" / "ckpt",
                           between=(SEGMENT, SLOW))
    res = run_job(spec_for(tiny, records, tmp_path / "faulty"), on_progress=killer, on_start=killer.on_start)
    ck = res.metrics["checkpoints"]
    check = faults.exactly_once(clean.outputs, res.outputs)
    print(f"\n[recovery] faults injected: {len(killer.kills)} ({'; '.join(killer.kills)}); recoveries: "
          f"{ck['recoveries']}, actors replaced: {ck['replaced_actors']}, replayed rows skipped: "
          f"{ck['replayed_rows_skipped']}; {faults.check_line(check)}")
    assert len(killer.kills) == 5 and killer.between_kills == 1
    # Kills close together may share one recovery; every killed actor was replaced.
    assert ck["recoveries"] >= 3 and ck["replaced_actors"] == len(killer.kills)
    assert check == {"checked": 500, "lost": 0, "duplicated": 0, "unexpected": 0, "different": 0, "order_equal": 1}
    assert res.dead_letters == 0 and res.records_out == 500
    # Session accounting survives the restarts: every session ended by its `end` record, nothing left.
    assert res.sessions.ended == clean.sessions.ended == {"end": 20, "ttl": 0, "close": 0}
    assert res.sessions.live == 0
    # The checkpoint the between-snapshots kill interrupted never completed (no manifest).
    store = CheckpointStore(str(tmp_path / "faulty" / "ckpt"))
    assert killer.interrupted is not None
    assert int(killer.interrupted.split("-")[1]) not in store.complete_ids()


def test_a_source_that_cannot_replay_fails_clearly_instead_of_losing_records(ray_stages, tmp_path: Path) -> None:
    from streamctx.dataflow.checkpoint import CheckpointError

    records = (r for r in multi_session_stream(6, 10))  # a generator: read once
    spec = JobSpec.from_dict({
        "name": "gen", "source": {"type": "iterator", "obj": records}, "model": None,
        "runner": {"type": "ray", "replicas": 1, "batch_size": 5},
        "stages": [{"name": "history", "cls": stages.History}],
        "checkpoint": {"enabled": True, "interval_records": 10, "path": "ckpt"},
    }, base_dir=tmp_path)
    killer = faults.Killer(seed=1, at_rows=[20])
    with pytest.raises(CheckpointError, match="cannot recover: the iterator source cannot be read again"):
        run_job(spec, on_progress=killer, on_start=killer.on_start)
    assert len(killer.kills) == 1
