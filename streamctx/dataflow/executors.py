"""Where stage replicas run: in-process (`LocalExecutor`) or as Ray actors (`RayExecutor`).

Both expose the same four calls to the driver: `submit(route, envelope)` sends a batch through the
replicas of its route, `done(handle)` / `result(handle)` collect the output, and `finish()` ends all
sessions and returns each replica's stats. On Ray the stage calls of one route are chained by
object reference (actor to actor through the object store, never through the driver), and Ray runs
the calls one submitter makes to one actor in submission order: per-session order holds.

Checkpoints use the same ordering: `snapshot(ckpt_id, store)` queues one snapshot call on every
replica behind the batches already submitted to it (the barrier), so each replica's state file
reflects exactly the records before the barrier. `restore(store, manifest)` puts every replica back
to a checkpoint; `recover()` (Ray) first replaces dead actors with new ones.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional

from streamctx.dataflow.checkpoint import CheckpointError, CheckpointStore, Manifest
from streamctx.dataflow.plan import StagePlan
from streamctx.dataflow.stages import Envelope, StageHost
from streamctx.storage.base import StateLostError


def snapshot_host(host: StageHost, store: CheckpointStore, ckpt_id: int, stage_index: int,
                  replica: int) -> dict[str, Any]:
    """Write one replica's state into checkpoint `ckpt_id`; its manifest entry."""
    entry = store.write_state(ckpt_id, stage_index, replica, host.snapshot())
    entry["sessions"] = len(host.live)
    return entry


def restore_host(host: StageHost, store: CheckpointStore, manifest: Optional[Manifest], stage_index: int,
                 replica: int) -> None:
    """Put one replica back to `manifest` (None: the empty state a job starts with)."""
    if manifest is None:
        host.restore(None)
        return
    host.restore(store.read_state(manifest.ckpt_id, manifest.states[stage_index][replica]))


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

    def not_checkpointable(self) -> list[str]:
        return sorted({h.name for hosts in self.hosts for h in hosts if not h.checkpointable})

    def snapshot(self, ckpt_id: int, store: CheckpointStore) -> list[list[dict[str, Any]]]:
        return [[snapshot_host(h, store, ckpt_id, k, r) for r, h in enumerate(hosts)]
                for k, hosts in enumerate(self.hosts)]

    def snapshot_done(self, handle: list[list[dict[str, Any]]]) -> bool:
        return True

    def snapshot_result(self, handle: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
        return handle

    def restore(self, store: CheckpointStore, manifest: Optional[Manifest]) -> None:
        for k, hosts in enumerate(self.hosts):
            for r, h in enumerate(hosts):
                restore_host(h, store, manifest, k, r)

    def is_failure(self, exc: BaseException) -> bool:
        """In-process stages never crash apart from the driver; only state lost with a peer node
        (`StateLostError`) is recovered from a checkpoint."""
        return isinstance(exc, StateLostError)

    def recover(self) -> int:
        return 0

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

    def checkpointable(self) -> bool:
        assert self.host is not None, "stage actor used before load()"
        return self.host.checkpointable

    def snapshot(self, store: CheckpointStore, ckpt_id: int, stage_index: int, replica: int) -> dict[str, Any]:
        assert self.host is not None, "stage actor used before load()"
        return snapshot_host(self.host, store, ckpt_id, stage_index, replica)

    def restore(self, store: CheckpointStore, manifest: Optional[Manifest], stage_index: int, replica: int) -> None:
        assert self.host is not None, "stage actor used before load()"
        restore_host(self.host, store, manifest, stage_index, replica)

    def pid(self) -> int:
        return os.getpid()

    def unload(self) -> None:
        self.host = None
        import gc

        gc.collect()


_POOL_MAX = 16
_pool: dict[tuple[Any, ...], list[Any]] = {}
_pool_owner: Optional[tuple[str, str]] = None  # (GCS address, job id) whose actors are pooled


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
        # Job ids restart at 01000000 in every new cluster: the GCS address tells sessions apart.
        ctx = ray.get_runtime_context()
        job = (ctx.gcs_address, ctx.get_job_id())
        if job != _pool_owner:  # a new Ray session: old handles are dead
            _pool.clear()
            _pool_owner = job
        self.plan = plan
        self.start_timeout_s = start_timeout_s
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

    # --- checkpoints and recovery ----------------------------------------------------------------

    def not_checkpointable(self) -> list[str]:
        flags = [self.ray.get([a.checkpointable.remote() for a in acts]) for acts in self.actors]
        return sorted({p.name for p, fl in zip(self.plan, flags) if not all(fl)})

    def snapshot(self, ckpt_id: int, store: CheckpointStore) -> list[list[Any]]:
        """The barrier: one snapshot call per replica, queued behind everything submitted to it."""
        return [[a.snapshot.remote(store, ckpt_id, k, r) for r, a in enumerate(acts)]
                for k, acts in enumerate(self.actors)]

    def snapshot_done(self, handle: list[list[Any]]) -> bool:
        flat = [ref for refs in handle for ref in refs]
        ready, _ = self.ray.wait(flat, num_returns=len(flat), timeout=0, fetch_local=False)
        return len(ready) == len(flat)

    def snapshot_result(self, handle: list[list[Any]]) -> list[list[dict[str, Any]]]:
        try:
            return [self.ray.get(refs) for refs in handle]
        except self.ray.exceptions.RayTaskError as exc:  # a storage error inside an actor
            cause = getattr(exc, "cause", None)
            if isinstance(cause, CheckpointError):
                raise CheckpointError(str(cause)) from None
            raise

    def restore(self, store: CheckpointStore, manifest: Optional[Manifest]) -> None:
        self.ray.get([a.restore.remote(store, manifest, k, r)
                      for k, acts in enumerate(self.actors) for r, a in enumerate(acts)])

    def is_failure(self, exc: BaseException) -> bool:
        """A lost actor, node or object, or session state lost with a peer node (`StateLostError`
        raised in a stage): recoverable from a checkpoint (a stage's own errors are dead-lettered
        inside the actor and never get here)."""
        ex = self.ray.exceptions
        lost = (ex.RayActorError, ex.ObjectLostError, ex.OwnerDiedError, ex.ActorUnavailableError,
                ex.NodeDiedError, ex.WorkerCrashedError, StateLostError)
        if isinstance(exc, ex.RayTaskError):
            return isinstance(getattr(exc, "cause", None), lost)
        return isinstance(exc, lost)

    def recover(self, ping_timeout_s: float = 60.0) -> int:
        """Replace every actor that no longer answers by a new one (same stage, same replica,
        loaded afresh); a replica pinned to custom resources no node offers any more (its node
        was lost) is placed anywhere. Returns how many were replaced."""
        ray = self.ray
        pings = [[a.pid.remote() for a in acts] for acts in self.actors]
        dead: list[tuple[int, int]] = []
        for k, refs in enumerate(pings):
            for r, ref in enumerate(refs):
                try:
                    ray.get(ref, timeout=ping_timeout_s)
                except Exception:  # died, unreachable, or hung: replace it
                    dead.append((k, r))
        if not dead:
            return 0
        have = ray.cluster_resources()
        loads = []
        for k, r in dead:
            p = self.plan[k]
            try:
                ray.kill(self.actors[k][r])
            except Exception:  # already gone
                pass
            res = p.resources_for(r)
            if any(have.get(name, 0) < amount for name, amount in res.items()):
                res = {}
            self.keys[k][r] = _pool_key(p.num_cpus, res)
            a = ray.remote(_StageActor).options(num_cpus=p.num_cpus, resources=res or None, max_restarts=0,
                                                max_concurrency=1).remote()
            self.actors[k][r] = a
            loads.append((k, r, a.load.remote(p, r)))
        for k, r, ref in loads:
            self.nodes[k][r] = ray.get(ref, timeout=self.start_timeout_s)
        return len(dead)

    def pids(self) -> dict[tuple[str, int], int]:
        """(stage, replica) -> worker process id of every live replica (fault-injection tests, soak)."""
        refs = {(p.name, r): a.pid.remote() for p, acts in zip(self.plan, self.actors) for r, a in enumerate(acts)}
        out = {}
        for key, ref in refs.items():
            try:
                out[key] = self.ray.get(ref, timeout=30)
            except Exception:  # dead (its replacement comes with the next recovery)
                pass
        return out

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
