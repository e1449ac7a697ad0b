"""Validating source records into Arrow batches, and the dead-letter row format.

The core columns every batch carries between stages (schema `CORE_SCHEMA`), plus any extra fields
of the input records. Internal columns start with `_`: `_offset` (source replay position),
`_seq` (stream ordinal: the logical clock of idle TTLs), `_fresh` (first record of a new session
incarnation; set by the segment stage).

Hostile input never stops the stream: a record that is not an `InputRecord`, holds a string that is
not valid Unicode (a lone surrogate from a `\\udXXX` JSON escape), an integer outside int64, a
non-string or reserved field name (`offset`, anything starting with `_`) or a value nested deeper
than `MAX_DEPTH` becomes a dead-letter row whose reason names the field; every other record passes
unchanged.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Optional

import pyarrow as pa
from pydantic import ValidationError

from streamctx.io.sources import RawRecord
from streamctx.spec import INT64_MAX, InputRecord

CORE_FIELDS = [
    pa.field("session_id", pa.string(), nullable=False),
    pa.field("turn", pa.int64(), nullable=False),
    pa.field("role", pa.string(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("generate", pa.bool_(), nullable=False),
    pa.field("max_new_tokens", pa.int64()),
    pa.field("end", pa.bool_(), nullable=False),
    pa.field("_offset", pa.int64(), nullable=False),
    pa.field("_seq", pa.int64(), nullable=False),
]
CORE_SCHEMA = pa.schema(CORE_FIELDS)
CORE_NAMES = [f.name for f in CORE_FIELDS]
INTERNAL_COLUMNS = ("_seq", "_fresh")

DEAD_LETTER_SCHEMA = pa.schema([
    pa.field("offset", pa.int64()),
    pa.field("session_id", pa.string()),
    pa.field("turn", pa.int64()),
    pa.field("stage", pa.string()),
    pa.field("reason", pa.string()),
    pa.field("raw", pa.string()),
])


MAX_DEPTH = 64
INT64_MIN = -INT64_MAX - 1


def dead_row(offset: Optional[int], reason: str, *, stage: str, session_id: Optional[str] = None,
             turn: Optional[int] = None, raw: Optional[str] = None) -> dict[str, Any]:
    """One dead-letter row; strings that Arrow cannot encode (lone surrogates) are escaped."""
    return {"offset": offset, "session_id": _clean(session_id), "turn": turn, "stage": stage,
            "reason": _clean(reason), "raw": _clean(raw)}


def _utf8(s: str) -> bool:
    """Whether `s` encodes as UTF-8 (Python strings may hold lone surrogates; Arrow refuses them)."""
    if s.isascii():
        return True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _clean(s: Optional[str]) -> Optional[str]:
    return s if s is None or _utf8(s) else s.encode("utf-8", "backslashreplace").decode("utf-8")


def dead_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=DEAD_LETTER_SCHEMA)


def _reason(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "record"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


_DEFAULTS = {"generate": False, "max_new_tokens": None, "end": False}
_CORE = frozenset(InputRecord.model_fields)
_ROLES = frozenset(("user", "assistant", "system", "document"))


def _fast_valid(v: dict[str, Any]) -> bool:
    """True when `v` certainly passes `InputRecord` (strict types); pydantic explains the rest.

    The common case skips pydantic (a third of the driver's time per record otherwise).
    """
    sid, turn, role, gen, mnt, end = v.get("session_id"), v.get("turn"), v.get("role"), \
        v.get("generate", False), v.get("max_new_tokens"), v.get("end", False)
    return (type(sid) is str and sid != "" and type(turn) is int and 0 <= turn <= INT64_MAX
            and type(role) is str and role in _ROLES and type(v.get("text")) is str and type(gen) is bool
            and type(end) is bool and (mnt is None or (type(mnt) is int and 1 <= mnt <= INT64_MAX)))


def _value_problem(value: Any, depth: int = 0) -> Optional[str]:
    """Why an extra field's value cannot travel in an Arrow batch unchanged (None: it can)."""
    if value is None or isinstance(value, (bool, float, bytes)):
        return None
    if isinstance(value, int):
        return None if INT64_MIN <= value <= INT64_MAX else "an integer outside the 64-bit range"
    if isinstance(value, str):
        return None if _utf8(value) else "not valid Unicode (it holds a lone surrogate)"
    if depth >= MAX_DEPTH and isinstance(value, (list, tuple, dict)):
        return f"nested deeper than {MAX_DEPTH} levels"
    if isinstance(value, (list, tuple)):
        for item in value:
            problem = _value_problem(item, depth + 1)
            if problem:
                return problem
    elif isinstance(value, dict):
        for k, item in value.items():
            if not isinstance(k, str) or not _utf8(k):
                return f"holds a key {k!r} that is not a valid string"
            problem = _value_problem(item, depth + 1)
            if problem:
                return problem
    return None


def _row_problem(row: dict[str, Any]) -> Optional[str]:
    """A reason naming the first field of a schema-valid row that Arrow cannot carry unchanged
    (None when all are fine)."""
    for k in ("session_id", "text"):
        if not _utf8(row[k]):
            return f"{k}: not valid Unicode (it holds a lone surrogate)"
    if len(row) == len(_CORE):
        return None
    for k, value in row.items():
        if k in _CORE:
            continue
        if type(k) is not str or not (k.isascii() or _utf8(k)):
            return f"field name {k!r} is not a valid string"
        if k[:1] == "_" or k == "offset":
            return f"{k}: field name is reserved (`offset` and names starting with `_` belong to the engine)"
        t = type(value)
        if (t is str and value.isascii()) or t is float or t is bool or value is None:
            continue  # the common scalars, without a call
        problem = _value_problem(value)
        if problem:
            return f"{k}: {problem}"
    return None


def validate_records(raws: Iterable[RawRecord], first_seq: int) -> tuple[Optional[pa.RecordBatch], list[dict[str, Any]], int]:
    """Validate raw records into one batch (core columns then extras) and dead-letter rows.

    Returns (batch or None when nothing validated, dead rows, next seq).
    """
    rows: list[dict[str, Any]] = []
    dead: list[dict[str, Any]] = []
    seq = first_seq
    for r in raws:
        if r.error is not None:
            dead.append(dead_row(r.offset, r.error, stage="source", raw=r.raw))
            continue
        v = r.value
        if _fast_valid(v):
            row = {**_DEFAULTS, **v}
        else:
            bad_key = next((k for k in v if not isinstance(k, str) or not _utf8(k)), None) if v else None
            if bad_key is not None:
                dead.append(dead_row(r.offset, f"field name {bad_key!r} is not a valid string", stage="source",
                                     raw=_dump(v)))
                continue
            try:
                row = InputRecord.model_validate(v).model_dump()
            except ValidationError as exc:
                v = v or {}
                sid = v.get("session_id") if isinstance(v.get("session_id"), str) else None
                turn = v.get("turn")
                turn = turn if type(turn) is int and INT64_MIN <= turn <= INT64_MAX else None
                dead.append(dead_row(r.offset, _reason(exc), stage="source", session_id=sid, turn=turn,
                                     raw=_dump(v)))
                continue
        problem = _row_problem(row)
        if problem is not None:
            dead.append(dead_row(r.offset, problem, stage="source", session_id=row["session_id"],
                                 turn=row["turn"], raw=_dump(v)))
            continue
        row["_offset"], row["_seq"] = r.offset, seq
        seq += 1
        rows.append(row)
    if not rows:
        return None, dead, seq
    return rows_to_batch(rows), dead, seq


def rows_to_batch(rows: list[dict[str, Any]]) -> pa.RecordBatch:
    extras = [k for k in rows[0] if k not in CORE_NAMES]
    extra_keys = set(extras)
    for row in rows[1:]:
        for k in row:
            if k not in CORE_NAMES and k not in extra_keys:
                extras.append(k)
                extra_keys.add(k)
    arrays = [pa.array([row[f.name] for row in rows], type=f.type) for f in CORE_FIELDS]
    fields = list(CORE_FIELDS)
    for k in extras:
        arr = _extra_column([row.get(k) for row in rows])
        arrays.append(arr)
        fields.append(pa.field(k, arr.type))
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))


def _extra_column(values: list[Any]) -> pa.Array:
    """An extra field's values as Arrow, exactly as given; JSON text where Arrow's inference would
    change them (mixed types, ints promoted to doubles, struct keys filled in) or a sink could not
    write them (structs without fields)."""
    try:
        arr = pa.array(values)
        t = arr.type
        nested = pa.types.is_nested(t)
        if (nested and _writable(t) and _same(arr.to_pylist(), values)) or (
                not nested and len({type(v) for v in values if v is not None}) <= 1):
            return arr
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
        pass
    return pa.array([None if v is None else _dump(v, None) for v in values], type=pa.string())


def _writable(t: pa.DataType) -> bool:
    if pa.types.is_struct(t):
        return t.num_fields > 0 and all(_writable(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _writable(t.value_type)
    return True


def _same(a: Any, b: Any) -> bool:
    """`a == b` with the types of scalars compared too (1 is not 1.0) and NaN equal to NaN."""
    if type(a) is not type(b):
        return (isinstance(a, list) and isinstance(b, tuple)) and _same(a, list(b))
    if isinstance(a, float):
        return a == b or (a != a and b != b)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _dump(v: Any, limit: Optional[int] = 10_000) -> str:
    """JSON text of `v` (repr for what JSON cannot hold), cut at `limit` characters (None: whole)."""
    try:
        text = json.dumps(v, ensure_ascii=False, default=repr)
    except (TypeError, ValueError, RecursionError):
        try:
            text = repr(v)
        except (RecursionError, ValueError):  # too deep, or an int too long to print
            text = f"<{type(v).__name__} too large to show>"
    return text if limit is None else text[:limit]


def public_view(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Drop internal columns and expose `_offset` as `offset` (what sinks write)."""
    names = batch.schema.names
    keep = [i for i, n in enumerate(names) if n not in INTERNAL_COLUMNS]
    out = batch.select(keep)
    return out.rename_columns(["offset" if n == "_offset" else n for n in out.schema.names])
