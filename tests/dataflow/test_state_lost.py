"""Session state lost with a peer node (`StateLostError` raised in a stage) is a recoverable failure:
never dead-lettered, the job restores every replica from the last checkpoint and replays, and the
output equals a fault-free run (local and Ray runners). A model stage asked for a peer tier on a
single node leaves it out with the reason in its tier stats; its rows equal an unbounded run."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from streamctx.dataflow import run_job
from streamctx.dataflow.stages import Envelope, StageHost
from streamctx.spec import JobSpec, SessionsSpec
from streamctx.storage import StateLostError
from tests.dataflow import faults, stages
from tests.dataflow.streams import conversations, interleave, multi_session_stream

RECORDS = multi_session_stream(8, 15)  # 120 records
LOST_AT = RECORDS[70]["text"]  # after the first checkpoints


@pytest.fixture(scope="module")
def ray_stages(ray_local):
    ray_local.cloudpickle.register_pickle_by_value(sys.modules[stages.__name__])
    yield ray_local


def _spec(base: Path, runner: str, cls: Any, *, checkpoint: bool = True) -> JobSpec:
    return JobSpec.from_dict({
        "name": "lost", "source": {"type": "iterator", "obj": RECORDS}, "model": None,
        "runner": {"type": runner, "replicas": 2, "batch_size": 10, "key_groups": 16},
        "stages": [{"name": "history", "cls": cls, "kwargs": {"text": LOST_AT} if cls is stages.LoseStateOnce else {}}],
        "checkpoint": {"enabled": checkpoint, "interval_records": 20, "path": "ckpt"},
    }, base_dir=base)


def test_the_stage_host_lets_state_lost_through_and_dead_letters_other_errors() -> None:
    batch = pa.RecordBatch.from_pylist([{"session_id": "a", "turn": 0, "text": "x", "end": False, "_offset": 0,
                                         "_seq": 0, "_fresh": True}])
    lose = StageHost("history", stages.LoseStateOnce("x"), SessionsSpec())
    with pytest.raises(StateLostError, match="lost peer store"):
        lose.step(Envelope(batch))
    fail = StageHost("fail", stages.FailOn("x"), SessionsSpec())
    out = fail.step(Envelope(batch))
    assert out.batch is None and len(out.dead) == 1 and "RuntimeError" in out.dead[0]["reason"]


@pytest.mark.parametrize("runner", ["local", "ray"])
def test_lost_state_is_recovered_from_the_checkpoint_exactly_once(runner: str, ray_stages, tmp_path: Path) -> None:
    clean = run_job(_spec(tmp_path / "clean", runner, stages.History))
    res = run_job(_spec(tmp_path / "lost", runner, stages.LoseStateOnce))
    ck = res.metrics["checkpoints"]
    check = faults.exactly_once(clean.outputs, res.outputs)
    print(f"\n[state lost, {runner}] recoveries: {ck['recoveries']} ({ck['failures']}); records checked: "
          f"{check['checked']}, lost: {check['lost']}, duplicated: {check['duplicated']}")
    assert ck["recoveries"] == 1 and "StateLostError" in ck["failures"][0] and ck["replaced_actors"] == 0
    assert check == {"checked": 120, "lost": 0, "duplicated": 0, "unexpected": 0, "different": 0, "order_equal": 1}
    assert res.dead_letters == 0 and res.sessions.ended == clean.sessions.ended


def test_lost_state_without_checkpoints_fails_the_job(tmp_path: Path) -> None:
    with pytest.raises(StateLostError, match="lost peer store"):
        run_job(_spec(tmp_path, "local", stages.LoseStateOnce, checkpoint=False))


def test_a_peer_tier_on_a_single_node_is_left_out_with_its_reason(ray_local, tmp_path: Path) -> None:
    from tests.fixtures.tiny_models import make_tiny_llama

    tiny = make_tiny_llama(tmp_path / "tiny", hidden=32, layers=2, heads=2, kv_heads=1)
    records = interleave(conversations(5, 4, generate_every=2), seed=3)

    def run(memory: dict[str, Any] | None) -> Any:
        data: dict[str, Any] = {"name": "p", "source": {"type": "iterator", "obj": records},
                                "model": {"path": str(tiny), "max_new_tokens": 3},
                                "runner": {"type": "local", "replicas": 1, "batch_size": 8}}
        if memory:
            data["scheduler"] = {"memory": memory}
        return run_job(JobSpec.from_dict(data, base_dir=tmp_path))

    plain = run(None)
    tiered = run({"device_budget": "256KiB", "host_budget": "256KiB", "peer_budget": "1MiB", "peer_stores": 2,
                  "spill_dir": "spill", "max_live_sessions": 2})
    (stats,) = tiered.metrics["stages"]["model"]["tiers"]
    assert "no alive Ray node other than this one" in stats["peer"]["unavailable"]
    assert set(stats["tier_bytes"]) == {"device", "host", "disk"}
    ignore = faults.IGNORED
    assert [{k: v for k, v in r.items() if k not in ignore} for r in tiered.outputs.to_pylist()] == \
        [{k: v for k, v in r.items() if k not in ignore} for r in plain.outputs.to_pylist()]
