"""Hostile records: every record either passes unchanged or becomes a dead-letter row with a reason
naming the field; the job never crashes and never changes a record silently.

The oracle (`_expect_valid`) is written from the record contract (`InputRecord`, Arrow int64
columns, UTF-8 strings, reserved names), independently of `records.py`.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamctx.dataflow import run_job
from streamctx.dataflow.records import MAX_DEPTH, dead_table, public_view, validate_records
from streamctx.io.sources import RawRecord
from streamctx.spec import ROLES, JobSpec

I64 = 2**63 - 1
CORE = ("session_id", "turn", "role", "text", "generate", "max_new_tokens", "end")
SURROGATES = st.sampled_from(["\ud800", "a\udc80b", "\udfff"])


def _utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _value_ok(v: Any, depth: int = 0) -> bool:
    if isinstance(v, bool) or v is None or isinstance(v, (float, bytes)):
        return True
    if isinstance(v, int):
        return -I64 - 1 <= v <= I64
    if isinstance(v, str):
        return _utf8(v)
    if isinstance(v, (list, dict)) and depth >= MAX_DEPTH:
        return False
    if isinstance(v, list):
        return all(_value_ok(x, depth + 1) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _utf8(k) and _value_ok(x, depth + 1) for k, x in v.items())
    return True


def _expect_valid(r: Any) -> bool:
    if not isinstance(r, dict) or not all(isinstance(k, str) and _utf8(k) for k in r):
        return False
    sid, turn, mnt = r.get("session_id"), r.get("turn"), r.get("max_new_tokens")
    return (
        type(sid) is str and sid != "" and _utf8(sid)
        and type(turn) is int and 0 <= turn <= I64
        and type(r.get("role")) is str and r["role"] in ROLES
        and type(r.get("text")) is str and _utf8(r["text"])
        and type(r.get("generate", False)) is bool and type(r.get("end", False)) is bool
        and (mnt is None or (type(mnt) is int and 1 <= mnt <= I64))
        and all(k in CORE or (k != "offset" and not k.startswith("_") and _value_ok(v)) for k, v in r.items())
    )


# --- strategies ------------------------------------------------------------------------------------

JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
              st.text(max_size=6), SURROGATES),
    lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=4), kids, max_size=3)),
    max_leaves=8,
)
HOSTILE_VALUE = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=True), st.just(float("nan")), st.just(float("inf")),
    st.integers(-(2**70), 2**70), st.sampled_from([-1, 0, 2**63 - 1, 2**63, 2**64, -(2**63)]),
    st.text(max_size=8), SURROGATES, st.binary(max_size=4), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2), st.sampled_from(["3", "user", "", "true"]),
)
EXTRA_NAME = st.one_of(st.text(min_size=1, max_size=6), st.sampled_from(["_seq", "_fresh", "_offset", "offset", "_x"]),
                       SURROGATES, st.integers(0, 3))


@st.composite
def records(draw: st.DrawFn) -> Any:
    """A valid record, then zero or more hostile edits (or a record that is not a mapping)."""
    if draw(st.integers(0, 15)) == 0:
        return draw(st.one_of(st.none(), st.integers(), st.text(max_size=4), st.lists(st.integers(), max_size=2)))
    r: dict[Any, Any] = {
        "session_id": draw(st.text(min_size=1, max_size=6)),
        "turn": draw(st.integers(0, 2**63 - 1)),
        "role": draw(st.sampled_from(ROLES)),
        "text": draw(st.text(max_size=40)),
    }
    for k, strat in (("generate", st.booleans()), ("end", st.booleans()),
                     ("max_new_tokens", st.one_of(st.none(), st.integers(1, 2**63 - 1)))):
        if draw(st.booleans()):
            r[k] = draw(strat)
    if draw(st.booleans()):
        r[draw(st.text(min_size=1, max_size=5).filter(lambda k: k not in CORE and k != "offset"
                                                      and not k.startswith("_")))] = draw(JSONISH)
    for _ in range(draw(st.integers(0, 2))):
        action = draw(st.sampled_from(["set", "drop", "extra"]))
        if action == "set":
            r[draw(st.sampled_from(CORE))] = draw(HOSTILE_VALUE)
        elif action == "drop":
            r.pop(draw(st.sampled_from(CORE)), None)
        else:
            r[draw(EXTRA_NAME)] = draw(st.one_of(HOSTILE_VALUE, JSONISH))
    return r


def _raws(recs: list[Any]) -> list[RawRecord]:
    return [RawRecord(i, i + 1, value=r) if isinstance(r, dict)
            else RawRecord(i, i + 1, error=f"record must be a mapping, got {type(r).__name__}", raw=repr(r))
            for i, r in enumerate(recs)]


def _same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN and tuples as lists."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _check_row(row: dict[str, Any], rec: dict[str, Any], as_json: set[str]) -> None:
    """`row` carries `rec` unchanged; columns in `as_json` hold every value as JSON text."""
    defaults = {"generate": False, "max_new_tokens": None, "end": False}
    for k in CORE:
        assert _same(row[k], rec.get(k, defaults.get(k))), k
    for k, v in rec.items():
        if k in CORE:
            continue
        if k in as_json and v is not None:
            assert row[k] == json.dumps(v, ensure_ascii=False, default=repr), k
        else:
            assert _same(row[k], v), k


# --- validation ------------------------------------------------------------------------------------


@given(recs=st.lists(records(), min_size=1, max_size=12), first_seq=st.integers(0, 1000))
def test_every_record_passes_unchanged_or_is_dead_lettered_with_its_field(recs: list[Any], first_seq: int) -> None:
    batch, dead, seq = validate_records(_raws(recs), first_seq)
    good = [i for i, r in enumerate(recs) if _expect_valid(r)]
    rows = batch.to_pylist() if batch is not None else []
    assert [r["_offset"] for r in rows] == good
    assert [r["_seq"] for r in rows] == list(range(first_seq, first_seq + len(good))) and seq == first_seq + len(good)
    assert sorted(d["offset"] for d in dead) == sorted(set(range(len(recs))) - set(good))
    # A column whose values Arrow cannot hold as one type travels as JSON text (a string column
    # holding a value that is not a string).
    as_json = {k for k in (batch.schema.names if batch is not None else []) if k not in CORE
               and batch.schema.field(k).type == pa.string()
               and any(k in recs[r["_offset"]] and not isinstance(recs[r["_offset"]][k], (str, type(None)))
                       for r in rows)}
    for row in rows:
        _check_row(row, recs[row["_offset"]], as_json)
    for d in dead:
        rec, reason = recs[d["offset"]], d["reason"]
        assert reason and d["stage"] == "source"
        if isinstance(rec, dict) and all(isinstance(k, str) for k in rec):
            bad_core = [k for k in CORE if k in rec and k not in ("session_id", "text")] + ["session_id", "turn", "role", "text"]
            named = [k for k in list(rec) + bad_core if f"{k}:" in reason or f"{k!r}" in reason or k in reason]
            assert named, reason  # the reason names a field
    # Everything produced is Arrow-encodable end to end: the sink can write it.
    pq.write_table(dead_table(dead), io.BytesIO())
    if batch is not None:
        pq.write_table(pa.Table.from_batches([public_view(batch)]), io.BytesIO())


def test_known_hostile_records_and_their_reasons() -> None:
    base = {"session_id": "s", "turn": 1, "role": "user", "text": "hi"}
    cases = {
        "turn: Input should be less than or equal to 9223372036854775807": {**base, "turn": 2**64},
        "turn: Input should be greater than or equal to 0": {**base, "turn": -1},
        "turn: Input should be a valid integer": {**base, "turn": float("nan")},
        "text: not valid Unicode": {**base, "text": "bad \ud800"},
        "session_id: not valid Unicode": {**base, "session_id": "\udc80"},
        "text: Field required": {k: v for k, v in base.items() if k != "text"},
        "role: Input should be 'user'": {**base, "role": "root"},
        "_fresh: field name is reserved": {**base, "_fresh": True},
        "offset: field name is reserved": {**base, "offset": 3},
        "field name 7 is not a valid string": {**base, 7: "x"},
        "n: an integer outside the 64-bit range": {**base, "n": [1, 2**64]},
        "big: an integer outside the 64-bit range": {**base, "big": 10**5000},
        f"deep: nested deeper than {MAX_DEPTH} levels": {**base, "deep": json.loads("[" * 100 + "]" * 100)},
        "max_new_tokens: Input should be greater than or equal to 1": {**base, "max_new_tokens": 0},
        "generate: Input should be a valid boolean": {**base, "generate": "yes"},
    }
    batch, dead, _ = validate_records(_raws(list(cases.values())), 0)
    assert batch is None
    for d, expected in zip(sorted(dead, key=lambda d: d["offset"]), cases):
        assert expected in d["reason"], (expected, d["reason"])
    pq.write_table(dead_table(dead), io.BytesIO())


def test_huge_text_and_odd_extras_pass_intact() -> None:
    big = "ü" * 1_000_000 + "end"
    recs = [
        {"session_id": "s", "turn": 0, "role": "document", "text": big, "score": float("nan")},
        {"session_id": "s", "turn": 2**63 - 1, "role": "user", "text": "", "score": 1.5, "tags": ["a", 1]},
        {"session_id": "t" * 10_000, "turn": 0, "role": "system", "text": "\x00\n", "tags": {"k": None}},
    ]
    batch, dead, _ = validate_records(_raws(recs), 0)
    assert dead == []
    rows = batch.to_pylist()
    assert rows[0]["text"] == big and math.isnan(rows[0]["score"]) and rows[1]["turn"] == 2**63 - 1
    assert rows[2]["session_id"] == "t" * 10_000 and rows[2]["text"] == "\x00\n"
    assert [json.loads(r["tags"]) if r["tags"] else None for r in rows] == [None, ["a", 1], {"k": None}]


# --- a real local job --------------------------------------------------------------------------------


def _job(source: dict[str, Any], base_dir: Path | None = None):
    spec = JobSpec.from_dict({"name": "fuzz", "source": source, "model": None,
                              "runner": {"type": "local", "batch_size": 8, "key_groups": 8}}, base_dir=base_dir)
    return run_job(spec, runner="local")


@settings(max_examples=10)
@given(recs=st.lists(records(), min_size=1, max_size=30))
def test_local_job_survives_hostile_records(recs: list[Any]) -> None:
    # Give every record its own session and turn 0 so only validation decides its fate.
    stream = []
    for i, r in enumerate(recs):
        if isinstance(r, dict) and _expect_valid(r):
            r = {**r, "session_id": f"s{i}", "turn": 0, "end": False}
        stream.append(r)
    res = _job({"type": "iterator", "obj": stream})
    good = [i for i, r in enumerate(stream) if _expect_valid(r)]
    assert res.records_in == len(stream)
    assert res.records_out == len(good) and res.dead_letters == len(stream) - len(good)
    out = res.outputs.to_pylist() if res.outputs is not None else []
    assert sorted(r["offset"] for r in out) == good
    for row in out:
        assert row["text"] == stream[row["offset"]]["text"]
    dead = res.dead_letter.to_pylist() if res.dead_letter is not None else []
    assert sorted(d["offset"] for d in dead) == sorted(set(range(len(stream))) - set(good))
    assert all(d["reason"] for d in dead)


def test_local_job_over_a_hostile_jsonl_file(tmp_path: Path) -> None:
    lines = [
        b'{"session_id":"a","turn":0,"role":"user","text":"ok"}',
        b'{"session_id":"a","turn":1,"role":"user","text":"\xff\xfe bytes"}',  # invalid UTF-8
        b'{"session_id":"a","turn":2,"role":"user","text":"\\ud800"}',  # a lone surrogate escape
        b'{"session_id":"a","turn":3,"role":"user","text":"ok","turn":"dup key"}',
        b'[1, 2]',
        b'{"session_id":"a","turn":4,"role":"user","text":' + json.dumps("x" * 300_000).encode() + b"}",
        b'{"session_id":"a","turn":5,"role":"user","text":"trailing',
        b'{"session_id":"a","turn":6,"role":"user","text":"ok","n":NaN}',
        b'{"session_id":"a","turn":7,"role":"user","text":"ok","n":1e999}',
        b'{"session_id":"a","turn":2,"role":"user","text":"replayed turn"}',
        b'{"session_id":"a","turn":8,"role":"user","text":"ok"}',
    ]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    res = _job({"type": "jsonl", "path": "in.jsonl"}, base_dir=tmp_path)
    out = res.outputs.to_pylist()
    assert [r["turn"] for r in out] == [0, 4, 6, 7, 8]
    assert out[1]["text"] == "x" * 300_000 and math.isnan(out[2]["n"]) and out[3]["n"] == math.inf
    reasons = {d["turn"] if d["turn"] is not None else -1: d["reason"] for d in res.dead_letter.to_pylist()}
    text = "\n".join(res.dead_letter.column("reason").to_pylist())
    assert "invalid UTF-8" in text and "text: not valid Unicode" in text and "turn: Input should be a valid integer" in text
    assert "must be a JSON object" in text and "bad JSON" in text and "duplicate turn 2" in reasons[2]
    assert res.dead_letters == 6


def test_deeply_nested_jsonl_line_is_dead_lettered(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_bytes(b"[" * 100_000 + b"\n" + b'{"session_id":"a","turn":0,"role":"user","text":"ok"}\n')
    res = _job({"type": "jsonl", "path": "in.jsonl"}, base_dir=tmp_path)
    assert res.records_out == 1 and res.dead_letters == 1


def test_extra_field_changing_type_across_batches() -> None:
    recs = [{"session_id": "a", "turn": 0, "role": "user", "text": "x", "score": 1},
            {"session_id": "a", "turn": 1, "role": "user", "text": "x", "score": "high"}]
    spec = JobSpec.from_dict({"name": "t", "source": {"type": "iterator", "obj": recs}, "model": None,
                              "runner": {"type": "local", "batch_size": 1}})
    res = run_job(spec, runner="local")
    assert res.records_out == 2 and res.dead_letters == 0


def test_jsonl_line_with_a_huge_integer_is_dead_lettered(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_bytes(b'{"session_id":"a","turn":' + b"9" * 5000 + b',"role":"user","text":"x"}\n'
                                        + b'{"session_id":"a","turn":0,"role":"user","text":"ok"}\n')
    res = _job({"type": "jsonl", "path": "in.jsonl"}, base_dir=tmp_path)
    assert res.records_out == 1 and res.dead_letters == 1
