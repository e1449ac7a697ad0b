"""User stages for the dataflow tests (an importable module, shipped to Ray workers by value)."""

from __future__ import annotations

import json
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

    def snapshot(self) -> dict[str, bytes]:
        return {sid: json.dumps(h).encode() for sid, h in self.hist.items()}

    def restore(self, blobs: dict[str, bytes]) -> None:
        self.hist = {sid: json.loads(b) for sid, b in blobs.items()}


class Counter:
    """Keyed state without snapshot hooks: a checkpointed job must refuse it."""

    def __init__(self) -> None:
        self.n: dict[str, int] = {}

    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        for sid in batch.column("session_id").to_pylist():
            self.n[sid] = self.n.get(sid, 0) + 1
        return batch

    def end_session(self, session_id: str) -> None:
        self.n.pop(session_id, None)


class SlowSnapshot:
    """Stateless rows, but a snapshot that takes `seconds`: widens the window between two stages'
    snapshots of one barrier (where a fault-injection test kills it)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.seen: dict[str, int] = {}

    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        for sid in batch.column("session_id").to_pylist():
            self.seen[sid] = self.seen.get(sid, 0) + 1
        return batch

    def end_session(self, session_id: str) -> None:
        self.seen.pop(session_id, None)

    def snapshot(self) -> dict[str, bytes]:
        time.sleep(self.seconds)
        return {"seen": json.dumps(self.seen).encode()}

    def restore(self, blobs: dict[str, bytes]) -> None:
        self.seen = json.loads(blobs.get("seen", b"{}"))


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


class LoseStateOnce(History):
    """`History` whose state is "lost" once: the first batch holding a row with text `text` raises
    `StateLostError`, as a model stage does when its peer-spilled state died with a node. The flag
    lives outside the snapshot, so after the restore the replay goes through."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.fired = False

    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        from streamctx.storage import StateLostError

        if not self.fired and self.text in batch.column("text").to_pylist():
            self.fired = True
            raise StateLostError(f"the state of the session sending {self.text!r} was on a lost peer store")
        return super().process(batch)
