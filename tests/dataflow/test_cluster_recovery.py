"""Node loss on a `ray.cluster_utils.Cluster` (head + 2 nodes): the node holding one model replica
is removed mid-stream; its sessions are rebuilt on a surviving node from the last checkpoint (never
from anything that lived on the lost node), and the output equals a fault-free run row for row.

Own pytest process only (`pytest -m cluster`): a Cluster cannot share the session's ray.init().
The head checks node health every 0.5 s, so the loss is noticed in seconds (Ray's default is ~15 s).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.dataflow.clusters import local_cluster, lose_node, stage_pids_on, worker_nodes

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(worker_nodes("node_a", "node_b")) as (c, nodes):
        yield c, nodes


def test_lost_node_sessions_are_rebuilt_from_the_checkpoint(cluster, tmp_path: Path) -> None:
    import ray

    from streamctx.dataflow import run_job
    from streamctx.spec import JobSpec
    from tests.dataflow.faults import check_line, exactly_once
    from tests.dataflow.streams import multi_session_stream
    from tests.fixtures.tiny_models import make_tiny_llama

    c, nodes = cluster
    tiny = make_tiny_llama(tmp_path / "tiny", hidden=32, layers=2, heads=2, kv_heads=1)
    records = multi_session_stream()

    def spec(base: Path) -> JobSpec:
        return JobSpec.from_dict({
            "name": "node-loss", "source": {"type": "iterator", "obj": records},
            "model": {"path": str(tiny), "max_new_tokens": 3, "num_cpus": 0, "replicas": 2,
                      "replica_resources": [{"node_a": 1}, {"node_b": 1}]},
            "runner": {"replicas": 2, "batch_size": 10, "key_groups": 32, "max_in_flight": 60,
                       "start_timeout_s": 120},
            "checkpoint": {"enabled": True, "interval_records": 50, "path": "ckpt"},
        }, base_dir=base)

    clean = run_job(spec(tmp_path / "clean"), runner="ray")
    assert clean.records_out == 500
    node_a_id = nodes["node_a"].node_id
    assert clean.metrics["nodes"]["model"][0] == node_a_id

    removed: list[int] = []
    executors: list[Any] = []

    def lose_node_a(p: Any) -> None:
        if not removed and p.records_out >= 200:
            lose_node(c, nodes["node_a"], stage_pids_on(executors[0], node_a_id))
            removed.append(p.records_out)

    res = run_job(spec(tmp_path / "faulty"), runner="ray", on_progress=lose_node_a, on_start=executors.append)
    ck = res.metrics["checkpoints"]
    check = exactly_once(clean.outputs, res.outputs)
    print(f"\n[node loss] faults injected: {len(removed)} (node_a removed at {removed} rows); recoveries: "
          f"{ck['recoveries']}, actors replaced: {ck['replaced_actors']}; {check_line(check)}")
    assert removed and ck["recoveries"] >= 1 and ck["replaced_actors"] >= 1
    assert check == {"checked": 500, "lost": 0, "duplicated": 0, "unexpected": 0, "different": 0, "order_equal": 1}
    # The replica that lived on node_a now runs on a surviving node.
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert node_a_id not in alive and res.metrics["nodes"]["model"][0] in alive
    assert res.sessions.live == 0 and res.sessions.ended == clean.sessions.ended
