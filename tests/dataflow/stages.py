"""User stages for the dataflow tests (an importable module, shipped to Ray workers by value)."""

from __future__ import annotations

import time

import pyarrow as pa


class History:
    """Per-session state whose output depends on order: each row gets every text of its session
    so far, joined by '|'. Reordering or mixing sessions changes the output."""

    def __init__(self) -> None:
        self.hist: dict[str, list[str]] = {}
        self.ended: list[str] = []

    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        out = []
        for sid, text in zip(batch.column("session_id").to_pylist(), batch.column("text").to_pylist()):
            h = self.hist.setdefault(sid, [])
            h.append(text)
            out.append("|".join(h))
        return batch.append_column("history", pa.array(out, type=pa.string()))

    def end_session(self, session_id: str) -> None:
        self.hist.pop(session_id, None)
        self.ended.append(session_id)

    def session_bytes(self) -> dict[str, int]:
        return {sid: sum(len(t.encode()) for t in h) for sid, h in self.hist.items()}


class Upper:
    """Stateless: upper-cases `history` (a post-processing stage)."""

    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        import pyarrow.compute as pc

        i = batch.schema.get_field_index("history")
        return batch.set_column(i, "history", pc.utf8_upper(batch.column(i)))


class FailOn:
    """Raises on any batch holding a row whose text equals `bad` (its batch is dead-lettered)."""

    def __init__(self, bad: str) -> None:
        self.bad = bad

    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        if self.bad in batch.column("text").to_pylist():
            raise RuntimeError(f"cannot process {self.bad!r}")
        return batch


class Slow:
    """Sleeps per batch (a slow stage for backpressure tests)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        time.sleep(self.seconds)
        return batch


class PassThrough:
    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        return batch
