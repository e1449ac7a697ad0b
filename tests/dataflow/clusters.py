"""Multi-node Ray clusters on one machine for the node-loss tests (`ray.cluster_utils.Cluster`).

Own pytest process only (`pytest -m cluster`): a Cluster cannot share the session's ray.init().
The head checks node health every 0.5 s, so a lost node is noticed in seconds (Ray's default is ~15 s).
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import pytest


def worker_nodes(*names: str) -> dict[str, dict[str, Any]]:
    """One-CPU worker nodes, each offering a custom resource named after it (to place actors)."""
    return {name: {"num_cpus": 1, "resources": {name: 8}} for name in names}


@contextmanager
def local_cluster(nodes: dict[str, dict[str, Any]]) -> Iterator[tuple[Any, dict[str, Any]]]:
    """A head (1 CPU, the driver's node) plus `nodes` (name -> `Cluster.add_node` arguments), with
    this process connected to it; yields (cluster, {name: node})."""
    os.environ["RAY_AUTH_MODE"] = "disabled"  # loopback-only test cluster
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.fail("cluster tests must run in their own pytest process (pytest -m cluster)")
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False,
        "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                           "health_check_timeout_ms": 500, "health_check_failure_threshold": 3},
    })
    added = {name: c.add_node(**args) for name, args in nodes.items()}
    c.wait_for_nodes()
    ray.init(address=c.address, runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}})
    try:
        yield c, added
    finally:
        ray.shutdown()
        c.shutdown()


def lose_node(c: Any, node: Any, pids: Iterable[int]) -> None:
    """Take a node away as a lost machine goes: `remove_node` kills the node's Ray services, and the
    worker processes `pids` placed there are killed with them (Cluster leaves orphaned workers alive
    for a while, which could go on serving on a dead node)."""
    c.remove_node(node, allow_graceful=False)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stage_pids_on(executor: Any, node_id: str) -> list[int]:
    """Worker process ids of the job's stage replicas placed on `node_id`."""
    on = {(st.name, r) for st, reps in zip(executor.plan, executor.nodes) for r, nid in enumerate(reps)
          if nid == node_id}
    return [pid for key, pid in executor.pids().items() if key in on]
