"""A killed driver resumes: `streamctx run JOB.yaml` (a subprocess driver on the session's Ray) is
SIGKILLed after it committed output past its last checkpoint; `streamctx run JOB.yaml --resume`
finishes the job, and the parquet output equals a fault-free run row for row (no gap, no duplicate).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from streamctx.cli import main
from streamctx.dataflow import run_job
from streamctx.dataflow.checkpoint import CheckpointStore
from streamctx.spec import JobSpec
from tests.dataflow.faults import exactly_once
from tests.dataflow.streams import multi_session_stream
from tests.fixtures.tiny_models import make_tiny_llama

pytestmark = pytest.mark.timeout(300)


def _job(folder: Path, model: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in multi_session_stream()))
    spec: dict[str, Any] = {
        "name": "resume", "source": {"type": "jsonl", "path": "in.jsonl"},
        "model": {"path": str(model), "max_new_tokens": 3, "replicas": 2, "num_cpus": 0},
        "runner": {"type": "ray", "replicas": 2, "batch_size": 10, "key_groups": 32, "max_in_flight": 60},
        "sink": {"type": "parquet", "path": "out", "rows_per_file": 15},
        "checkpoint": {"enabled": True, "interval_records": 50, "path": "ckpt"},
    }
    (folder / "job.yaml").write_text(yaml.safe_dump(spec))
    return folder / "job.yaml"


def _parts(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.parquet"))


def test_killed_driver_resumes_with_exactly_once_output(ray_local, tmp_path: Path) -> None:
    model = make_tiny_llama(tmp_path / "tiny", hidden=32, layers=2, heads=2, kv_heads=1)
    ref = run_job(JobSpec.from_file(_job(tmp_path / "clean", model)))
    assert ref.records_out == 500
    expected = pa.concat_tables([pq.read_table(p) for p in _parts(tmp_path / "clean" / "out")])

    job = _job(tmp_path / "faulty", model)
    out, store = job.parent / "out", CheckpointStore(str(job.parent / "ckpt"))
    address = ray_local.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "streamctx", "run", str(job), "--runner", "ray",
                             "--address", address], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # Kill once checkpoints completed and output was committed after the newest one (the replay
    # must then skip those rows).
    deadline, killed_at = time.monotonic() + 180, None
    while time.monotonic() < deadline and proc.poll() is None:
        m = store.latest()
        if m is not None and m.ckpt_id >= 3 and len(_parts(out)) > m.sinks["out"]["parts"]:
            proc.send_signal(signal.SIGKILL)
            killed_at = (m.ckpt_id, m.source_offset, len(_parts(out)) - m.sinks["out"]["parts"])
            break
        time.sleep(0.02)
    proc.wait(timeout=30)
    assert killed_at is not None, f"the driver ended before the kill: {proc.stderr.read().decode()[-3000:]}"
    assert proc.returncode == -signal.SIGKILL
    partial = sum(pq.read_metadata(p).num_rows for p in _parts(out))
    assert 0 < partial < 500

    assert main(["run", str(job), "--resume", "--runner", "ray"]) == 0
    got = pa.concat_tables([pq.read_table(p) for p in _parts(out)])
    check = exactly_once(expected, got)
    print(f"\n[driver kill] faults injected: 1 (driver SIGKILL after checkpoint {killed_at[0]}, "
          f"{killed_at[2]} part files committed past it, {partial} rows out); records checked: "
          f"{check['checked']}, lost: {check['lost']}, duplicated: {check['duplicated']}, "
          f"unexpected: {check['unexpected']}, different: {check['different']}")
    assert check == {"checked": 500, "lost": 0, "duplicated": 0, "unexpected": 0, "different": 0, "order_equal": 1}
