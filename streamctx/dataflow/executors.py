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

    def queue_depths(self, handles: list[Envelope]) -> list[int]:
        """In-process stages run on submit: only the sink edge can hold batches."""
        return [0] * len(self.plan) + [len(handles)]

    def finish(self) -> list[list[dict[str, Any]]]:
        return [[h.finish() for h in hosts] for hosts in self.hosts]

    def shutdown(self) -> None:
        self.hosts = []


class _StageActor:
    """A container for one stage replica inside a Ray actor; `load` gives it a (new) stage.

    Containers are pooled across jobs of one driver (starting a Ray worker process costs seconds),
    and `unload` drops everything a job put in them.
    """

    def __init__(self) -> None:
        self.host: Optional[StageHost] = None

    def load(self, plan: StagePlan, replica: int) -> str:
        import ray

        if plan.kind == "model":
            import torch

            torch.set_num_threads(1)
        self.host = StageHost(plan.name, plan.build(replica), plan.sessions)
        return ray.get_runtime_context().get_node_id()

    def step(self, env: Envelope) -> Envelope:
        assert self.host is not None, "stage actor used before load()"
        return self.host.step(env)

    def finish(self) -> dict[str, Any]:
        assert self.host is not None, "stage actor used before load()"
        return self.host.finish()

    def unload(self) -> None:
        self.host = None
        import gc

        gc.collect()


_POOL_MAX = 16
_pool: dict[tuple[Any, ...], list[Any]] = {}
_pool_owner: Optional[str] = None  # the Ray job whose actors are pooled


def _pool_key(num_cpus: float, resources: dict[str, float]) -> tuple[Any, ...]:
    return (num_cpus, tuple(sorted(resources.items())))


class RayExecutor:
    def __init__(self, plan: list[StagePlan], *, address: Optional[str] = None,
                 start_timeout_s: float = 300.0) -> None:
        import ray

        global _pool_owner
        self.ray = ray
        self.started_ray = False
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=True)
            self.started_ray = True
        job = ray.get_runtime_context().get_job_id()
        if job != _pool_owner:  # a new Ray session: old handles are dead
            _pool.clear()
            _pool_owner = job
        self.plan = plan
        t0 = time.perf_counter()
        self.keys = [[_pool_key(p.num_cpus, p.resources_for(r)) for r in range(p.replicas)] for p in plan]
        self.actors = [[self._acquire(key) for key in keys] for keys in self.keys]
        try:
            refs = [[a.load.remote(p, r) for r, a in enumerate(acts)] for p, acts in zip(plan, self.actors)]
            self.nodes = [ray.get(rs, timeout=start_timeout_s) for rs in refs]
        except ray.exceptions.GetTimeoutError:
            self.shutdown(reuse=False)
            wanted = {p.name: {"num_cpus": p.num_cpus, "resources": [p.resources_for(r) for r in range(p.replicas)]}
                      for p in plan}
            raise RuntimeError(f"stage actors were not placed within {start_timeout_s:.0f} s; the cluster "
                               f"lacks the CPUs or custom resources they ask for: {wanted}") from None
        except Exception:
            self.shutdown(reuse=False)
            raise
        self.startup_s = time.perf_counter() - t0

    def _acquire(self, key: tuple[Any, ...]) -> Any:
        free = _pool.get(key)
        if free:
            return free.pop()
        num_cpus, resources = key
        return self.ray.remote(_StageActor).options(
            num_cpus=num_cpus, resources=dict(resources) or None, max_restarts=0, max_concurrency=1).remote()

    def submit(self, route: tuple[int, ...], env: Envelope) -> list[Any]:
        """Chain the route's stage calls; the handle is every stage's output ref (the last is the result)."""
        refs: list[Any] = []
        ref: Any = env
        for k, r in enumerate(route):
            ref = self.actors[k][r].step.remote(ref)
            refs.append(ref)
        return refs

    def done(self, handle: list[Any]) -> bool:
        ready, _ = self.ray.wait([handle[-1]], timeout=0)
        return bool(ready)

    def result(self, handle: list[Any]) -> Envelope:
        return self.ray.get(handle[-1])

    def queue_depths(self, handles: list[list[Any]]) -> list[int]:
        """Batches waiting on each edge: into stage k (done upstream, not yet by k), then into the sink."""
        n = len(self.plan)
        flat = [h[k] for h in handles for k in range(n)]
        if not flat:
            return [0] * (n + 1)
        ready, _ = self.ray.wait(flat, num_returns=len(flat), timeout=0, fetch_local=False)
        ready_ids = {r.hex() for r in ready}
        done = [sum(h[k].hex() in ready_ids for h in handles) for k in range(n)]
        upstream = [len(handles)] + done
        return [upstream[k] - done[k] for k in range(n)] + [done[-1]]

    def finish(self) -> list[list[dict[str, Any]]]:
        return [self.ray.get([a.finish.remote() for a in acts]) for acts in self.actors]

    def shutdown(self, *, reuse: bool = True) -> None:
        reuse = reuse and not self.started_ray
        if reuse:
            try:
                self.ray.get([a.unload.remote() for acts in self.actors for a in acts])
            except Exception:  # a dead actor: do not pool any of this job's actors
                reuse = False
        for keys, acts in zip(self.keys, self.actors):
            for key, a in zip(keys, acts):
                free = _pool.setdefault(key, [])
                # Only actors that reserve nothing are kept: an idle actor holding CPUs or custom
                # resources could starve other work on the same Ray.
                if reuse and key == _pool_key(0.0, {}) and len(free) < _POOL_MAX:
                    free.append(a)
                else:
                    self.ray.kill(a)
        self.actors = []
        if self.started_ray:
            self.ray.shutdown()
