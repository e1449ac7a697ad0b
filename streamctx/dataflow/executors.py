"""Where stage replicas run: in-process (`LocalExecutor`) or as Ray actors (`RayExecutor`).

Both expose the same four calls to the driver: `submit(route, envelope)` sends a batch through the
replicas of its route, `done(handle)` / `result(handle)` collect the output, and `finish()` ends all
sessions and returns each replica's stats. On Ray the stage calls of one route are chained by
object reference (actor to actor through the object store, never through the driver), and Ray runs
the calls one submitter makes to one actor in submission order: per-session order holds.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from streamctx.dataflow.plan import StagePlan
from streamctx.dataflow.stages import Envelope, StageHost


class LocalExecutor:
    def __init__(self, plan: list[StagePlan]) -> None:
        self.plan = plan
        self.hosts = [[StageHost(p.name, p.build(r), p.sessions) for r in range(p.replicas)] for p in plan]

    def submit(self, route: tuple[int, ...], env: Envelope) -> Envelope:
        for k, r in enumerate(route):
            env = self.hosts[k][r].step(env)
        return env

    def done(self, handle: Envelope) -> bool:
        return True

    def result(self, handle: Envelope) -> Envelope:
        return handle

    def finish(self) -> list[list[dict[str, Any]]]:
        return [[h.finish() for h in hosts] for hosts in self.hosts]

    def shutdown(self) -> None:
        self.hosts = []


class _StageActor:
    """One stage replica inside a Ray actor."""

    def __init__(self, plan: StagePlan, replica: int) -> None:
        import torch

        torch.set_num_threads(1)
        self.host = StageHost(plan.name, plan.build(replica), plan.sessions)

    def step(self, env: Envelope) -> Envelope:
        return self.host.step(env)

    def finish(self) -> dict[str, Any]:
        return self.host.finish()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


class RayExecutor:
    def __init__(self, plan: list[StagePlan], *, address: Optional[str] = None) -> None:
        import ray

        self.ray = ray
        self.started_ray = False
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=True)
            self.started_ray = True
        self.plan = plan
        actor_cls = ray.remote(_StageActor)
        self.actors = [
            [actor_cls.options(num_cpus=p.num_cpus, resources=p.resources_for(r) or None, max_restarts=0,
                               max_concurrency=1).remote(p, r) for r in range(p.replicas)]
            for p in plan
        ]
        t0 = time.perf_counter()
        self.nodes = [ray.get([a.node_id.remote() for a in acts]) for acts in self.actors]
        self.startup_s = time.perf_counter() - t0

    def submit(self, route: tuple[int, ...], env: Envelope) -> Any:
        ref: Any = env
        for k, r in enumerate(route):
            ref = self.actors[k][r].step.remote(ref)
        return ref

    def done(self, handle: Any) -> bool:
        ready, _ = self.ray.wait([handle], timeout=0)
        return bool(ready)

    def result(self, handle: Any) -> Envelope:
        return self.ray.get(handle)

    def finish(self) -> list[list[dict[str, Any]]]:
        return [self.ray.get([a.finish.remote() for a in acts]) for acts in self.actors]

    def shutdown(self) -> None:
        for acts in self.actors:
            for a in acts:
                self.ray.kill(a)
        self.actors = []
        if self.started_ray:
            self.ray.shutdown()
