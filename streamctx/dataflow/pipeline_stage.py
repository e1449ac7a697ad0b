"""The model stage split into layer stages (`model.stages: N`).

The first stage is an ordinary model stage (tokenizer, chat template, sessions, sampling) whose
model runs the embeddings, the first layer range and the head; it starts the N - 1 later layer
stages itself and calls them for every model step (one round trip per decoded token). On Ray each
later stage is an actor placed by `model.stage_resources[k]` (else `model.resources`); calls are
chained actor to actor by object reference, so hidden states (numpy, in Ray's object store) go
from stage k to k + 1 without passing through the first stage. Each stage keeps its own layers'
per-session KV cache and policy state, freed when the first stage closes the session.
In-process (the local runner), the later stages are plain objects in the same process.

Checkpoints: the first stage's `snapshot()` holds every session whole, its own layers and every
later stage's share (`PipelinedLlama.state_to_blob`), and `restore()` pushes the shares back, so
the checkpoint files and the driver see one model stage. A later stage whose actor dies takes its
sessions' state with it: the first stage's next call fails, `process_dead` raises `LayerStageLost`
(a `StateLostError`, never dead-lettered) and the runtime restores every replica from the last
checkpoint and replays; `restore()` first starts new layer actors in place of a dead chain.

Llama family only (a Mamba split is refused with a clear error at startup).
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, Optional, Sequence

from streamctx.dataflow.model_stage import ModelStage, engine_policy
from streamctx.model.pipeline import Hidden, LayerStage, LocalChain, PipelinedLlama, split_layers
from streamctx.storage.base import StateLostError

if TYPE_CHECKING:
    import pyarrow as pa

LAYER_ACTOR_PREFIX = "streamctx.layers."  # + chain id + "." + stage index (1 = the second stage)


class LayerStageLost(StateLostError):
    """A later layer stage is gone (its actor or node died) with its share of every session's
    state: the sessions are rebuilt from the last checkpoint, never continued without it."""


class _LayerActor:
    """A Ray actor holding one later layer range of the model (`LayerStage`)."""

    def __init__(self, source: str, dtype: Optional[str], device: Optional[str], start: int, stop: int,
                 policy: Any) -> None:
        import torch

        from streamctx.engine import Engine

        torch.set_num_threads(1)  # like every model-stage actor: one core each
        model = Engine.load(source, dtype=dtype, device=device).model
        self.stage = LayerStage(model, range(start, stop), policy)

    def ready(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def forward(self, keys: Sequence[str], hidden: Hidden, lens: Sequence[int], key_mass: bool) -> Hidden:
        return self.stage.forward(keys, hidden, lens, key_mass)

    def free(self, key: str) -> None:
        self.stage.free(key)

    def stats(self) -> dict[str, int]:
        return self.stage.stats()

    def save(self, keys: Sequence[str]) -> dict[str, bytes]:
        return self.stage.save(keys)

    def load(self, key: str, data: bytes) -> int:
        return self.stage.load(key, data)

    def pid(self) -> int:
        import os

        return os.getpid()


class RayChain:
    """Later layer stages as Ray actors; a step is one chain of actor calls, awaited at the end.
    A call that finds an actor (or its node) dead raises `LayerStageLost`."""

    def __init__(self, actors: list[Any]) -> None:
        import ray

        self.ray = ray
        self.actors = actors

    def _get(self, refs: Any, timeout: Optional[float] = None) -> Any:
        ex = self.ray.exceptions
        lost = (ex.RayActorError, ex.ActorUnavailableError, ex.ObjectLostError, ex.OwnerDiedError,
                ex.NodeDiedError, ex.WorkerCrashedError)
        try:
            return self.ray.get(refs, timeout=timeout)
        except ex.RayTaskError as exc:  # an error inside a stage: lost only if caused by a death upstream
            cause = getattr(exc, "cause", None)
            if isinstance(cause, lost):
                raise LayerStageLost(f"a later layer stage died: {type(cause).__name__}: {cause}") from exc
            raise
        except lost as exc:
            raise LayerStageLost(f"a later layer stage died: {type(exc).__name__}: {exc}") from exc

    def forward(self, keys: Sequence[str], hidden: Hidden, lens: Sequence[int], key_mass: bool) -> Hidden:
        ref: Any = hidden
        for a in self.actors:
            ref = a.forward.remote(list(keys), ref, list(lens), key_mass)
        return self._get(ref)

    def save(self, keys: Sequence[str]) -> list[dict[str, bytes]]:
        return self._get([a.save.remote(list(keys)) for a in self.actors])

    def load(self, key: str, parts: Sequence[bytes]) -> int:
        if len(parts) != len(self.actors):
            raise ValueError(f"session state has {len(parts)} later-stage shares; this chain has "
                             f"{len(self.actors)} stages")
        return sum(self._get([a.load.remote(key, p) for a, p in zip(self.actors, parts)]))

    def alive(self, timeout_s: float = 30.0) -> bool:
        try:
            self._get([a.ready.remote() for a in self.actors], timeout=timeout_s)
        except Exception:  # dead, unreachable or hung
            return False
        return True

    def pids(self) -> list[int]:
        """Worker process ids of the layer actors, in stage order (fault-injection tests)."""
        return self._get([a.pid.remote() for a in self.actors])

    def free(self, key: str) -> None:
        for a in self.actors:  # ordered after this submitter's earlier calls to the same actor
            a.free.remote(key)

    def stats(self) -> list[dict[str, int]]:
        return self.ray.get([a.stats.remote() for a in self.actors])

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:  # already gone
                pass
        self.actors = []


class _WatchedChain:
    """The chain as the first stage's model sees it: remembers the first `StateLostError` a call
    raised, which the engine turns into failed requests, so that the stage can raise it instead."""

    def __init__(self, chain: LocalChain | RayChain) -> None:
        self.inner = chain
        self.lost: Optional[StateLostError] = None

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self.inner, name)(*args)
        except StateLostError as exc:
            self.lost = self.lost or exc
            raise

    def forward(self, keys: Sequence[str], hidden: Hidden, lens: Sequence[int], key_mass: bool) -> Hidden:
        return self._call("forward", keys, hidden, lens, key_mass)

    def free(self, key: str) -> None:
        self._call("free", key)

    def save(self, keys: Sequence[str]) -> list[dict[str, bytes]]:
        return self._call("save", keys)

    def load(self, key: str, parts: Sequence[bytes]) -> int:
        return self._call("load", key, parts)

    def stats(self) -> list[dict[str, int]]:
        return self._call("stats")


def _in_ray_actor() -> bool:
    import sys

    if "ray" not in sys.modules:
        return False
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


class PipelinedModelStage(ModelStage):
    """The first of `parts` layer stages; see the module docstring."""

    def __init__(self, model: dict[str, Any], policy: dict[str, Any], base_dir: str,
                 part: int = 0, parts: int = 2, start_timeout_s: float = 300.0) -> None:
        from streamctx.engine import Engine

        if part != 0:
            raise ValueError(f"the pipelined model stage is the first layer stage (part 0), got part {part}")
        super().__init__(model, policy, base_dir)
        full = self.engine
        if full.model.kind != "llama":
            raise NotImplementedError(f"model.stages > 1 splits Llama-family models only; this model is "
                                      f"{full.model.kind!r}: use model.stages: 1 (and model.replicas to scale out)")
        try:
            ranges = split_layers(full.config.num_layers, parts)
        except ValueError as exc:
            raise ValueError(f"model.stages: {exc}") from None
        self.model_spec, self.policy_spec = model, engine_policy(policy)
        self.device = None if model["device"] in (None, "auto") else model["device"]
        self.ranges = ranges
        # Half the runner's start timeout: this stage's own placement and load count against the rest.
        self.start_timeout_s = start_timeout_s / 2
        self.restarts = 0  # layer stages started anew after one was lost
        self.chain = _WatchedChain(self._start_chain())
        self.engine = Engine(PipelinedLlama(full.model, ranges, self.chain), full.tokenizer, policy=self.policy_spec,
                             prefill_chunk=full.prefill_chunk, source=full.source)

    def _start_chain(self, restart: bool = False) -> LocalChain | RayChain:
        from streamctx.engine import Engine

        if _in_ray_actor():
            return self._start_actors(self.model_spec, self.ranges[1:], self.policy_spec, self.device,
                                      self.start_timeout_s, restart)
        return LocalChain([LayerStage(Engine.load(self.source, dtype=self.model_spec["dtype"], device=self.device).model,
                                      r, self.policy_spec) for r in self.ranges[1:]])

    def _start_actors(self, model: dict[str, Any], ranges: Sequence[range], policy: Any,
                      device: Optional[str], timeout_s: float, restart: bool = False) -> RayChain:
        import ray

        stage_res = model["stage_resources"]
        have = ray.cluster_resources()
        chain_id = uuid.uuid4().hex[:12]
        actors = []
        for k, r in enumerate(ranges, start=1):
            res = stage_res[k] if stage_res else model["resources"]
            if restart and any(have.get(n, 0) < a for n, a in res.items()):
                res = {}  # the node that offered them was lost: anywhere will do
            actors.append(ray.remote(_LayerActor).options(
                num_cpus=model["num_cpus"], resources=dict(res) or None, max_restarts=0, max_concurrency=1,
                name=f"{LAYER_ACTOR_PREFIX}{chain_id}.{k}",  # visible in `ray list actors`; tests find them by name
            ).remote(self.source, model["dtype"], device, r.start, r.stop, policy))
        try:
            self.layer_nodes = ray.get([a.ready.remote() for a in actors], timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            for a in actors:
                ray.kill(a)
            raise RuntimeError(f"layer stage actors were not placed within {timeout_s:.0f} s; the cluster "
                               f"lacks the CPUs ({model['num_cpus']} each) or custom resources they ask for: "
                               f"{[stage_res[k] if stage_res else model['resources'] for k in range(1, len(ranges) + 1)]}"
                               ) from None
        return RayChain(actors)

    # -- the data path and checkpoints -------------------------------------------------------------

    def process_dead(self, batch: pa.RecordBatch) -> tuple[Optional[pa.RecordBatch], list[dict[str, Any]]]:
        if self.chain.lost is not None:  # batches queued behind the failure: nothing to run them on
            raise self.chain.lost
        out = super().process_dead(batch)
        if self.chain.lost is not None:  # the engine failed the requests; the state is what is lost
            raise self.chain.lost
        return out

    def snapshot(self) -> dict[str, bytes]:
        """Every session whole: this stage's layers and every later stage's share.

        A consistent cut: this stage drives the later ones synchronously (each model step waits for
        the whole chain; `free` calls are ordered before later calls from this stage to the same
        actor), and the host runs `snapshot` between steps, so every later stage holds exactly the
        steps this one has run."""
        if self.chain.lost is not None:
            raise self.chain.lost
        sessions = self.engine.sessions
        with self.engine.model.saving([s.state for s in sessions.values()]):
            return {sid: s.save() for sid, s in sessions.items()}

    def restore(self, blobs: dict[str, bytes]) -> None:
        """Drop every session, start new layer stages if a later one was lost, then restore `blobs`
        (each session's shares pushed back to the later stages, bit-exact)."""
        ModelStage.close(self)  # sessions only: the layer stages stay
        if self.chain.lost is not None or (isinstance(self.chain.inner, RayChain) and not self.chain.inner.alive()):
            if isinstance(self.chain.inner, RayChain):
                self.chain.inner.close()
            self.chain.inner, self.chain.lost = self._start_chain(restart=True), None
            self.restarts += 1
        for sid, data in blobs.items():
            self.engine.session(sid, state=data)

    def layer_pids(self) -> list[int]:
        """Worker process ids of the later stages' actors (empty in-process)."""
        return self.chain.inner.pids() if isinstance(self.chain.inner, RayChain) else []

    def close(self) -> None:
        super().close()  # frees every session in every stage
        if isinstance(self.chain.inner, RayChain):
            self.chain.inner.close()
