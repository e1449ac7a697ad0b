"""The model stage on a tiny random Llama: replies equal an in-process Engine fed each session's
turns in order; local and Ray runners agree; session state is freed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from streamctx.dataflow import run_job
from streamctx.engine import Engine
from streamctx.spec import JobSpec
from tests.dataflow.streams import conversations, interleave
from tests.fixtures.tiny_models import make_tiny_llama

TIMING = {"latency_ms"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", hidden=32, layers=2, heads=2, kv_heads=1)


def _records() -> list[dict[str, Any]]:
    convs = conversations(4, 3, generate_every=2)
    convs[1][0]["role"] = "document"  # fed as raw text, no chat template
    convs[1][0]["text"] = "Some long document text."
    return interleave(convs, seed=11)


def _spec(tiny: Path, records: list[dict[str, Any]], **runner: Any) -> JobSpec:
    return JobSpec.from_dict({
        "name": "m", "source": {"type": "iterator", "obj": records},
        "model": {"path": str(tiny), "max_new_tokens": 4},
        "runner": {"replicas": 2, "batch_size": 5, **runner},
    })


def _reference(tiny: Path, records: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """Each session alone, in turn order, through the library API."""
    engine = Engine.load(str(tiny))
    out = {}
    for r in sorted(records, key=lambda r: (r["session_id"], r["turn"])):
        s = engine.session(r["session_id"])
        if r["role"] == "document":
            s.feed(r["text"])
        else:
            s.chat(r["role"], r["text"])
        reply = None
        if r.get("generate"):
            g = s.generate(r["max_new_tokens"]) if r["role"] == "document" else s.chat_reply(r["max_new_tokens"])
            reply = g.text
        out[r["session_id"], r["turn"]] = {"reply": reply, "n_context_tokens": s.n_tokens}
    return out


def _strip(table) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in table.to_pylist()]


def test_model_stage_matches_engine_and_runners_agree(tiny: Path, ray_local) -> None:
    records = _records()
    local = run_job(_spec(tiny, records), runner="local")
    ray_res = run_job(_spec(tiny, records), runner="ray")
    assert local.dead_letters == ray_res.dead_letters == 0
    assert _strip(local.outputs) == _strip(ray_res.outputs)
    ref = _reference(tiny, records)
    rows = local.outputs.to_pylist()
    assert len(rows) == len(records)
    assert any(r["reply"] for r in rows)
    for row in rows:
        want = ref[row["session_id"], row["turn"]]
        assert row["reply"] == want["reply"]
        assert row["n_context_tokens"] == want["n_context_tokens"]
        assert row["cached_tokens"] == row["n_context_tokens"]  # full policy keeps everything
    # Every session ended with its `end` record: no state is left anywhere.
    for res in (local, ray_res):
        assert res.sessions.ended == {"end": 4, "ttl": 0, "close": 0}
        assert res.sessions.live == 0 and res.sessions.bytes == 0
        assert res.metrics["stages"]["model"]["peak_session_bytes"] > 0


def test_model_stage_dead_letters_a_record_the_engine_rejects(tiny: Path) -> None:
    records = [
        {"session_id": "a", "turn": 0, "role": "document", "text": "", "generate": True},  # nothing to reply to
        {"session_id": "a", "turn": 1, "role": "user", "text": "hi", "generate": True, "max_new_tokens": 2},
        {"session_id": "b", "turn": 0, "role": "user", "text": "hello", "end": True},
    ]
    res = run_job(_spec(tiny, records, type="local", replicas=1))
    assert res.records_out == 2 and res.dead_letters == 1
    dead = res.dead_letter.to_pylist()[0]
    assert dead["stage"] == "model" and dead["turn"] == 0 and "EngineError" in dead["reason"]
    assert res.sessions.live == 0 and res.sessions.bytes == 0
    assert res.sessions.ended["close"] == 1  # "a" had no `end` record: closed with the stream


def test_unknown_policy_is_rejected_by_the_engine(tiny: Path) -> None:
    spec = JobSpec.from_dict({
        "name": "p", "source": {"type": "iterator", "obj": []}, "model": {"path": str(tiny)},
        "policy": {"type": "no_such_policy"}, "runner": {"type": "local"},
    })
    with pytest.raises(ValueError, match="no_such_policy"):
        run_job(spec)


def test_more_layer_stages_than_layers_is_refused_clearly(tiny: Path) -> None:
    spec = JobSpec.from_dict({
        "name": "s", "source": {"type": "iterator", "obj": []}, "model": {"path": str(tiny), "stages": 3},
        "runner": {"type": "local"},
    })
    with pytest.raises(ValueError, match="model.stages: cannot split 2 layers into 3 stages"):
        run_job(spec)


def test_a_batch_of_sessions_shares_model_steps(tiny: Path) -> None:
    """One Arrow batch of 6 sessions runs as batched engine steps (several sessions per forward),
    with each row equal to the session run alone."""
    import pyarrow as pa

    from streamctx.dataflow.model_stage import ModelStage

    stage = ModelStage({"name": None, "path": str(tiny), "device": None, "dtype": None, "max_new_tokens": 3},
                       {"type": "full"}, base_dir=".")
    widths: list[int] = []
    forward = stage.engine.model.forward

    def counting(batch, **kw):  # type: ignore[no-untyped-def]
        widths.append(len(batch))
        return forward(batch, **kw)

    stage.engine.model.forward = counting
    records = [{"session_id": f"s{k}", "turn": 0, "role": "user", "text": f"hello number {k}", "generate": True,
                "max_new_tokens": 3, "end": False, "_offset": k, "_seq": k, "_fresh": True} for k in range(6)]
    out, dead = stage.process_dead(pa.RecordBatch.from_pylist(records))
    assert dead == [] and out is not None
    assert max(widths) == 6  # all six sessions' prefills (then decodes) in one forward
    ref = _reference(tiny, [{**r} for r in records])
    for row in out.to_pylist():
        assert row["reply"] == ref[row["session_id"], 0]["reply"]
        assert row["n_context_tokens"] == ref[row["session_id"], 0]["n_context_tokens"]
    stage.close()


def test_tiered_session_state_gives_the_rows_of_an_unbounded_run(tiny: Path, tmp_path: Path) -> None:
    """scheduler.memory: at most 2 live sessions, a tiny device and host budget: idle sessions spill
    (to disk too) and come back for their turns; every row equals the run with all sessions live,
    and the job's metrics report the tiers."""
    records = interleave(conversations(6, 4, generate_every=2), seed=5)

    def run(memory: dict[str, Any] | None) -> Any:
        data = {"name": "t", "source": {"type": "iterator", "obj": records},
                "model": {"path": str(tiny), "max_new_tokens": 3},
                "runner": {"type": "local", "replicas": 1, "batch_size": 8}, "base_dir": str(tmp_path)}
        if memory:
            data["scheduler"] = {"memory": memory}
        return run_job(JobSpec.from_dict(data))

    plain = run(None)
    tiered = run({"device_budget": "256KiB", "host_budget": "512KiB", "spill_dir": "spill", "max_live_sessions": 2})
    ignore = TIMING | {"state_bytes"}  # KV blocks held (decode headroom) depend on save/restore history
    assert [{k: v for k, v in r.items() if k not in ignore} for r in tiered.outputs.to_pylist()] == \
        [{k: v for k, v in r.items() if k not in ignore} for r in plain.outputs.to_pylist()]
    assert tiered.dead_letters == 0 and len(tiered.outputs) == len(records)
    (stats,) = tiered.metrics["stages"]["model"]["tiers"]
    assert stats["spills"] > 0 and stats["restores"] > 0 and stats["releases"] > 0
    assert any(move.endswith("->disk") for move in stats["moves"]), stats  # states reached the disk tier
    assert "tiers" not in plain.metrics["stages"]["model"]
    assert tiered.sessions.live == 0 and tiered.sessions.bytes == 0
