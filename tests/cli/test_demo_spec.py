"""The bundled demo: its conversations and its job spec."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from streamctx.cli.demo import DEMO_SPEC, build_demo_spec
from streamctx.cli.errors import CLIError
from streamctx.spec import InputRecord, validate


def _records() -> list[dict]:
    text = resources.files("streamctx.data").joinpath("demo_conversations.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_sample_is_interleaved_multi_session_conversations() -> None:
    records = _records()
    for r in records:
        InputRecord.model_validate(r)
    by_session: dict[str, list[int]] = {}
    for r in records:
        by_session.setdefault(r["session_id"], []).append(r["turn"])
    assert len(by_session) == 8
    assert all(turns == list(range(1, len(turns) + 1)) and 3 <= len(turns) <= 4 for turns in by_session.values())
    # Interleaved: no session's turns sit next to each other in the stream.
    assert all(a["session_id"] != b["session_id"] for a, b in zip(records, records[1:]))
    assert all(r["generate"] for r in records)
    last = {r["session_id"]: r for r in records}
    assert all(r["end"] == (last[r["session_id"]] is r) for r in records)


def test_demo_spec_validates_with_its_bundled_data() -> None:
    folder = Path(str(resources.files("streamctx.data")))
    assert validate(folder / DEMO_SPEC) == []


def test_demo_runs_a_bounded_policy_and_full_is_a_one_line_change() -> None:
    text = resources.files("streamctx.data").joinpath(DEMO_SPEC).read_text()
    policy_lines = [line for line in text.splitlines() if line.startswith("policy:")]
    assert policy_lines == ["policy: {type: sink_window, sinks: 4, window: 1020}"]
    assert "{type: full}" in text
    assert build_demo_spec(out=Path("out")).policy == {"type": "sink_window", "sinks": 4, "window": 1020}


def test_build_demo_spec_overrides(tmp_path: Path) -> None:
    spec = build_demo_spec(out=tmp_path / "o")
    assert spec.runner.type == "ray" and spec.model.name == "smollm2" and spec.model.max_new_tokens == 24
    assert spec.resolve_output(spec.sink.path) == (tmp_path / "o").resolve()
    assert spec.resolve_input(spec.source.path).is_file()

    model = tmp_path / "tiny"
    model.mkdir()
    spec = build_demo_spec(out=tmp_path / "o", runner="local", model=str(model), max_new_tokens=5)
    assert spec.runner.type == "local" and spec.model.path == str(model.resolve()) and spec.model.name is None
    assert spec.model.max_new_tokens == 5
    with pytest.raises(CLIError, match="--model: not found"):
        build_demo_spec(out=tmp_path / "o", model=str(tmp_path / "nope"))
