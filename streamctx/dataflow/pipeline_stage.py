"""The model stage split into layer stages (`model.stages: N`).

The first stage is an ordinary model stage (tokenizer, chat template, sessions, sampling) whose
model runs the embeddings, the first layer range and the head; it starts the N - 1 later layer
stages itself and calls them for every model step (one round trip per decoded token). On Ray each
later stage is an actor placed by `model.stage_resources[k]` (else `model.resources`); calls are
chained actor to actor by object reference, so hidden states (numpy, in Ray's object store) go
from stage k to k + 1 without passing through the first stage. Each stage keeps its own layers'
per-session KV cache and policy state, freed when the first stage closes the session.
In-process (the local runner), the later stages are plain objects in the same process.

Llama family only (a Mamba split is refused with a clear error at startup).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from streamctx.dataflow.model_stage import ModelStage, engine_policy
from streamctx.model.pipeline import Hidden, LayerStage, LocalChain, PipelinedLlama, split_layers

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


class RayChain:
    """Later layer stages as Ray actors; a step is one chain of actor calls, awaited at the end."""

    def __init__(self, actors: list[Any]) -> None:
        import ray

        self.ray = ray
        self.actors = actors

    def forward(self, keys: Sequence[str], hidden: Hidden, lens: Sequence[int], key_mass: bool) -> Hidden:
        ref: Any = hidden
        for a in self.actors:
            ref = a.forward.remote(list(keys), ref, list(lens), key_mass)
        return self.ray.get(ref)

    def free(self, key: str) -> None:
        for a in self.actors:  # ordered after this submitter's earlier calls to the same actor
            a.free.remote(key)

    def stats(self) -> list[dict[str, int]]:
        return self.ray.get([a.stats.remote() for a in self.actors])

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []


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
        spec = engine_policy(policy)
        device = None if model["device"] in (None, "auto") else model["device"]
        self.chain: LocalChain | RayChain
        if _in_ray_actor():
            # Half the runner's start timeout: this stage's own placement and load count against the rest.
            self.chain = self._start_actors(model, ranges[1:], spec, device, start_timeout_s / 2)
        else:
            self.chain = LocalChain([LayerStage(Engine.load(self.source, dtype=model["dtype"], device=device).model,
                                                r, spec) for r in ranges[1:]])
        self.engine = Engine(PipelinedLlama(full.model, ranges, self.chain), full.tokenizer, policy=spec,
                             prefill_chunk=full.prefill_chunk, source=full.source)
        self.ranges = ranges

    def _start_actors(self, model: dict[str, Any], ranges: Sequence[range], policy: Any,
                      device: Optional[str], timeout_s: float) -> RayChain:
        import ray

        stage_res = model["stage_resources"]
        actors = []
        for k, r in enumerate(ranges, start=1):
            res = stage_res[k] if stage_res else model["resources"]
            actors.append(ray.remote(_LayerActor).options(
                num_cpus=model["num_cpus"], resources=dict(res) or None, max_restarts=0, max_concurrency=1,
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

    def close(self) -> None:
        super().close()  # frees every session in every stage
        if isinstance(self.chain, RayChain):
            self.chain.close()
