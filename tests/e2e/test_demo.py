"""`streamctx demo` end to end on a tiny random model: the bundled conversations go through the
model in-process, the summary is printed and every turn lands in the parquet output."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.fixtures.tiny_models import make_tiny_llama

pytestmark = pytest.mark.timeout(300)


def test_demo_on_a_tiny_model(tmp_path: Path) -> None:
    model = make_tiny_llama(tmp_path / "tiny")
    out = tmp_path / "demo-out"
    proc = subprocess.run(
        [sys.executable, "-m", "streamctx", "demo", "--model", str(model), "--runner", "local",
         "--out", str(out), "--max-new-tokens", "3"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]

    text = resources.files("streamctx.data").joinpath("demo_conversations.jsonl").read_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    rows = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("part-*.parquet"))])
    assert sorted(zip(rows["session_id"].to_pylist(), rows["turn"].to_pylist())) == sorted(
        (r["session_id"], r["turn"]) for r in records
    )
    assert not (out / "dead_letter").exists() or not list((out / "dead_letter").glob("part-*"))

    summary = proc.stdout
    assert "streamctx job summary" in summary and "demo on the local runner" in summary
    assert "sessions" in summary and "8 (ended: 8 end)" in summary
    assert f"{len(records)} out of {len(records)} records in" in summary
    assert str(out) in summary
    assert "tokens generated" in summary and "sample replies" in summary
    assert "I'm visiting Kyoto for three days in April." in summary  # prompts read back for the sample
