"""`streamctx submit` / `status` / `logs` / `stop` against a real two-node Ray cluster on loopback
with token authentication, running a tiny-model job whose model stage must land on the worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.e2e.ray_cluster import LoopbackCluster, loopback_cluster
from tests.fixtures.tiny_models import make_tiny_llama

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

RECORDS = [
    {"session_id": "s1", "turn": 1, "role": "user", "text": "Hello there!", "generate": True},
    {"session_id": "s2", "turn": 1, "role": "user", "text": "What is a list?", "generate": True},
    {"session_id": "s1", "turn": 2, "role": "user", "text": "Tell me more.", "generate": True, "end": True},
    {"session_id": "s2", "turn": 0, "role": "user", "text": "a duplicate-order turn"},
    {"session_id": "s2", "turn": 2, "role": "user", "text": "Thanks.", "generate": True, "end": True},
]


@pytest.fixture(scope="module")
def cluster() -> Iterator[LoopbackCluster]:
    c = loopback_cluster()
    try:
        c.start(workers={"e2e_worker": 1})
        yield c
    finally:
        c.stop()


def _cli(*args: str, token: str | None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = os.environ.get("HOME", "/")
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "streamctx", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def _job_folder(root: Path, model: Path) -> Path:
    folder = root / "job"
    folder.mkdir()
    (folder / "conv.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    spec = {
        "name": "e2e-submit",
        "source": {"type": "jsonl", "path": "conv.jsonl"},
        # The only CPU-carrying node for the model stage is the worker: the job spans two nodes.
        "model": {"path": str(model), "max_new_tokens": 4, "num_cpus": 1, "resources": {"e2e_worker": 1}},
        "runner": {"type": "ray", "batch_size": 2},
        "sink": {"type": "parquet", "path": "out"},
    }
    (folder / "job.yaml").write_text(json.dumps(spec))
    return folder / "job.yaml"


def _part_rows(folder: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("part-*.parquet"))])


def test_submit_status_logs(cluster: LoopbackCluster, tmp_path: Path) -> None:
    model = make_tiny_llama(tmp_path / "tiny", vocab_size=None)
    spec = _job_folder(tmp_path, model)
    out = tmp_path / "results"

    sub = _cli("submit", str(spec), "--address", cluster.address, "--out", str(out), token=cluster.token)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip()
    assert job_id.startswith("raysubmit_")

    # Streams the driver's output over the authenticated websocket until the job ends.
    followed = _cli("logs", job_id, "--address", cluster.address, "--follow", token=cluster.token, timeout=180)
    status = _cli("status", job_id, "--address", cluster.address, "--wait", "--timeout", "150",
                  token=cluster.token, timeout=180)  # fmt: skip
    logs = _cli("logs", job_id, "--address", cluster.address, token=cluster.token)
    assert status.returncode == 0, f"{status.stdout}{status.stderr}\n--- job logs ---\n{logs.stdout[-4000:]}"
    assert status.stdout.strip() == "SUCCEEDED"

    assert logs.returncode == 0 and followed.returncode == 0
    for text in (logs.stdout, followed.stdout):
        assert "streamctx job summary" in text and "e2e-submit on the ray runner" in text

    rows = _part_rows(out)
    keys = sorted(zip(rows["session_id"].to_pylist(), rows["turn"].to_pylist()))
    assert keys == [("s1", 1), ("s1", 2), ("s2", 1), ("s2", 2)]
    dead = _part_rows(out / "dead_letter")
    assert dead["session_id"].to_pylist() == ["s2"] and dead["turn"].to_pylist() == [0]

    stop = _cli("stop", job_id, "--address", cluster.address, token=cluster.token)
    assert stop.returncode == 0 and stop.stdout.strip() == f"{job_id}: not running"


def test_wrong_token_is_refused_in_one_line(cluster: LoopbackCluster) -> None:
    res = _cli("status", "raysubmit_none", "--address", cluster.address, token="not-the-token")
    assert res.returncode == 3
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith(f"error: the Ray cluster at {cluster.address} refused the request")


def test_unknown_job_is_a_one_line_failure(cluster: LoopbackCluster) -> None:
    res = _cli("logs", "raysubmit_doesnotexist", "--address", cluster.address, token=cluster.token)
    assert res.returncode == 1
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("error: logs of raysubmit_doesnotexist:")
