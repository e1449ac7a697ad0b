"""Checkpoints of a split model (`model.stages > 1`): the first stage's snapshot holds every
session whole (its own layers and every later layer stage's share), a restore continues bit for
bit, and a lost layer stage is recovered from the last checkpoint with exactly-once output, on the
local runner (the loss injected) and on Ray (a layer actor's process SIGKILLed).

The counts (faults injected, records checked, losses and duplicates) are printed: run with `-s`.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pytest

from streamctx.engine import Engine, EngineError
from streamctx.dataflow import run_job
from streamctx.dataflow.pipeline_stage import LAYER_ACTOR_PREFIX, LayerStageLost, PipelinedModelStage
from streamctx.dataflow.plan import build_plan
from streamctx.dataflow.records import validate_records
from streamctx.io.sources import RawRecord
from streamctx.model.pipeline import LayerStage
from streamctx.spec import JobSpec
from streamctx.state import StateBlob
from tests.dataflow import faults
from tests.dataflow.streams import conversations, interleave
from tests.fixtures.tiny_models import make_tiny_llama

# A bounded policy whose later-stage instances hold state of their own (SnapKV's observed queries).
SNAPKV = {"type": "snapkv", "window": 8, "selected": 8, "observe_window": 4, "kernel": 3, "slack": 4}
SINK_WINDOW = {"type": "sink_window", "sinks": 2, "window": 12}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", hidden=32, layers=3, heads=2, kv_heads=1)


def _records(n_sessions: int = 6, turns: int = 8, seed: int = 3) -> list[dict[str, Any]]:
    return interleave(conversations(n_sessions, turns, generate_every=3), seed=seed)


def _spec(tiny: Path, records: list[dict[str, Any]], base: Path, *, runner: str = "local", stages: int = 3,
          policy: dict[str, Any] | None = None, interval: int = 8, replicas: int = 2) -> JobSpec:
    return JobSpec.from_dict({
        "name": "pipe-ckpt", "source": {"type": "iterator", "obj": records},
        "model": {"path": str(tiny), "max_new_tokens": 3, "num_cpus": 0, "stages": stages, "replicas": replicas},
        "policy": policy or SINK_WINDOW,
        "runner": {"type": runner, "replicas": 2, "batch_size": 4, "key_groups": 16, "max_in_flight": 16},
        "checkpoint": {"enabled": True, "interval_records": interval, "path": "ckpt"},
    }, base_dir=base)


# --- snapshot and restore of the stage ------------------------------------------------------------

def _stage(tiny: Path, tmp_path: Path, policy: dict[str, Any], stages: int) -> PipelinedModelStage:
    plan = build_plan(_spec(tiny, [], tmp_path, stages=stages, policy=policy, replicas=1))
    stage = next(p for p in plan if p.kind == "model").build(0)
    assert isinstance(stage, PipelinedModelStage)
    return stage


def _batches(records: list[dict[str, Any]], size: int = 4) -> Iterator[pa.RecordBatch]:
    seq = 0
    for a in range(0, len(records), size):
        raws = [RawRecord(a + i, a + i + 1, r) for i, r in enumerate(records[a:a + size])]
        batch, dead, seq = validate_records(raws, seq)
        assert batch is not None and not dead
        yield batch


def _same_state(a: dict[str, bytes], b: dict[str, bytes]) -> bool:
    """Bit-exact equality of two snapshots, session by session, the later stages' shares included
    (safetensors headers do not keep metadata order, so the bytes themselves may differ)."""
    def parts(data: bytes) -> list[StateBlob]:
        blob = StateBlob.from_bytes(data)
        shares = sorted(k for k in blob.tensors if k.startswith("stage."))
        nested = [StateBlob.from_bytes(blob.tensors.pop(k).numpy().tobytes()) for k in shares]
        return [blob, *nested]
    return a.keys() == b.keys() and all(
        len(pa_) == len(pb) and all(x.equal(y) for x, y in zip(pa_, pb))
        for pa_, pb in ((parts(a[k]), parts(b[k])) for k in a))


def _rows(batch: pa.RecordBatch | None) -> list[dict[str, Any]]:
    assert batch is not None
    return [{k: v for k, v in r.items() if k != "latency_ms"} for r in batch.to_pylist()]


@pytest.mark.parametrize("policy,stages", [(SNAPKV, 3), (SINK_WINDOW, 2)])
def test_snapshot_restore_of_a_split_model_continues_bit_identically(tiny: Path, tmp_path: Path,
                                                                     policy: dict[str, Any], stages: int) -> None:
    records = _records(4, 10, seed=11)
    batches = list(_batches(records))
    cut = len(batches) // 2
    a = _stage(tiny, tmp_path, policy, stages)
    for b in batches[:cut]:
        a.process(b)
    saved = a.snapshot()
    # Every live session, and each holds the later stages' shares (stateful policy included).
    assert sorted(saved) == sorted(a.engine.sessions) and len(saved) >= 3
    b_ = _stage(tiny, tmp_path, policy, stages)
    b_.process(batches[0])  # sessions the restore must drop
    b_.restore(saved)
    assert _same_state(b_.snapshot(), saved)  # the restored state, bit for bit
    rows = []
    for batch in batches[cut:]:
        rows += _rows(a.process(batch))
        assert _rows(b_.process(batch)) == rows[-batch.num_rows:]  # replies, counts, state bytes
    assert any(r["evicted_tokens"] for r in rows) and any(r["reply"] for r in rows)  # evicts, generates
    # After the same records, the same state: last logits, every layer's K/V, the policies' state.
    assert _same_state(b_.snapshot(), a.snapshot())
    for st in (a, b_):
        st.close()
        assert all(s["live_sessions"] == 0 and s["blocks_used"] == 0 for s in st.chain.inner.stats())


def test_split_session_state_fits_only_the_same_split(tiny: Path, tmp_path: Path) -> None:
    three = _stage(tiny, tmp_path, SINK_WINDOW, 3)
    three.process(next(_batches(_records(2, 2))))
    saved = three.snapshot()
    two = _stage(tiny, tmp_path, SINK_WINDOW, 2)
    with pytest.raises(EngineError, match=r"split into layer ranges \[\[0, 1\], \[1, 2\], \[2, 3\]\]; this model "
                                          r"is split into \[\[0, 2\], \[2, 3\]\]"):
        two.restore(saved)
    whole = Engine.load(str(tiny), policy={"name": "sink_window", "sinks": 2, "window": 12})
    with pytest.raises(EngineError, match="does not fit this model: layer 1"):
        whole.session("s0", state=next(iter(saved.values())))
    for st in (two, three):
        st.close()


# --- recovery on the local runner -----------------------------------------------------------------

class _LoseLayerStage:
    """Patches `LayerStage.forward`: at the given forward calls (counted over every layer stage of
    the run), the stage drops every session's state, as its dead process would, and raises."""

    def __init__(self, at_calls: list[int]) -> None:
        self.at = set(at_calls)
        self.calls = 0
        self.injected: list[str] = []
        self.real = LayerStage.forward

    def __call__(self, stage: LayerStage, *args: Any, **kw: Any) -> Any:
        self.calls += 1
        if self.calls in self.at:
            self.injected.append(f"layers {stage.layers.start}-{stage.layers.stop - 1} at call {self.calls}")
            stage.caches.clear()
            stage.policies.clear()
            raise LayerStageLost(f"layer stage {stage.layers} lost (injected)")
        return self.real(stage, *args, **kw)


@pytest.mark.parametrize("policy", [SINK_WINDOW, SNAPKV], ids=["sink_window", "snapkv"])
def test_lost_layer_stages_recover_exactly_once_on_the_local_runner(tiny: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    policy: dict[str, Any]) -> None:
    records = _records()
    clean = run_job(_spec(tiny, records, tmp_path / "clean", policy=policy))
    assert clean.records_out == len(records) == 48 and clean.dead_letters == 0
    assert clean.metrics["checkpoints"]["completed"] >= 5

    fault = _LoseLayerStage(at_calls=[30, 75, 120])  # of about 170 layer-stage calls in a fault-free run
    monkeypatch.setattr(LayerStage, "forward", lambda self, *a, **k: fault(self, *a, **k))
    res = run_job(_spec(tiny, records, tmp_path / "faulty", policy=policy))
    ck = res.metrics["checkpoints"]
    check = faults.exactly_once(clean.outputs, res.outputs)
    print(f"\n[split recovery, local, {policy['type']}] faults injected: {len(fault.injected)} "
          f"({'; '.join(fault.injected)}); recoveries: {ck['recoveries']}, replayed rows skipped: "
          f"{ck['replayed_rows_skipped']}; {faults.check_line(check)}")
    assert len(fault.injected) == 3
    assert {f.split(' at')[0] for f in fault.injected} == {"layers 1-1", "layers 2-2"}  # both later stages
    assert ck["recoveries"] == 3 and all("LayerStageLost" in f for f in ck["failures"])
    assert check == {"checked": 48, "lost": 0, "duplicated": 0, "unexpected": 0, "different": 0, "order_equal": 1}
    assert res.dead_letters == 0
    assert res.sessions.ended == clean.sessions.ended and res.sessions.live == 0 and res.sessions.bytes == 0


class _DriverKilled(Exception):
    """The driver "dies" (raised from on_progress: nothing after it runs)."""


def test_resume_after_a_driver_crash_with_a_split_model(tiny: Path, tmp_path: Path) -> None:
    import json

    import pyarrow.parquet as pq

    records = _records()

    def spec(base: Path) -> JobSpec:
        base.mkdir()
        (base / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        d = _spec(tiny, records, base).model_dump(exclude={"source", "sink", "base_dir"})
        return JobSpec.from_dict({**d, "source": {"type": "jsonl", "path": "in.jsonl"},
                                  "sink": {"type": "parquet", "path": "out", "rows_per_file": 5}}, base_dir=base)

    def crash(p: Any) -> None:
        if p.records_out >= 27:
            raise _DriverKilled(f"driver killed after {p.records_out} rows")

    def read(base: Path) -> pa.Table:
        return pa.concat_tables([pq.read_table(f) for f in sorted((base / "out").glob("part-*.parquet"))])

    run_job(spec(tmp_path / "clean"))
    job = spec(tmp_path / "resume")
    with pytest.raises(_DriverKilled):
        run_job(job, on_progress=crash)
    res = run_job(job, resume=True)
    check = faults.exactly_once(read(tmp_path / "clean"), read(tmp_path / "resume"))
    assert check == {"checked": 48, "lost": 0, "duplicated": 0, "unexpected": 0, "different": 0, "order_equal": 1}
    assert res.sessions.live == 0 and 0 < res.records_out < 48  # the resumed run did only the rest


# --- recovery on Ray: SIGKILL a layer actor --------------------------------------------------------

class _KillLayerActor:
    """`on_progress` hook: when the output passes each of `at_rows`, SIGKILLs the process of a
    later layer-stage actor, the stages taken in turn (the last first), the replica seeded-random."""

    def __init__(self, seed: int, at_rows: list[int], stages: int) -> None:
        self.rng = random.Random(seed)
        self.pending = sorted(at_rows)
        self.order = list(range(stages - 1, 0, -1))
        self.kills: list[str] = []

    def __call__(self, progress: Any) -> None:
        import ray

        if not self.pending or progress.records_out < self.pending[0]:
            return
        self.pending.pop(0)
        stage = self.order[len(self.kills) % len(self.order)]
        names = sorted((a["namespace"], a["name"]) for a in ray.util.list_named_actors(all_namespaces=True)
                       if a["name"].startswith(LAYER_ACTOR_PREFIX) and a["name"].endswith(f".{stage}"))
        ns, name = self.rng.choice(names)
        pid = ray.get(ray.get_actor(name, namespace=ns).pid.remote(), timeout=30)
        os.kill(pid, signal.SIGKILL)
        self.kills.append(f"layer stage {stage} at {progress.records_out} rows")


def test_sigkilled_layer_actors_recover_exactly_once_on_ray(tiny: Path, tmp_path: Path, ray_local) -> None:
    records = _records()
    clean = run_job(_spec(tiny, records, tmp_path / "clean", runner="ray", replicas=1))
    assert clean.records_out == len(records) == 48 and clean.dead_letters == 0

    killer = _KillLayerActor(seed=5, at_rows=[10, 30], stages=3)
    res = run_job(_spec(tiny, records, tmp_path / "faulty", runner="ray", replicas=1), on_progress=killer)
    ck = res.metrics["checkpoints"]
    check = faults.exactly_once(clean.outputs, res.outputs)
    print(f"\n[split recovery, ray] faults injected: {len(killer.kills)} ({'; '.join(killer.kills)}); "
          f"recoveries: {ck['recoveries']}, failures: {ck['failures']}; replayed rows skipped: "
          f"{ck['replayed_rows_skipped']}; {faults.check_line(check)}")
    assert [k.split(" at")[0] for k in killer.kills] == ["layer stage 2", "layer stage 1"]
    # The stage actors all lived (a layer actor is not one): nothing replaced by the executor; the
    # first stage started new layer actors itself.
    assert ck["recoveries"] >= 1 and ck["replaced_actors"] == 0
    assert any("LayerStageLost" in f for f in ck["failures"])
    assert check == {"checked": 48, "lost": 0, "duplicated": 0, "unexpected": 0, "different": 0, "order_equal": 1}
    assert res.dead_letters == 0 and res.sessions.live == 0
