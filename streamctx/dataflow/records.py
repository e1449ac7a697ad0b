"""Validating source records into Arrow batches, and the dead-letter row format.

The core columns every batch carries between stages (schema `CORE_SCHEMA`), plus any extra fields
of the input records. Internal columns start with `_`: `_offset` (source replay position),
`_seq` (stream ordinal: the logical clock of idle TTLs), `_fresh` (first record of a new session
incarnation; set by the segment stage).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import pyarrow as pa
from pydantic import ValidationError

from streamctx.io.sources import RawRecord
from streamctx.spec import InputRecord

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


def dead_row(offset: Optional[int], reason: str, *, stage: str, session_id: Optional[str] = None,
             turn: Optional[int] = None, raw: Optional[str] = None) -> dict[str, Any]:
    return {"offset": offset, "session_id": session_id, "turn": turn, "stage": stage,
            "reason": reason, "raw": raw}


def dead_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=DEAD_LETTER_SCHEMA)


def _reason(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "record"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


_DEFAULTS = {"generate": False, "max_new_tokens": None, "end": False}
_ROLES = frozenset(("user", "assistant", "system", "document"))


def _fast_valid(v: dict[str, Any]) -> bool:
    """True when `v` certainly passes `InputRecord` (strict types); pydantic explains the rest.

    The common case skips pydantic (a third of the driver's time per record otherwise).
    """
    sid, turn, gen, mnt, end = v.get("session_id"), v.get("turn"), v.get("generate", False), \
        v.get("max_new_tokens"), v.get("end", False)
    return (type(sid) is str and sid != "" and type(turn) is int and turn >= 0
            and v.get("role") in _ROLES and type(v.get("text")) is str and type(gen) is bool
            and type(end) is bool and (mnt is None or (type(mnt) is int and mnt >= 1)))


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
            try:
                row = InputRecord.model_validate(v).model_dump()
            except ValidationError as exc:
                v = v or {}
                sid = v.get("session_id") if isinstance(v.get("session_id"), str) else None
                turn = v.get("turn") if type(v.get("turn")) is int else None
                dead.append(dead_row(r.offset, _reason(exc), stage="source", session_id=sid, turn=turn,
                                     raw=_dump(v)))
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
        try:
            arr = pa.array([row.get(k) for row in rows])
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types across records: keep them as JSON text
            arr = pa.array([None if row.get(k) is None else _dump(row.get(k)) for row in rows], type=pa.string())
        arrays.append(arr)
        fields.append(pa.field(k, arr.type))
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))


def _dump(v: Any) -> str:
    import json

    try:
        return json.dumps(v, ensure_ascii=False, default=repr)[:10_000]
    except Exception:
        return repr(v)[:10_000]


def public_view(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Drop internal columns and expose `_offset` as `offset` (what sinks write)."""
    names = batch.schema.names
    keep = [i for i, n in enumerate(names) if n not in INTERNAL_COLUMNS]
    out = batch.select(keep)
    return out.rename_columns(["offset" if n == "_offset" else n for n in out.schema.names])
