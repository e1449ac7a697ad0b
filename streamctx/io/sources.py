"""Replayable record sources: JSONL (optionally followed), Parquet, Arrow IPC, Python iterators, queues.

Every record carries an `offset`: the position to resume from (`start_offset`) so that the records
at and after it are read again and none before it. JSONL offsets are byte offsets of line starts
(a seek, not a re-read); Parquet/Arrow/iterator/queue offsets are row ordinals.
A line that is not valid UTF-8 or JSON becomes a `RawRecord` with `error` set; the job dead-letters it.
"""

from __future__ import annotations

import json
import queue as queue_mod
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Optional, Protocol

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq


class RawRecord(NamedTuple):
    """One source record before validation: `value` (a mapping) or `error` with the raw text.

    `next_offset` is where a replay resumes after this record.
    """

    offset: int
    next_offset: int
    value: Optional[dict[str, Any]] = None
    error: Optional[str] = None
    raw: Optional[str] = None


class Source(Protocol):
    def records(self) -> Iterator[RawRecord]:
        """Records in stream order, starting at the source's start offset."""
        ...


class JsonlSource:
    """Lines of a JSON Lines file. With `follow`, keeps reading appended lines until the file has
    been idle for `idle_s` (a partial last line waits for its newline)."""

    def __init__(self, path: Path, *, start_offset: int = 0, follow: bool = False,
                 idle_s: float = 2.0, poll_s: float = 0.05) -> None:
        self.path, self.start_offset, self.follow = path, start_offset, follow
        self.idle_s, self.poll_s = idle_s, poll_s

    def records(self) -> Iterator[RawRecord]:
        if self.follow:
            deadline = time.monotonic() + self.idle_s
            while not self.path.exists():
                if time.monotonic() > deadline:
                    return
                time.sleep(self.poll_s)
        with open(self.path, "rb") as f:
            f.seek(self.start_offset)
            pos = self.start_offset
            idle_since = time.monotonic()
            while True:
                line = f.readline()
                if line and (line.endswith(b"\n") or not self.follow):
                    off, pos = pos, pos + len(line)
                    idle_since = time.monotonic()
                    if line.strip():
                        yield _parse_line(off, pos, line)
                    continue
                if not self.follow:
                    return
                # Partial or no line: rewind to its start and wait for more bytes.
                f.seek(pos)
                if time.monotonic() - idle_since > self.idle_s:
                    return
                time.sleep(self.poll_s)


def _parse_line(offset: int, nxt: int, line: bytes) -> RawRecord:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return RawRecord(offset, nxt, error=f"invalid UTF-8: {exc.reason} at byte {exc.start}",
                         raw=line.decode("utf-8", errors="replace").rstrip("\n"))
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return RawRecord(offset, nxt, error=f"bad JSON: {exc.msg} at column {exc.colno}", raw=text.rstrip("\n"))
    except RecursionError:
        return RawRecord(offset, nxt, error="bad JSON: nested too deeply", raw=text.rstrip("\n")[:1000])
    except ValueError as exc:  # e.g. an integer past Python's int/str digit limit
        return RawRecord(offset, nxt, error=f"bad JSON: {exc}", raw=text.rstrip("\n")[:1000])
    if not isinstance(value, dict):
        return RawRecord(offset, nxt, error=f"record must be a JSON object, got {type(value).__name__}",
                         raw=text.rstrip("\n"))
    return RawRecord(offset, nxt, value=value)


class ArrowTableSource:
    """Rows of Parquet files or Arrow IPC files/streams, read batch by batch."""

    def __init__(self, path: Path, fmt: str, *, start_offset: int = 0) -> None:
        self.path, self.fmt, self.start_offset = path, fmt, start_offset

    def _batches(self) -> Iterator[pa.RecordBatch]:
        if self.fmt == "parquet":
            yield from pq.ParquetFile(self.path).iter_batches(batch_size=4096)
            return
        with open(self.path, "rb") as f:
            try:
                reader = ipc.open_file(f)
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i)
                return
            except pa.ArrowInvalid:
                f.seek(0)
            yield from ipc.open_stream(f)

    def records(self) -> Iterator[RawRecord]:
        row = 0
        for batch in self._batches():
            n = batch.num_rows
            if row + n <= self.start_offset:
                row += n
                continue
            skip = max(0, self.start_offset - row)
            for i, value in enumerate(batch.slice(skip).to_pylist()):
                yield RawRecord(row + skip + i, row + skip + i + 1, value=value)
            row += n


class IteratorSource:
    """A Python iterable of dicts (or Arrow record batches, expanded to rows); replay skips."""

    def __init__(self, items: Iterable[Any], *, start_offset: int = 0) -> None:
        self.items, self.start_offset = items, start_offset

    def records(self) -> Iterator[RawRecord]:
        i = 0
        for item in self.items:
            rows = item.to_pylist() if isinstance(item, (pa.RecordBatch, pa.Table)) else [item]
            for value in rows:
                if i >= self.start_offset:
                    if isinstance(value, dict):
                        yield RawRecord(i, i + 1, value=value)
                    else:
                        yield RawRecord(i, i + 1, error=f"record must be a mapping, got {type(value).__name__}",
                                        raw=repr(value)[:1000])
                i += 1


class QueueSource(IteratorSource):
    """Records put on a `queue.Queue` by a producer; `None` ends the stream."""

    def __init__(self, q: "queue_mod.Queue[Any]", *, start_offset: int = 0) -> None:
        super().__init__(iter(q.get, None), start_offset=start_offset)


def open_source(spec: Any, *, start_offset: int | None = None) -> Source:
    """The source of a `JobSpec` (resolving its path against the spec's folder)."""
    src = spec.source
    start = src.start_offset if start_offset is None else start_offset
    if src.type == "jsonl":
        return JsonlSource(spec.resolve_input(src.path), start_offset=start, follow=src.follow,
                           idle_s=src.follow_idle_s, poll_s=src.poll_interval_s)
    if src.type in ("parquet", "arrow"):
        return ArrowTableSource(spec.resolve_input(src.path), src.type, start_offset=start)
    if src.type == "iterator":
        return IteratorSource(src.obj, start_offset=start)
    if src.type == "queue":
        return QueueSource(src.obj, start_offset=start)
    raise ValueError(f"unknown source type {src.type!r}")
