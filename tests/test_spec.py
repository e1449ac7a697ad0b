"""Job specs: YAML/JSON files, path rules, and every error reported with its field path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamctx.spec import FieldError, InputRecord, JobSpec, SpecError, validate

YAML = """\
name: support-chats
source: {type: jsonl, path: convs.jsonl, follow: false}
model: {name: smollm2, path: null, dtype: null, device: auto, stages: 1}
policy: {type: sink_window, sinks: 4, window: 1020}
scheduler: {windows: {adaptive: false}, memory: {device_budget: null}}
runner: {type: ray, address: null, replicas: 1}
sink: {type: parquet, path: out/}
"""


def test_the_documented_yaml_loads_and_resolves_paths_against_its_folder(tmp_path: Path) -> None:
    (tmp_path / "convs.jsonl").write_text("")
    (tmp_path / "job.yaml").write_text(YAML)
    spec = JobSpec.from_file(tmp_path / "job.yaml")
    assert spec.policy == {"type": "sink_window", "sinks": 4, "window": 1020}
    assert spec.runner.type == "ray" and spec.runner.key_groups == 128
    assert spec.resolve_input(spec.source.path) == (tmp_path / "convs.jsonl").resolve()
    assert spec.resolve_output(spec.sink.path) == (tmp_path / "out").resolve()
    assert validate(tmp_path / "job.yaml") == []
    # JSON reads the same.
    import yaml

    (tmp_path / "job.json").write_text(json.dumps(yaml.safe_load(YAML)))
    assert JobSpec.from_file(tmp_path / "job.json").model_dump() == spec.model_dump()


def test_validate_reports_every_error_with_its_field_path(tmp_path: Path) -> None:
    bad = {
        "name": "x",
        "source": {"type": "jsonl", "path": "convs.jsonl", "folow": True},
        "runner": {"replicas": 0, "type": "spark"},
        "policy": {"sinks": 4},
        "sink": {"type": "parquet", "path": "../escape"},
        "stages": [{"name": "a", "cls": "no_colon"}],
    }
    (tmp_path / "job.json").write_text(json.dumps(bad))
    errors = {e.field: e.message for e in validate(tmp_path / "job.json")}
    assert errors["source.folow"] == "unknown field"
    assert "greater than or equal to 1" in errors["runner.replicas"] and "(got 0)" in errors["runner.replicas"]
    assert "'spark'" in errors["runner.type"]
    assert "exactly one of `type` or `preset`" in errors["policy"]
    assert "expected 'package.module:Class'" in errors["stages.0.cls"]
    # File-system checks still run when the schema fails.
    assert errors["source.path"] == "file not found: convs.jsonl"
    assert "escapes its root" in errors["sink.path"]
    with pytest.raises(SpecError) as exc:
        JobSpec.from_file(tmp_path / "job.json")
    assert {e.field for e in exc.value.errors} >= {"source.folow", "runner.replicas", "policy"}
    assert "source.folow: unknown field" in str(exc.value)


@pytest.mark.parametrize("path", ["../out", "a/../../out", "/tmp/out"])
def test_outputs_cannot_escape_their_root(tmp_path: Path, path: str) -> None:
    (tmp_path / "in.jsonl").write_text("")
    errors = validate({"name": "x", "source": {"type": "jsonl", "path": "in.jsonl"},
                       "sink": {"type": "jsonl", "path": path}}, base_dir=str(tmp_path))
    assert [e.field for e in errors] == ["sink.path"]


def test_semantic_checks_on_a_valid_schema(tmp_path: Path) -> None:
    errors = validate({"name": "x", "source": {"type": "parquet", "path": "missing.parquet"},
                       "model": {"path": "no_model_here"},
                       "stages": [{"name": "s", "cls": "tests.dataflow.stages:Nope"},
                                  {"name": "t", "cls": "no.such.module:Cls"}]}, base_dir=str(tmp_path))
    got = {e.field: e.message for e in errors}
    assert got["source.path"] == "file not found: missing.parquet"
    assert got["model.path"] == "not found: no_model_here"
    assert "has no attribute 'Nope'" in got["stages.0.cls"]
    assert "cannot import module 'no.such.module'" in got["stages.1.cls"]
    assert str(FieldError("source.path", "x")) == "source.path: x"


def test_sections_need_their_python_objects_and_names_are_checked() -> None:
    with pytest.raises(ValueError, match="needs `obj`"):
        JobSpec.from_dict({"name": "x", "source": {"type": "iterator"}})
    with pytest.raises(ValueError, match="needs `fn`"):
        JobSpec.from_dict({"name": "x", "source": {"type": "iterator", "obj": []}, "sink": {"type": "callback"}})
    with pytest.raises(ValueError, match="reserved"):
        JobSpec.from_dict({"name": "x", "source": {"type": "iterator", "obj": []},
                           "stages": [{"name": "model", "cls": "a:B"}]})
    with pytest.raises(ValueError, match="follow is only supported"):
        JobSpec.from_dict({"name": "x", "source": {"type": "parquet", "path": "a", "follow": True}})
    spec = JobSpec.from_dict({"name": "x", "source": {"type": "iterator", "obj": []}, "policy": {"preset": "balanced"}})
    assert spec.policy == {"preset": "balanced"}


def test_unparseable_or_missing_spec_files(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("name: [unclosed")
    assert validate(tmp_path / "bad.yaml")[0].message.startswith("cannot parse bad.yaml")
    assert validate(tmp_path / "nope.yaml")[0].message == "spec file not found: nope.yaml"
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert "must hold a mapping" in validate(tmp_path / "list.yaml")[0].message


def test_input_records_are_strict() -> None:
    ok = InputRecord.model_validate({"session_id": "a", "turn": 0, "role": "user", "text": "hi", "extra": 1})
    assert ok.generate is False and ok.end is False and ok.model_dump()["extra"] == 1
    for bad in ({"session_id": "a", "turn": "0", "role": "user", "text": "x"},
                {"session_id": "a", "turn": 0, "role": "bot", "text": "x"},
                {"session_id": "", "turn": 0, "role": "user", "text": "x"},
                {"session_id": "a", "turn": -1, "role": "user", "text": "x"},
                {"session_id": "a", "turn": 0, "role": "user", "text": "x", "generate": "yes"},
                {"session_id": "a", "turn": 0, "role": "user", "text": "x", "max_new_tokens": 0}):
        with pytest.raises(ValueError):
            InputRecord.model_validate(bad)
