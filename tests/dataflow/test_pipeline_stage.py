"""`model.stages: N`: the model's layers split over N stages (Ray actors on the ray runner) give
the rows of the unsplit model stage, and every stage's session state is freed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from streamctx.dataflow import run_job
from streamctx.spec import JobSpec
from tests.dataflow.streams import conversations, interleave
from tests.fixtures.tiny_models import make_tiny_llama, make_tiny_mamba

TIMING = {"latency_ms"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", hidden=32, layers=3, heads=2, kv_heads=1)


def _records() -> list[dict[str, Any]]:
    convs = conversations(4, 4, generate_every=2)
    convs[2][0]["role"] = "document"
    convs[2][0]["text"] = "A document fed as raw text, long enough to span a few blocks of the cache."
    return interleave(convs, seed=5)


def _spec(tiny: Path, records: list[dict[str, Any]], *, policy: dict[str, Any] | None = None,
          **model: Any) -> JobSpec:
    return JobSpec.from_dict({
        "name": "pipe", "source": {"type": "iterator", "obj": records},
        "model": {"path": str(tiny), "max_new_tokens": 6, "num_cpus": 0, **model},
        "policy": policy or {"type": "full"},
        "runner": {"replicas": 2, "batch_size": 4},
    })


def _rows(res: Any) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in res.outputs.to_pylist()]


def test_two_layer_stages_equal_one_on_both_runners(tiny: Path, ray_local) -> None:
    records = _records()
    one = run_job(_spec(tiny, records), runner="local")
    two_local = run_job(_spec(tiny, records, stages=2), runner="local")
    two_ray = run_job(_spec(tiny, records, stages=2), runner="ray")
    rows = _rows(one)
    assert len(rows) == len(records) and one.dead_letters == 0
    assert sum(bool(r["reply"]) for r in rows) >= 4
    assert _rows(two_local) == rows  # replies, token counts and state bytes (summed over stages)
    assert _rows(two_ray) == rows
    for res in (two_local, two_ray):
        assert res.dead_letters == 0
        assert res.sessions.live == 0 and res.sessions.bytes == 0
        assert res.metrics["stages"]["model"]["peak_session_bytes"] == one.metrics["stages"]["model"]["peak_session_bytes"]


def test_later_stages_are_ray_actors_placed_by_stage_resources(tiny: Path, ray_local) -> None:
    spec = _spec(tiny, _records()[:2], stages=2, stage_resources=[{}, {"no_such_node": 1}])
    # The layer stages get half; the other half covers starting the first stage and loading its
    # model, which takes well over 4 s on a loaded 2-core machine.
    spec.runner.start_timeout_s = 40
    with pytest.raises(RuntimeError, match=r"layer stage actors were not placed.*no_such_node"):
        run_job(spec, runner="ray")


def test_three_stages_with_a_bounded_policy_equal_one(tiny: Path) -> None:
    records = _records()
    policy = {"type": "sink_window", "sinks": 2, "window": 12}
    one = run_job(_spec(tiny, records, policy=policy), runner="local")
    three = run_job(_spec(tiny, records, policy=policy, stages=3), runner="local")
    rows = _rows(one)
    assert any(r["evicted_tokens"] > 0 for r in rows)  # the window really evicts
    assert _rows(three) == rows
    assert three.sessions.bytes == 0


def test_split_mamba_is_refused_clearly(tmp_path: Path) -> None:
    mamba = make_tiny_mamba(tmp_path / "mamba", hidden=16, layers=2)
    with pytest.raises(NotImplementedError, match="Llama-family models only"):
        run_job(_spec(mamba, [], stages=2), runner="local")
