"""Node loss under a split model (`model.stages: 2`) on a `ray.cluster_utils.Cluster`: the first
stage on node_a, the later layer stage on node_b. Removing node_b mid-stream takes the layer
stage's share of every session with it; the first stage starts a new layer actor on a surviving
node (node_b's custom resource is gone), every replica is restored from the last checkpoint and
the output equals a fault-free run row for row.

Own pytest process only (`pytest -m cluster`): a Cluster cannot share the session's ray.init().
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.dataflow.clusters import local_cluster, lose_node, worker_nodes

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(worker_nodes("node_a", "node_b")) as (c, nodes):
        yield c, nodes


def _layer_actors() -> list[tuple[str, str]]:
    import ray

    from streamctx.dataflow.pipeline_stage import LAYER_ACTOR_PREFIX

    return sorted((a["namespace"], a["name"]) for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(LAYER_ACTOR_PREFIX))


def test_lost_layer_stage_node_is_rebuilt_from_the_checkpoint(cluster, tmp_path: Path) -> None:
    import ray

    from streamctx.dataflow import run_job
    from streamctx.spec import JobSpec
    from tests.dataflow.faults import check_line, exactly_once
    from tests.dataflow.streams import conversations, interleave
    from tests.fixtures.tiny_models import make_tiny_llama

    c, nodes = cluster
    tiny = make_tiny_llama(tmp_path / "tiny", hidden=32, layers=2, heads=2, kv_heads=1)
    records = interleave(conversations(8, 10, generate_every=3), seed=9)

    def spec(base: Path) -> JobSpec:
        return JobSpec.from_dict({
            "name": "layer-node-loss", "source": {"type": "iterator", "obj": records},
            "model": {"path": str(tiny), "max_new_tokens": 3, "num_cpus": 0, "replicas": 1, "stages": 2,
                      "stage_resources": [{"node_a": 1}, {"node_b": 1}]},
            "policy": {"type": "sink_window", "sinks": 2, "window": 12},
            "runner": {"replicas": 1, "batch_size": 5, "key_groups": 16, "max_in_flight": 20,
                       "start_timeout_s": 120},
            "checkpoint": {"enabled": True, "interval_records": 10, "path": "ckpt"},
        }, base_dir=base)

    clean = run_job(spec(tmp_path / "clean"), runner="ray")
    assert clean.records_out == len(records) == 80 and clean.dead_letters == 0

    removed: list[int] = []
    node_b = nodes["node_b"].node_id
    replaced_on: list[str] = []

    def lose_node_b(p: Any) -> None:
        if removed and not replaced_on and p.records_out >= 60:  # after the recovery: the new layer actor
            (ns, name), = _layer_actors()
            replaced_on.append(ray.get(ray.get_actor(name, namespace=ns).ready.remote(), timeout=30))
        if removed or p.records_out < 30:
            return
        (ns, name), = _layer_actors()
        actor = ray.get_actor(name, namespace=ns)
        pid = ray.get(actor.pid.remote(), timeout=30)
        assert ray.get(actor.ready.remote(), timeout=30) == node_b  # placed by stage_resources
        lose_node(c, nodes["node_b"], [pid])
        removed.append(p.records_out)

    res = run_job(spec(tmp_path / "faulty"), runner="ray", on_progress=lose_node_b)
    ck = res.metrics["checkpoints"]
    check = exactly_once(clean.outputs, res.outputs)
    print(f"\n[layer node loss] faults injected: {len(removed)} (node_b removed at {removed} rows); recoveries: "
          f"{ck['recoveries']}, failures: {ck['failures']}; {check_line(check)}")
    assert removed and ck["recoveries"] >= 1 and any("LayerStageLost" in f for f in ck["failures"])
    assert check == {"checked": 80, "lost": 0, "duplicated": 0, "unexpected": 0, "different": 0, "order_equal": 1}
    assert res.dead_letters == 0 and res.sessions.live == 0 and res.sessions.ended == clean.sessions.ended
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert node_b not in alive and replaced_on and replaced_on[0] in alive  # started on a surviving node
