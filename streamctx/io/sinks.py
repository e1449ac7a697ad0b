"""Sinks: Parquet/JSONL part files with atomic commits, an in-memory table, or a callback.

File sinks buffer rows and commit a part file (`part-00000.parquet`) by writing a temporary file,
flushing it to disk and renaming it into place, so a reader never sees a partial file and a crash
loses nothing that was committed. Dead letters go to `dead_letter/` under the same folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import pyarrow as pa
import pyarrow.parquet as pq


class Sink(Protocol):
    def write(self, batch: pa.RecordBatch | pa.Table) -> None: ...
    def flushed(self) -> bool:
        """True when everything written so far is committed (nothing is only buffered)."""
        ...
    def commit(self) -> None:
        """Commit what is buffered now (a checkpoint barrier)."""
        ...
    def position(self) -> dict[str, Any]:
        """The committed position, as a checkpoint manifest records it."""
        ...
    def close(self) -> list[str]:
        """Commit what is buffered; the committed file paths (empty for non-file sinks)."""
        ...


def _concat(parts: list[pa.Table]) -> pa.Table:
    if len(parts) == 1:
        return parts[0]
    try:
        return pa.concat_tables(parts, promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid):  # e.g. an extra field that was an int, then a string
        return pa.concat_tables(_text_for_conflicts(parts), promote_options="permissive")


def _text_for_conflicts(parts: list[pa.Table]) -> list[pa.Table]:
    """Columns whose types no promotion reconciles become text in every part (JSON for non-strings)."""
    types: dict[str, set[pa.DataType]] = {}
    for t in parts:
        for f in t.schema:
            types.setdefault(f.name, set()).add(f.type)
    conflicts = {name for name, ts in types.items() if len(ts - {pa.null()}) > 1}
    out = []
    for t in parts:
        for name in conflicts & set(t.column_names):
            i = t.schema.get_field_index(name)
            col = t.column(i)
            if not pa.types.is_string(col.type):
                col = pa.array([None if v is None else json.dumps(v, ensure_ascii=False, default=str)
                                for v in col.to_pylist()], pa.string())
            t = t.set_column(i, pa.field(name, pa.string()), col)
        out.append(t)
    return out


def _as_table(batch: pa.RecordBatch | pa.Table) -> pa.Table:
    return batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])


class FileSink:
    """Part files of `fmt` ("parquet" or "jsonl") in `folder`, one per `rows_per_file` rows."""

    def __init__(self, folder: Path, fmt: str, *, rows_per_file: int = 10_000) -> None:
        self.folder, self.fmt, self.rows_per_file = folder, fmt, rows_per_file
        self.folder.mkdir(parents=True, exist_ok=True)
        self._buf: list[pa.Table] = []
        self._rows = 0
        self._next = _next_part_index(folder, fmt)
        self.files: list[str] = []

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        if batch.num_rows == 0:
            return
        self._buf.append(_as_table(batch))
        self._rows += batch.num_rows
        if self._rows >= self.rows_per_file:
            self._commit()

    def flushed(self) -> bool:
        return not self._buf

    def commit(self) -> None:
        self._commit()

    def position(self) -> dict[str, Any]:
        return {"parts": self._next}

    def committed_after(self, position: Optional[dict[str, Any]]) -> Optional[pa.Table]:
        """Rows of the parts committed after `position` (None: every part), e.g. by a driver that
        died after its last checkpoint: a resumed job skips them when its replay produces them again."""
        first = int(position["parts"]) if position else 0
        parts = sorted(p for p in self.folder.glob(f"part-*.{self.fmt}")
                       if p.stem.split("-")[1].isdigit() and int(p.stem.split("-")[1]) >= first)
        if not parts:
            return None
        if self.fmt == "parquet":
            return _concat([pq.read_table(p) for p in parts])
        rows = [json.loads(line) for p in parts for line in p.read_text(encoding="utf-8").splitlines() if line]
        return pa.Table.from_pylist(rows) if rows else None

    def _commit(self) -> None:
        if not self._buf:
            return
        table = _concat(self._buf)
        self._buf, self._rows = [], 0
        final = self.folder / f"part-{self._next:05d}.{self.fmt}"
        tmp = final.with_name(f".{final.name}.tmp")
        if self.fmt == "parquet":
            pq.write_table(table, tmp)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for row in table.to_pylist():
                    f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        self._next += 1
        self.files.append(str(final))

    def close(self) -> list[str]:
        self._commit()
        return list(self.files)


def _next_part_index(folder: Path, fmt: str) -> int:
    """Continue numbering after existing parts (a resumed job never overwrites committed output)."""
    idx = [int(p.stem.split("-")[1]) for p in folder.glob(f"part-*.{fmt}") if p.stem.split("-")[1].isdigit()]
    return max(idx) + 1 if idx else 0


class MemorySink:
    """Collects everything; `table()` is the concatenation (None when nothing was written)."""

    def __init__(self) -> None:
        self.parts: list[pa.Table] = []

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        if batch.num_rows:
            self.parts.append(_as_table(batch))

    def flushed(self) -> bool:
        return True

    def commit(self) -> None:
        pass

    def position(self) -> dict[str, Any]:
        return {"rows": sum(t.num_rows for t in self.parts)}

    def table(self) -> Optional[pa.Table]:
        return _concat(self.parts) if self.parts else None

    def close(self) -> list[str]:
        return []


class CallbackSink:
    """Calls `fn(batch)` for every non-empty batch (in the driver process)."""

    def __init__(self, fn: Callable[[pa.RecordBatch | pa.Table], Any]) -> None:
        self.fn = fn

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        if batch.num_rows:
            self.fn(batch)

    def flushed(self) -> bool:
        return True

    def commit(self) -> None:
        pass

    def position(self) -> dict[str, Any]:
        return {}

    def close(self) -> list[str]:
        return []


def open_sink(spec: Any, *, dead_letter: bool = False) -> Sink:
    """The output sink of a `JobSpec`, or its dead-letter sink (same type, under `dead_letter/`)."""
    s = spec.sink
    if s.type in ("parquet", "jsonl"):
        folder = spec.resolve_output(s.path)
        return FileSink(folder / "dead_letter" if dead_letter else folder, s.type, rows_per_file=s.rows_per_file)
    if s.type == "memory":
        return MemorySink()
    if s.type == "callback":
        fn = s.dead_letter_fn if dead_letter else s.fn
        return CallbackSink(fn) if fn is not None else MemorySink()
    raise ValueError(f"unknown sink type {s.type!r}")
