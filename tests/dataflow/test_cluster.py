"""Multi-node runs on a `ray.cluster_utils.Cluster` (head + 2 nodes with custom resources):
replicas placed on different nodes give the single-process result.

Own pytest process only (`pytest -m cluster`): a Cluster cannot share the session's ray.init().
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.cluster

TIMING = {"latency_ms"}


@pytest.fixture(scope="module")
def cluster():
    os.environ["RAY_AUTH_MODE"] = "disabled"  # loopback-only test cluster
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.fail("test_cluster.py must run in its own pytest process (pytest -m cluster)")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1, resources={"node_a": 8})
    c.add_node(num_cpus=1, resources={"node_b": 8})
    c.wait_for_nodes()
    ray.init(address=c.address, runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}})
    from tests.dataflow import stages

    ray.cloudpickle.register_pickle_by_value(sys.modules[stages.__name__])
    yield c
    ray.shutdown()
    c.shutdown()


def _strip(table) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in table.to_pylist()]


def test_user_stage_replicas_on_two_nodes_equal_the_local_run(cluster) -> None:
    from streamctx.dataflow import run_job
    from streamctx.spec import JobSpec
    from tests.dataflow import stages
    from tests.dataflow.streams import conversations, interleave

    records = interleave(conversations(10, 6), seed=2)

    def spec(ray_nodes: bool) -> JobSpec:
        place = [{"node_a": 1}, {"node_b": 1}] if ray_nodes else []
        return JobSpec.from_dict({
            "name": "c", "source": {"type": "iterator", "obj": records}, "model": None,
            "runner": {"replicas": 2, "batch_size": 8},
            "stages": [{"name": "history", "cls": stages.History, "replicas": 2, "replica_resources": place}],
        })

    local = run_job(spec(False), runner="local")
    dist = run_job(spec(True), runner="ray")
    assert dist.outputs.equals(local.outputs)
    nodes = dist.metrics["nodes"]["history"]
    assert len(set(nodes)) == 2  # the two replicas really ran on different nodes
    assert dist.sessions.live == 0 and dist.sessions.bytes == 0


def test_model_replicas_on_two_nodes_equal_the_local_run(cluster, tmp_path: Path) -> None:
    from streamctx.dataflow import run_job
    from streamctx.spec import JobSpec
    from tests.dataflow.streams import conversations, interleave
    from tests.fixtures.tiny_models import make_tiny_llama

    tiny = make_tiny_llama(tmp_path / "tiny", hidden=32, layers=2, heads=2, kv_heads=1)
    records = interleave(conversations(4, 3, generate_every=2), seed=4)

    def spec(model: dict[str, Any]) -> JobSpec:
        return JobSpec.from_dict({
            "name": "cm", "source": {"type": "iterator", "obj": records},
            "model": {"path": str(tiny), "max_new_tokens": 3, "num_cpus": 0, **model},
            "runner": {"replicas": 2, "batch_size": 4},
        })

    local = run_job(spec({}), runner="local")
    dist = run_job(spec({"replica_resources": [{"node_a": 1}, {"node_b": 1}]}), runner="ray")
    assert _strip(dist.outputs) == _strip(local.outputs)
    assert any(r["reply"] for r in local.outputs.to_pylist())
    assert len(set(dist.metrics["nodes"]["model"])) == 2
    assert dist.sessions.live == 0 and dist.sessions.bytes == 0


def test_split_model_on_two_nodes_equals_the_local_run(cluster, tmp_path: Path) -> None:
    """`model.stages: 2`: the first layer stage on node_a, the second on node_b (hidden states
    cross nodes through Ray's object store), equal to the unsplit model in one process."""
    from streamctx.dataflow import run_job
    from streamctx.spec import JobSpec
    from tests.dataflow.streams import conversations, interleave
    from tests.fixtures.tiny_models import make_tiny_llama

    tiny = make_tiny_llama(tmp_path / "tiny", hidden=32, layers=3, heads=2, kv_heads=1)
    records = interleave(conversations(4, 4, generate_every=2), seed=6)

    def spec(model: dict[str, Any]) -> JobSpec:
        return JobSpec.from_dict({
            "name": "cs", "source": {"type": "iterator", "obj": records},
            "model": {"path": str(tiny), "max_new_tokens": 4, "num_cpus": 0, **model},
            "runner": {"replicas": 1, "batch_size": 4, "start_timeout_s": 120},
        })

    local = run_job(spec({}), runner="local")
    # node_b exists on one node only: the second stage cannot run anywhere else (else placement fails).
    dist = run_job(spec({"stages": 2, "stage_resources": [{"node_a": 1}, {"node_b": 1}]}), runner="ray")
    assert _strip(dist.outputs) == _strip(local.outputs)
    assert sum(bool(r["reply"]) for r in local.outputs.to_pylist()) >= 4
    node_a = [n["NodeID"] for n in _ray_nodes() if n["Resources"].get("node_a")]
    assert dist.metrics["nodes"]["model"] == node_a  # the first stage really ran on node_a
    assert dist.sessions.live == 0 and dist.sessions.bytes == 0


def _ray_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n["Alive"]]
