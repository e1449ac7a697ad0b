"""A Llama-family decoder split into layer ranges (pipeline stages) that may live in other processes.

    ranges = split_layers(num_layers, parts)           # e.g. 6 layers, 2 parts -> [range(0, 3), range(3, 6)]
    first = PipelinedLlama(model, ranges, chain)       # embed + ranges[0] + head; the Engine's model
    chain = LocalChain([LayerStage(m_k, ranges[k], policy) for k in 1..])   # or a Ray actor chain

`PipelinedLlama` has the model interface `Engine` uses (`new_state`, `forward`, `apply_policy`,
...): it embeds the ids, runs its own layer range, hands the hidden states to the `chain` of
later ranges and runs the head on what comes back. A `LayerStage` runs one later range over
per-session caches that hold only its layers (its own `BlockPool`), keyed by the session's pipeline
key, and applies its own instance of the session's KV policy after each step.

Hidden states cross stage boundaries as numpy arrays (`Hidden`): Ray moves them through its
object store without pickling tensors. bf16/fp16 travel bit-exactly as 16-bit integer views.

Outputs equal the unsplit model: every layer does the same arithmetic on the same inputs.
Policies see layer indices local to their stage; policies whose decisions depend on the layer's
index in the whole model would need that offset (none of the built-in ones at the time of writing).

State as data: `PipelinedLlama.state_to_blob` gathers a session from every stage (`Chain.save`):
the first range's K/V/positions as tensors, each later stage's part (its layers' cache and its
own policy instance's state, a `StateBlob` of kind `llama.layers`) as safetensors bytes inside, and
the split in the metadata; `state_from_blob` pushes the parts back (`Chain.load`). Both bit-exact.
A session saved by a model split one way restores only into a model split the same way.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Protocol, Sequence

import numpy as np
import torch

from streamctx.kv.cache import LayerTable, SessionKV
from streamctx.kv.pool import BlockPool
from streamctx.model.llama import LlamaModel
from streamctx.operators.policies import CachePolicy, make_policy
from streamctx.state import StateBlob

__all__ = ["Hidden", "LayerStage", "LocalChain", "PipelineState", "PipelinedLlama", "split_layers"]

_INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16}
PART_KIND = "llama.layers"  # one later stage's share of a session


def split_layers(num_layers: int, parts: int) -> list[range]:
    """`parts` consecutive layer ranges covering `num_layers`, sizes differing by at most one
    (earlier ranges get the extra layers)."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if parts > num_layers:
        raise ValueError(f"cannot split {num_layers} layers into {parts} stages (at most one stage per layer)")
    base, extra = divmod(num_layers, parts)
    out, a = [], 0
    for k in range(parts):
        b = a + base + (k < extra)
        out.append(range(a, b))
        a = b
    return out


@dataclass
class Hidden:
    """Hidden states `[N, H]` in transit: a numpy array plus the torch dtype it stands for, and
    per session the state bytes each stage reports back (summed along the chain)."""

    array: np.ndarray
    dtype: str
    state_bytes: list[int] = field(default_factory=list)

    @classmethod
    def from_tensor(cls, x: torch.Tensor, state_bytes: list[int] | None = None) -> "Hidden":
        t = x.detach().to("cpu").contiguous()
        view = _INT_VIEW.get(t.dtype)
        arr = (t.view(view) if view is not None else t).numpy()
        return cls(arr, str(t.dtype).removeprefix("torch."), list(state_bytes or []))

    def to_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        dtype = getattr(torch, self.dtype)
        t = torch.from_numpy(np.ascontiguousarray(self.array))
        if dtype in _INT_VIEW:
            t = t.view(dtype)
        return t.to(device)


def _keep_layers(model: LlamaModel, layers: range) -> None:
    """Drop the weights of layers outside `layers` (the stage owns `model`; indices stay global)."""
    model.layers = [layer if i in layers else None for i, layer in enumerate(model.layers)]  # type: ignore[misc]
    model._packed = model._layer_weights = None  # packed weights and pointers: rebuilt for the kept layers


def _layer_nbytes(model: LlamaModel, layers: range) -> int:
    return sum(t.numel() * t.element_size() for i in layers for t in model.layers[i].tensors())


def _kv_tensors(state: SessionKV) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A cache's kept K/V `[Hkv, T, D]` and positions `[T]` per layer (its own layer indexes), in
    logical order, plus its counters: what `_kv_load` needs to rebuild it bit for bit."""
    tensors: dict[str, torch.Tensor] = {}
    for j in range(len(state.layers)):
        k, v = state.kv(j)
        pos, rpos = state.positions(j)
        tensors[f"k.{j}"], tensors[f"v.{j}"] = k.contiguous(), v.contiguous()
        tensors[f"pos.{j}"], tensors[f"rope_pos.{j}"] = pos.contiguous(), rpos.contiguous()
        mass = state.key_mass[j]
        if mass is not None:
            tensors[f"key_mass.{j}"] = mass
    meta = {"n_fed": state.n_fed, "next_rope": [t.next_rope for t in state.layers], "n_new": list(state.n_new)}
    return tensors, meta


@torch.inference_mode()  # writes into pool tensors that forward may have grown (inference tensors)
def _kv_load(pool: BlockPool, model: LlamaModel, tensors: Mapping[str, torch.Tensor],
             meta: Mapping[str, Any]) -> SessionKV:
    """The cache `_kv_tensors` described, in new blocks of `pool`."""
    c, dev = model.config, model.device
    state = SessionKV(pool)
    want = (c.num_kv_heads, c.head_dim)
    for j in range(pool.num_layers):
        k = tensors.get(f"k.{j}")
        if k is None or k.dim() != 3 or (k.shape[0], k.shape[2]) != want:
            state.free()
            raise ValueError(f"session state does not fit this stage: layer {j} keys "
                             f"{None if k is None else list(k.shape)}, expected [{want[0]}, T, {want[1]}]")
        state.append(j, k.to(dev, model.dtype), tensors[f"v.{j}"].to(dev, model.dtype),
                     tensors[f"pos.{j}"].to(dev), tensors[f"rope_pos.{j}"].to(dev))
        state.layers[j].next_rope = int(meta["next_rope"][j])
        mass = tensors.get(f"key_mass.{j}")
        state.key_mass[j] = None if mass is None else mass.to(dev)
    state.n_fed = int(meta["n_fed"])
    state.n_new = [int(n) for n in meta["n_new"]]
    return state


def _u8(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


class LayerStage:
    """One later layer range of a split model: per-session caches holding only its layers."""

    def __init__(self, model: LlamaModel, layers: range, policy: str | Mapping[str, Any] = "full",
                 *, block_size: int = 64) -> None:
        if not isinstance(model, LlamaModel):
            raise NotImplementedError(f"a pipeline split needs a Llama-family model, got {type(model).__name__}")
        c = model.config
        self.model = model
        self.layers = layers
        self.policy_spec = policy
        make_policy(policy)  # a bad spec fails at startup
        _keep_layers(model, layers)
        self.pool = BlockPool(len(layers), c.num_kv_heads, c.head_dim, block_size=block_size,
                              dtype=model.dtype, device=model.device)
        self.caches: dict[str, SessionKV] = {}
        self.policies: dict[str, CachePolicy] = {}

    def forward(self, keys: Sequence[str], hidden: Hidden, lens: Sequence[int], key_mass: bool = False) -> Hidden:
        """Run this range over `hidden [N, H]` (sessions `keys`, `lens[i]` rows each, in order)."""
        caches = [self._cache(k) for k in keys]
        x = hidden.to_tensor(self.model.device)
        x = self.model.forward_layers(caches, x, lens, layers=self.layers, key_mass=key_mass)
        for key, cache in zip(keys, caches):
            policy = self.policies[key]
            if policy.bounded:
                self.model.apply_policy(cache, policy)
        nbytes = [c.nbytes() for c in caches]
        prev = hidden.state_bytes or [0] * len(caches)
        return Hidden.from_tensor(x, [a + b for a, b in zip(prev, nbytes)])

    def _cache(self, key: str) -> SessionKV:
        cache = self.caches.get(key)
        if cache is None:
            cache = self.caches[key] = SessionKV(self.pool)
            self.policies[key] = make_policy(self.policy_spec)
        return cache

    def free(self, key: str) -> None:
        cache = self.caches.pop(key, None)
        self.policies.pop(key, None)
        if cache is not None:
            cache.free()

    def stats(self) -> dict[str, int]:
        """Live sessions and the bytes of their caches (both return to zero once all are freed)."""
        return {"live_sessions": len(self.caches), "state_bytes": sum(c.nbytes() for c in self.caches.values()),
                "blocks_used": self.pool.blocks_used(), "weight_bytes": _layer_nbytes(self.model, self.layers)}

    # -- state as data ----------------------------------------------------------------------------
    def save(self, keys: Sequence[str]) -> dict[str, bytes]:
        """Each session's share held here (`StateBlob` bytes of kind `llama.layers`): its layers'
        kept K/V/positions and counters, and its policy instance's state. A key this stage has
        not seen yet (a session never stepped) saves as an empty share."""
        out = {}
        for key in keys:
            cache = self.caches.get(key)
            if cache is None:
                tensors, meta = _kv_tensors(SessionKV(self.pool))
                policy_state: dict[str, torch.Tensor] = {}
            else:
                tensors, meta = _kv_tensors(cache)
                policy_state = getattr(self.policies[key], "state_tensors", dict)()
            tensors.update({f"policy.{name}": t for name, t in policy_state.items()})
            meta["layers"] = [self.layers.start, self.layers.stop]
            meta["policy"] = make_policy(self.policy_spec).config()
            out[key] = StateBlob(PART_KIND, tensors, meta).to_bytes()
        return out

    def load(self, key: str, data: bytes) -> int:
        """Replace session `key` here by a share `save` wrote (bit-exact); its state bytes."""
        blob = StateBlob.from_bytes(data, expect_kind=PART_KIND)
        span = [self.layers.start, self.layers.stop]
        if blob.meta.get("layers") != span:
            raise ValueError(f"layer-stage state of layers {blob.meta.get('layers')} given to the stage of layers {span}")
        policy = make_policy(self.policy_spec)
        if blob.meta.get("policy") != policy.config():
            raise ValueError(f"layer-stage state saved with policy {blob.meta.get('policy')}; "
                             f"this stage runs {policy.config()}")
        self.free(key)
        if not blob.meta["n_fed"]:
            return 0  # never stepped: created on its first forward, as in an uninterrupted run
        cache = _kv_load(self.pool, self.model, blob.tensors, blob.meta)
        policy_state = {k[len("policy."):]: t for k, t in blob.tensors.items() if k.startswith("policy.")}
        try:
            getattr(policy, "load_state_tensors", lambda t: None)(policy_state)
        except (KeyError, ValueError):
            cache.free()
            raise
        if policy.bounded:  # bound by `apply_policy` after the first step of an uninterrupted run
            cache.policy = policy
        self.caches[key], self.policies[key] = cache, policy
        return cache.nbytes()


class Chain(Protocol):
    """The later layer ranges, in order (in-process or remote)."""

    def forward(self, keys: Sequence[str], hidden: Hidden, lens: Sequence[int], key_mass: bool) -> Hidden: ...

    def free(self, key: str) -> None: ...

    def save(self, keys: Sequence[str]) -> list[dict[str, bytes]]:
        """Per later stage, in order: each session's share (`LayerStage.save`)."""
        ...

    def load(self, key: str, parts: Sequence[bytes]) -> int:
        """Put session `key`'s shares back, one per later stage (`LayerStage.load`); their bytes."""
        ...


class LocalChain:
    """Later layer ranges in this process (tests, the local runner)."""

    def __init__(self, stages: Sequence[LayerStage]) -> None:
        self.stages = list(stages)

    def forward(self, keys: Sequence[str], hidden: Hidden, lens: Sequence[int], key_mass: bool) -> Hidden:
        for st in self.stages:
            hidden = st.forward(keys, hidden, lens, key_mass)
        return hidden

    def free(self, key: str) -> None:
        for st in self.stages:
            st.free(key)

    def stats(self) -> list[dict[str, int]]:
        return [st.stats() for st in self.stages]

    def save(self, keys: Sequence[str]) -> list[dict[str, bytes]]:
        return [st.save(keys) for st in self.stages]

    def load(self, key: str, parts: Sequence[bytes]) -> int:
        if len(parts) != len(self.stages):
            raise ValueError(f"session state has {len(parts)} later-stage shares; this chain has {len(self.stages)} stages")
        return sum(st.load(key, p) for st, p in zip(self.stages, parts))


class PipelineState:
    """A session of a split model: the first range's cache here, the others' under `key` in the chain.

    `remote_bytes`: the later stages' state bytes, as they reported after the last step.
    """

    def __init__(self, key: str, local: SessionKV) -> None:
        self.key = key
        self.local = local
        self.remote_bytes = 0

    @property
    def n_fed(self) -> int:
        return self.local.n_fed

    @property
    def layers(self) -> list[LayerTable]:
        """The first range's layer tables (what the dataflow reads as the cached token count)."""
        return self.local.layers

    @property
    def policy(self) -> Any:
        """The session's policy as bound to the first range's cache (a restored session binds it here)."""
        return self.local.policy

    @policy.setter
    def policy(self, policy: Any) -> None:
        self.local.policy = policy


class PipelinedLlama:
    """The model `Engine` sees for a split Llama: embeddings, the first layer range and the head
    here, the later ranges behind `chain`."""

    kind = "llama"

    def __init__(self, model: LlamaModel, ranges: Sequence[range], chain: Chain, *, block_size: int = 64) -> None:
        if not isinstance(model, LlamaModel):
            raise NotImplementedError(f"a pipeline split needs a Llama-family model, got {type(model).__name__}")
        if [r.start for r in ranges[1:]] != [r.stop for r in ranges[:-1]] or ranges[0].start != 0 \
                or ranges[-1].stop != model.config.num_layers:
            raise ValueError(f"layer ranges {list(ranges)} do not cover the model's {model.config.num_layers} layers")
        c = model.config
        self.model = model
        self.config = c
        self.dtype, self.device = model.dtype, model.device
        self.ranges = list(ranges)
        self.chain = chain
        _keep_layers(model, self.ranges[0])
        self.pool = BlockPool(len(self.ranges[0]), c.num_kv_heads, c.head_dim, block_size=block_size,
                              dtype=model.dtype, device=model.device)
        self._keys = itertools.count()
        self._fetched: dict[str, tuple[int, list[bytes]]] = {}  # key -> (n_fed, shares) fetched by `saving`

    # -- sessions ---------------------------------------------------------------------------------
    def new_state(self) -> PipelineState:
        return PipelineState(f"s{next(self._keys)}", SessionKV(self.pool))

    def state_nbytes(self, state: PipelineState) -> int:
        return state.local.nbytes() + state.remote_bytes

    def free_state(self, state: PipelineState) -> None:
        state.local.free()
        if state.remote_bytes or state.n_fed:
            self.chain.free(state.key)
        state.remote_bytes = 0

    def weight_nbytes(self) -> int:
        """Weights held by this stage (embeddings, first range, head); later stages report their own."""
        m = self.model
        heads = {t.data_ptr(): t.numel() * t.element_size() for t in (m.embed, m.lm_head, m.norm)}
        return sum(heads.values()) + _layer_nbytes(m, self.ranges[0])

    @torch.inference_mode()
    def apply_policy(self, state: PipelineState, policy: CachePolicy) -> None:
        """The first range's cache; later stages apply their own instance of the policy each step."""
        self.model.apply_policy(state.local, policy)

    # -- forward ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, batch: Sequence[tuple[PipelineState, torch.Tensor]], *,
                all_logits: Sequence[bool] | bool = False, key_mass: bool = False) -> list[torch.Tensor]:
        """`LlamaModel.forward` through the stages: per session `[T_i, V]` or `[V]` logits."""
        flags = [all_logits] * len(batch) if isinstance(all_logits, bool) else list(all_logits)
        lens = [int(ids.shape[0]) for _, ids in batch]
        ids = batch[0][1] if len(batch) == 1 else torch.cat([ids for _, ids in batch])
        states = [s for s, _ in batch]
        x = self.model.embed_ids(ids)
        x = self.model.forward_layers([s.local for s in states], x, lens, layers=self.ranges[0], key_mass=key_mass)
        out = self.chain.forward([s.key for s in states], Hidden.from_tensor(x), lens, key_mass)
        for s, nbytes in zip(states, out.state_bytes):
            s.remote_bytes = nbytes
        return self.model.head(out.to_tensor(self.device), lens, flags)

    # -- state as data ----------------------------------------------------------------------------
    def split(self) -> list[list[int]]:
        return [[r.start, r.stop] for r in self.ranges]

    @contextmanager
    def saving(self, states: Sequence[PipelineState]) -> Iterator[None]:
        """Fetch the later stages' shares of `states` in one call per stage, for the
        `state_to_blob` calls inside (a checkpoint saves every session: one round trip per stage,
        not one per session and stage)."""
        keys = [s.key for s in states]
        per_stage = self.chain.save(keys)
        self._fetched = {s.key: (s.n_fed, [shares[s.key] for shares in per_stage]) for s in states}
        try:
            yield
        finally:
            self._fetched = {}

    def state_to_blob(self, state: PipelineState) -> StateBlob:
        """The whole session: the first range's K/V/positions and counters as tensors (`k.{j}` ...,
        layer j of the first range), each later stage's share as bytes (`stage.{k}`, uint8), and
        the split (`meta["pipeline"]`). Bit-exact."""
        n_fed, parts = self._fetched.get(state.key, (-1, []))
        if n_fed != state.n_fed:  # not fetched ahead, or stepped since (`Session.save` feeds pending tokens first)
            parts = [shares[state.key] for shares in self.chain.save([state.key])]
        tensors, meta = _kv_tensors(state.local)
        for k, data in enumerate(parts, start=1):
            tensors[f"stage.{k}"] = _u8(data)
        meta["pipeline"] = self.split()
        return StateBlob("llama.session", tensors, meta)

    def state_from_blob(self, blob: StateBlob) -> PipelineState:
        """A session `state_to_blob` wrote, in this model's first range and pushed to the later stages."""
        split = blob.meta.get("pipeline")
        if split != self.split():
            how = "an unsplit model" if split is None else f"a model split into layer ranges {split}"
            raise ValueError(f"session state was saved by {how}; this model is split into {self.split()}")
        parts = [blob.tensors[f"stage.{k}"].numpy().tobytes() for k in range(1, len(self.ranges))]
        local = _kv_load(self.pool, self.model, blob.tensors, blob.meta)
        state = PipelineState(f"s{next(self._keys)}", local)
        try:
            state.remote_bytes = self.chain.load(state.key, parts)
        except BaseException:
            self.free_state(state)
            raise
        return state
