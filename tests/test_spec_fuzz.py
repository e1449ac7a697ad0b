"""Hostile job specs: random YAML, wrong structures, absurd numbers and escaping paths give one
`SpecError` naming the field (and `validate` lists them); nothing else ever escapes, nothing is
silently coerced."""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from streamctx.spec import JobSpec, SpecError, validate

VALID: dict[str, Any] = {
    "name": "fuzz",
    "source": {"type": "jsonl", "path": "in.jsonl", "follow": False, "follow_idle_s": 2.0, "start_offset": 0},
    "model": {"name": "smollm2", "stages": 1, "replicas": 1, "max_new_tokens": 8, "num_cpus": 1.0,
              "resources": {"gpu_worker": 1.0}},
    "policy": {"type": "sink_window", "sink": 4, "window": 60},
    "runner": {"type": "local", "replicas": 1, "key_groups": 16, "batch_size": 8, "max_in_flight": 64,
               "start_timeout_s": 30.0},
    "sink": {"type": "jsonl", "path": "out", "rows_per_file": 100},
    "sessions": {"idle_ttl_records": 10, "idle_ttl_s": 5.0},
    "checkpoint": {"enabled": False, "interval_records": 100, "path": "ckpt"},
}


def _leaves(d: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        path = f"{prefix}{k}"
        out += _leaves(v, path + ".") if isinstance(v, dict) and k != "policy" else [path]
    return out


LEAVES = _leaves(VALID)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("spec")
    (d / "in.jsonl").write_text("")
    return d


def _write(folder: Path, data: Any, name: str = "job.yaml") -> Path:
    path = folder / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, allow_unicode=True))
    return path


def _load(path: Path) -> JobSpec | SpecError:
    """`from_file`'s answer; any exception other than `SpecError` fails the test."""
    try:
        return JobSpec.from_file(path)
    except SpecError as exc:
        assert exc.errors and all(e.message for e in exc.errors)
        assert str(exc).startswith("invalid job spec:")
        return exc


def test_the_valid_spec_loads(folder: Path) -> None:
    spec = _load(_write(folder, VALID))
    assert isinstance(spec, JobSpec) and validate(folder / "job.yaml") == []


# --- random documents -------------------------------------------------------------------------------

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                    st.text(max_size=8))
DOCS = st.recursive(SCALARS, lambda kids: st.one_of(
    st.lists(kids, max_size=3),
    st.dictionaries(st.one_of(st.sampled_from([*VALID, "type", "path", "replicas"]), st.text(max_size=5)),
                    kids, max_size=4)), max_leaves=12)


@given(doc=DOCS)
def test_random_structures_give_spec_errors(folder: Path, doc: Any) -> None:
    path = _write(folder, doc)
    errors = validate(path)
    got = _load(path)
    if isinstance(got, JobSpec):
        assert errors == []
        return
    assert errors, "validate() and from_file() disagree"
    try:
        doc = yaml.safe_load(path.read_text())  # what the loader saw (YAML may normalise keys)
    except yaml.YAMLError:
        doc = None
    if not isinstance(doc, dict):
        assert [e.field for e in got.errors] == [""]
        assert "must hold a mapping" in str(got) or "cannot parse" in str(got)
        return
    named = {k if isinstance(k, str) and k and "." not in k and k.isprintable() and k == k.strip() else repr(k)
             for k in doc} | {str(k) for k in doc if not isinstance(k, str)} | {"name", "source"}
    for e in got.errors:  # each error names the field of the document it is about
        assert any(e.field == n or e.field.startswith(n + ".") for n in named), (e, doc)


@given(text=st.text(max_size=60))
def test_random_text_gives_spec_errors(folder: Path, text: str) -> None:
    path = _write(folder, text, "text.yaml")
    got = _load(path)
    assert isinstance(validate(path), list)
    assert isinstance(got, SpecError)  # no random text is a whole job spec


# --- one hostile value in a valid spec --------------------------------------------------------------

HOSTILE = st.one_of(
    st.none(), st.booleans(), st.just(float("nan")), st.just(float("inf")), st.just(-float("inf")),
    st.integers(-(2**70), 2**70), st.sampled_from([-1, 0, 10**9, 2**63, 2**64]), st.floats(allow_nan=False),
    st.text(max_size=6), st.sampled_from(["5", "1e3", "yes", "../../etc", "/abs", ""]),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d[p]
    d[leaf] = value


def _get_plain(d: dict[str, Any], dotted: str) -> Any:
    for p in dotted.split("."):
        d = d[p]
    return d


def _get(spec: JobSpec, dotted: str) -> Any:
    obj: Any = spec
    for p in dotted.split("."):
        obj = obj[p] if isinstance(obj, dict) else getattr(obj, p)
    return obj


@given(field=st.sampled_from(LEAVES), value=HOSTILE)
def test_a_hostile_value_is_named_or_kept_exactly(folder: Path, field: str, value: Any) -> None:
    data = copy.deepcopy(VALID)
    _set(data, field, value)
    path = _write(folder, data)
    value = _get_plain(yaml.safe_load(path.read_text()), field)  # what YAML gives back (it may normalise text)
    got = _load(path)
    if isinstance(got, SpecError):
        named = [e.field for e in got.errors]
        parent = field.rsplit(".", 1)[0]
        assert any(f == field or f.startswith(field + ".") or f == parent or (f == "" and field == "name")
                   for f in named), (field, value, named)
        return
    kept = _get(got, field)
    # Accepted: the value is what was written (ints may stand for floats), never coerced from another type.
    if isinstance(value, float) and math.isnan(value):
        pytest.fail(f"{field} accepted NaN")
    assert kept == value and (type(kept) is type(value) or (type(kept) is float and type(value) is int)), \
        (field, value, kept)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("runner.replicas", 10_000_000, "less than or equal to 1024"),
    ("runner.replicas", True, "valid integer"),
    ("runner.batch_size", "5", "valid integer"),
    ("runner.start_timeout_s", float("inf"), "finite number"),
    ("sessions.idle_ttl_s", float("nan"), "finite number"),
    ("model.resources", {"gpu": -1}, "greater than or equal to 0"),
    ("model.stages", 10**6, "less than or equal to 1024"),
    ("source.follow", "yes", "valid boolean"),
    ("source.start_offset", 2**64, "less than or equal to"),
    ("name", "../evil", "free of path separators"),
    ("name", "a\x00b", "printable"),
])
def test_absurd_values_name_their_field(folder: Path, field: str, value: Any, message: str) -> None:
    data = copy.deepcopy(VALID)
    _set(data, field, value)
    got = _load(_write(folder, data))
    assert isinstance(got, SpecError)
    assert any(e.field.startswith(field) and message in e.message for e in got.errors), got.errors


# --- paths cannot write outside their roots ---------------------------------------------------------


@pytest.mark.parametrize("section", ["sink", "checkpoint"])
@pytest.mark.parametrize("path", ["..", "../out", "a/../../out", "out/../../x", "link/out", "link"])
def test_output_paths_stay_inside_the_spec_folder(tmp_path: Path, section: str, path: str) -> None:
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "in.jsonl").write_text("")
    os.symlink(tmp_path, tmp_path / "job" / "link")  # a symlink inside that leads out
    data = copy.deepcopy(VALID)
    data[section]["path"] = path
    got = _load(_write(tmp_path / "job", data))
    assert isinstance(got, SpecError) and [e.field for e in got.errors] == [f"{section}.path"]
    assert "escapes its root" in str(got)
    assert [e.field for e in validate(tmp_path / "job" / "job.yaml")] == [f"{section}.path"]


def test_absolute_sink_path_is_refused_and_inside_paths_resolve(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text("")
    data = copy.deepcopy(VALID)
    data["sink"]["path"] = str(tmp_path / "out")
    got = _load(_write(tmp_path, data))
    assert isinstance(got, SpecError) and "got absolute" in str(got)
    (tmp_path / "inside").mkdir()
    os.symlink(tmp_path / "inside", tmp_path / "ok-link")  # a symlink that stays inside is fine
    for inside in ["out", "a/b/../c", "ok-link/out", "."]:
        data["sink"]["path"] = inside
        spec = _load(_write(tmp_path, data))
        assert isinstance(spec, JobSpec), inside
        assert spec.resolve_output(inside).is_relative_to(tmp_path.resolve())
    # A checkpoint URI or absolute folder is an explicit root of its own.
    data["checkpoint"]["path"] = "s3://bucket/prefix"
    assert isinstance(_load(_write(tmp_path, data)), JobSpec)


def test_from_dict_refuses_escaping_sinks_too(tmp_path: Path) -> None:
    data = copy.deepcopy(VALID)
    data["sink"]["path"] = "../x"
    with pytest.raises(SpecError, match="sink.path: output path '../x' escapes its root"):
        JobSpec.from_dict(data, base_dir=tmp_path)


@pytest.mark.parametrize("section", ["sink", "checkpoint"])
def test_escaping_paths_are_reported_beside_schema_errors(tmp_path: Path, section: str) -> None:
    (tmp_path / "in.jsonl").write_text("")
    data = copy.deepcopy(VALID)
    data["runner"]["replicas"] = 0
    data[section]["path"] = "../elsewhere"
    fields = [e.field for e in validate(_write(tmp_path, data))]
    assert fields == ["runner.replicas", f"{section}.path"]


def test_values_too_large_to_print_are_still_named(tmp_path: Path) -> None:
    data = copy.deepcopy(VALID)
    data["runner"]["replicas"] = 10**5000  # past Python's int-to-str digit limit
    data["name"] = "n" * 10_000
    (tmp_path / "in.jsonl").write_text("")
    errors = {e.field: e.message for e in validate(data, base_dir=str(tmp_path))}
    assert "about 5000 digits" in errors["runner.replicas"] and len(errors["name"]) < 400
    data["runner"]["replicas"] = 1
    text = yaml.safe_dump(data).replace("replicas: 1\n", "replicas: " + "9" * 5000 + "\n", 1)
    got = _load(_write(tmp_path, text))  # YAML itself refuses such an int: a file-level error
    assert isinstance(got, SpecError) and "cannot parse job.yaml" in str(got)
