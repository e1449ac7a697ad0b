"""Sources replay exactly from recorded offsets; sinks commit atomically and never overwrite."""

from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamctx.io.sinks import CallbackSink, FileSink, MemorySink
from streamctx.io.sources import ArrowTableSource, IteratorSource, JsonlSource, QueueSource

ROWS = [{"session_id": f"s{i % 3}", "turn": i, "role": "user", "text": f"t{i} ü"} for i in range(23)]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_bytes(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows))
    return path


@settings(max_examples=15)
@given(st.integers(0, len(ROWS)))
def test_jsonl_replay_from_any_recorded_offset(tmp_path_factory: pytest.TempPathFactory, k: int) -> None:
    path = _jsonl(tmp_path_factory.mktemp("j") / "in.jsonl", ROWS)
    recs = list(JsonlSource(path).records())
    assert [r.value for r in recs] == ROWS
    assert all(a.next_offset == b.offset for a, b in zip(recs, recs[1:]))
    start = recs[k].offset if k < len(recs) else recs[-1].next_offset
    again = list(JsonlSource(path, start_offset=start).records())
    assert [r.value for r in again] == ROWS[k:]
    assert [r.offset for r in again] == [r.offset for r in recs[k:]]


@pytest.mark.parametrize("fmt", ["parquet", "arrow-file", "arrow-stream"])
def test_arrow_sources_replay_rows(tmp_path: Path, fmt: str) -> None:
    table = pa.Table.from_pylist(ROWS)
    path = tmp_path / "in.data"
    if fmt == "parquet":
        pq.write_table(table, path, row_group_size=5)
    else:
        with pa.OSFile(str(path), "wb") as f:
            opener = ipc.new_file if fmt == "arrow-file" else ipc.new_stream
            with opener(f, table.schema) as w:
                for b in table.to_batches(max_chunksize=4):
                    w.write_batch(b)
    kind = "parquet" if fmt == "parquet" else "arrow"
    assert [r.value for r in ArrowTableSource(path, kind).records()] == ROWS
    for k in (0, 3, 4, 11, 23):
        recs = list(ArrowTableSource(path, kind, start_offset=k).records())
        assert [r.value for r in recs] == ROWS[k:] and [r.offset for r in recs] == list(range(k, 23))


def test_iterator_and_queue_sources() -> None:
    assert [r.value for r in IteratorSource(iter(ROWS), start_offset=20).records()] == ROWS[20:]
    batches = [pa.RecordBatch.from_pylist(ROWS[:10]), pa.RecordBatch.from_pylist(ROWS[10:])]
    assert [r.value for r in IteratorSource(batches).records()] == ROWS
    bad = list(IteratorSource([ROWS[0], "nope"]).records())
    assert bad[1].error == "record must be a mapping, got str"
    q: queue.Queue = queue.Queue()
    for r in ROWS[:5]:
        q.put(r)
    q.put(None)
    assert [r.value for r in QueueSource(q).records()] == ROWS[:5]


def test_jsonl_follow_reads_appended_lines_and_waits_for_partial_ones(tmp_path: Path) -> None:
    path = tmp_path / "live.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n")

    def writer() -> None:
        time.sleep(0.2)
        with open(path, "a") as f:
            line = json.dumps(ROWS[1])
            f.write(line[:10])  # a partial line must not be read yet
            f.flush()
            time.sleep(0.2)
            f.write(line[10:] + "\n" + json.dumps(ROWS[2]) + "\n")

    t = threading.Thread(target=writer)
    t.start()
    recs = list(JsonlSource(path, follow=True, idle_s=0.6, poll_s=0.02).records())
    t.join()
    assert [r.value for r in recs] == ROWS[:3]


def test_jsonl_bad_lines_become_errors_with_offsets(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"a": 1}\n{oops\n\xff\n\n[1]\n')
    recs = list(JsonlSource(path).records())
    assert recs[0].value == {"a": 1}
    assert recs[1].error.startswith("bad JSON") and recs[1].raw == "{oops" and recs[1].offset == 9
    assert recs[2].error.startswith("invalid UTF-8")
    assert "must be a JSON object" in recs[3].error
    assert len(recs) == 4  # the blank line is skipped


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_file_sink_commits_atomically_and_continues_numbering(tmp_path: Path, fmt: str) -> None:
    table = pa.Table.from_pylist(ROWS)
    sink = FileSink(tmp_path / "out", fmt, rows_per_file=10)
    for b in table.to_batches(max_chunksize=4):
        sink.write(b)
        # Only whole committed parts are visible; no temp files are left behind.
        assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]
    files = sink.close()
    # Commits happen once 10 rows are buffered: 12 rows (3 batches), then 11 (the rest).
    assert [Path(f).name for f in files] == [f"part-0000{i}.{fmt}" for i in range(2)]

    def read(paths: list[str]) -> list[dict]:
        if fmt == "parquet":
            return pq.read_table(paths).to_pylist()
        return [json.loads(line) for p in paths for line in Path(p).read_text().splitlines()]

    assert read(files) == ROWS
    # A second writer (a resumed job) appends new parts; committed ones are never overwritten.
    again = FileSink(tmp_path / "out", fmt, rows_per_file=100)
    again.write(table.slice(0, 2))
    assert [Path(f).name for f in again.close()] == [f"part-00002.{fmt}"]
    assert read(files) == ROWS


def test_memory_and_callback_sinks() -> None:
    m = MemorySink()
    assert m.table() is None
    m.write(pa.RecordBatch.from_pylist(ROWS[:3]))
    m.write(pa.RecordBatch.from_pylist([{"session_id": "x", "turn": 1, "role": "user", "text": "a", "reply": None}]))
    m.write(pa.RecordBatch.from_pylist([{"session_id": "x", "turn": 2, "role": "user", "text": "a", "reply": "r"}]))
    assert m.table().num_rows == 5 and m.table().column("reply").to_pylist() == [None] * 4 + ["r"]
    got: list[int] = []
    c = CallbackSink(lambda b: got.append(b.num_rows))
    c.write(pa.RecordBatch.from_pylist(ROWS[:2]))
    c.write(pa.RecordBatch.from_pylist(ROWS[:0], schema=pa.RecordBatch.from_pylist(ROWS[:1]).schema))
    assert got == [2]


def test_committed_offset_only_moves_when_file_parts_are_committed(tmp_path: Path) -> None:
    from streamctx.dataflow import run_job
    from streamctx.spec import JobSpec

    _jsonl(tmp_path / "in.jsonl", ROWS)
    progress = []
    spec = JobSpec.from_dict({"name": "c", "source": {"type": "jsonl", "path": "in.jsonl"}, "model": None,
                              "runner": {"type": "local", "batch_size": 4},
                              "sink": {"type": "jsonl", "path": "out", "rows_per_file": 10}}, base_dir=tmp_path)
    res = run_job(spec, on_progress=progress.append)
    offsets = [r.offset for r in JsonlSource(tmp_path / "in.jsonl").records()] + [(tmp_path / "in.jsonl").stat().st_size]
    # Commits after 12 and 23 rows (rows_per_file=10, batches of 4): the replay offset follows them.
    assert sorted({p.last_offset for p in progress}) == [0, offsets[12], offsets[23]]
    assert res.last_offset == offsets[23]


def test_deeply_nested_json_line_is_an_error_record_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_bytes(b"[" * 100_000 + b"\n" + b'{"a": 1}\n')
    recs = list(JsonlSource(tmp_path / "in.jsonl").records())
    assert recs[0].error == "bad JSON: nested too deeply" and len(recs[0].raw) <= 1000
    assert recs[1].value == {"a": 1}


def test_a_field_whose_type_changes_between_batches_becomes_text(tmp_path: Path) -> None:
    a = pa.table({"k": [1, 2], "score": [1, None]})
    b = pa.table({"k": [3], "score": ["high"]})
    c = pa.table({"k": [4], "score": [{"x": [1, 2]}]})
    mem = MemorySink()
    for t in (a, b, c):
        mem.write(t)
    assert mem.table().column("score").to_pylist() == ["1", None, "high", '{"x": [1, 2]}']
    sink = FileSink(tmp_path / "out", "parquet")
    for t in (a, b):
        sink.write(t)
    (part,) = sink.close()
    assert pq.read_table(part).column("score").to_pylist() == ["1", None, "high"]
