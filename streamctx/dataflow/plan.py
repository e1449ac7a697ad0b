"""The stage graph of a job: source -> segment -> user stages -> model (stages) -> user stages -> sink.

Source and sink run in the driver; every other stage is keyed and has replicas. A `StagePlan` is
plain data (picklable) that builds one replica's stage object wherever the replica lives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from streamctx.dataflow.routing import key_groups_of, replica_of
from streamctx.spec import JobSpec, SessionsSpec, StageSpec, import_stage_class

StageKind = Literal["segment", "user", "model"]


@dataclass(frozen=True)
class StagePlan:
    name: str
    kind: StageKind
    replicas: int
    sessions: SessionsSpec
    num_cpus: float = 0.0
    resources: tuple[dict[str, float], ...] = ()
    payload: dict[str, Any] = field(default_factory=dict)

    def resources_for(self, replica: int) -> dict[str, float]:
        return dict(self.resources[replica]) if replica < len(self.resources) else {}

    def build(self, replica: int) -> Any:
        """The stage object of one replica (imports happen here, where the replica runs)."""
        if self.kind == "segment":
            from streamctx.dataflow.stages import SegmentStage

            return SegmentStage(self.sessions)
        if self.kind == "user":
            cls = self.payload["cls"]
            cls = import_stage_class(cls) if isinstance(cls, str) else cls
            return cls(**self.payload["kwargs"])
        from streamctx.dataflow.model_stage import build_model_stage

        return build_model_stage(**self.payload)


def _user_plan(st: StageSpec, default_replicas: int, sessions: SessionsSpec) -> StagePlan:
    replicas = st.replicas or default_replicas
    res = st.replica_resources or [st.resources] * replicas
    if len(res) != replicas:
        raise ValueError(f"stage {st.name!r}: replica_resources has {len(res)} entries for {replicas} replicas")
    return StagePlan(st.name, "user", replicas, sessions, st.num_cpus, tuple(res),
                     {"cls": st.cls, "kwargs": dict(st.kwargs)})


def build_plan(spec: JobSpec) -> list[StagePlan]:
    n = spec.runner.replicas
    plan = [StagePlan("segment", "segment", n, spec.sessions)]
    plan += [_user_plan(s, n, spec.sessions) for s in spec.stages if s.place == "pre_model"]
    if spec.model is not None:
        m = spec.model
        replicas = m.replicas or n
        if m.replica_resources and len(m.replica_resources) != replicas:
            raise ValueError(f"model.replica_resources has {len(m.replica_resources)} entries for {replicas} replicas")
        # With model.stages > 1 this is the first layer stage; it starts the later ones itself
        # (streamctx.dataflow.pipeline_stage), placed by stage_resources[1:].
        if m.stage_resources:
            res = (m.stage_resources[0],) * replicas
        else:
            res = tuple(m.replica_resources) if m.replica_resources else (m.resources,) * replicas
        plan.append(StagePlan("model", "model", replicas, spec.sessions, m.num_cpus, res, {
            "model": m.model_dump(), "policy": dict(spec.policy), "base_dir": spec.base_dir,
            "part": 0, "parts": m.stages, "memory": spec.scheduler.memory.model_dump(),
            **({"start_timeout_s": spec.runner.start_timeout_s} if m.stages > 1 else {}),
        }))
    plan += [_user_plan(s, n, spec.sessions) for s in spec.stages if s.place == "post_model"]
    return plan


def partition(batch: pa.RecordBatch, plan: list[StagePlan], key_groups: int
              ) -> list[tuple[tuple[int, ...], pa.RecordBatch]]:
    """Split a batch by route (the replica of every stage), keeping arrival order inside each part.

    All records of a session share a key group, hence a route: they meet the same replicas in order.
    """
    groups = key_groups_of(batch.column("session_id"), key_groups)
    replicas = [p.replicas for p in plan]
    if all(r == 1 for r in replicas):
        return [((0,) * len(plan), batch)]
    routes = np.stack([replica_of(groups, key_groups, r) for r in replicas], axis=1)  # [N, stages]
    keys = np.zeros(len(groups), dtype=np.int64)
    for k, r in enumerate(replicas):
        keys = keys * r + routes[:, k]
    uniq, first = np.unique(keys, return_index=True)
    out = []
    for key in uniq[np.argsort(first)]:
        idx = np.flatnonzero(keys == key)
        route = tuple(int(x) for x in routes[idx[0]])
        out.append((route, batch.take(pa.array(idx))))
    return out
