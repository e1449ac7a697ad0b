"""The KV context policy protocol (DESIGN.md contract 5).

A policy is small and side-effect free on the cache: it looks at one layer's cache through a
`CacheView` and returns a `Keep` (which logical token slots survive, and at which RoPE positions).
The cache applies the decision: dropped slots are handed to `CachePolicy.evicted` first (the place
to fold them into a compressive memory or keep them on host for retrieval), then freed, whole
blocks returning to the pool.

RoPE rule: keys in the cache are stored already rotated at their `rope_positions`. A policy that
re-assigns positions (StreamingLLM keeps them contiguous inside the cache) returns new
`rope_positions`; the cache re-rotates the kept keys by the position delta, and new tokens
continue at `next_rope_position`. Attention over what is kept, at the assigned positions, then
equals dense attention over exactly those keys at those positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

import torch


Rotate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CacheView:
    """One layer of one session's cache, in logical (kept) order.

    keys, values: `[Hkv, T, D]` (keys rotated at `rope_positions`); views where the storage allows.
    positions: `[T]` int64 original absolute token positions (0 = first token fed to the session).
    rope_positions: `[T]` int64 positions the keys are rotated at.
    key_mass: `[Hkv, T]` fp32 attention mass each key received since the last decision (summed
        over the new queries and the query heads of its group), or None unless the policy sets
        `needs_key_mass`.
    n_new: tokens appended since the last decision (the last `n_new` slots).
    block_size: tokens per cache block (policies that keep whole blocks align to it).
    rotate: `rotate(keys [H, T, D], delta [T]) -> keys` re-rotates rotated keys by a RoPE position
        delta (the model's RoPE); None where the caller has no model (plain unit tests).
    """

    layer: int
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    rope_positions: torch.Tensor
    key_mass: torch.Tensor | None
    n_new: int
    block_size: int
    rotate: Rotate | None = None

    @property
    def length(self) -> int:
        return int(self.positions.shape[0])


@dataclass(frozen=True)
class Keep:
    """A policy's decision for one layer.

    indices: `[T']` int64 ascending logical slots to keep, or None to keep everything.
    rope_positions: `[T']` int64 new RoPE positions of the kept slots, or None to leave them.
    next_rope_position: RoPE position for the next appended token, or None for
        `max(kept rope_positions) + 1` (i.e. continue after the last kept key).
    """

    indices: torch.Tensor | None = None
    rope_positions: torch.Tensor | None = None
    next_rope_position: int | None = None

    @property
    def keeps_all(self) -> bool:
        return self.indices is None and self.rope_positions is None


KEEP_ALL = Keep()


@runtime_checkable
class CachePolicy(Protocol):
    """What the cache asks of a policy.

    name: registry name (`Engine.load(policy=name)`).
    needs_key_mass: ask attention for `return_key_mass=True` (costs a little; off for most).
    bounded: False for policies that never evict (the cache then skips `decide` entirely).
    """

    name: ClassVar[str]
    needs_key_mass: ClassVar[bool]
    bounded: ClassVar[bool]

    def decide(self, view: CacheView) -> Keep: ...

    def evicted(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
                positions: torch.Tensor) -> None:
        """Slots about to be freed (`keys, values [Hkv, E, D]`, `positions [E]`)."""
        ...

    def config(self) -> dict[str, Any]:
        """JSON-serialisable parameters (saved with the session)."""
        ...


class PolicyBase:
    """Convenience base: no key mass, no-op eviction hook, parameters from dataclass fields.

    Two optional model-side hooks (checked with `getattr`, so plain `CachePolicy`s need neither):
    - `observes_queries`: the model calls `observe(layer, q, q_rope_positions)` with each step's
      rotated queries `[Hq, n, D]` (SnapKV's observation window).
    - `extends_attention`: the model calls `extend(layer, q, q_rope_positions, out, lse, rotate)`
      with the attention over the kept keys (`out [Hq, n, D]`, `lse [Hq, n]`) and uses what it
      returns `[Hq, n, D]`: keys kept outside the cache (pooled blocks, retrieved host blocks,
      a compressive memory) enter here, merged through the lse or gated.
    `host_nbytes()` counts state a policy holds outside the paged cache (retrieval's host blocks).
    """

    name: ClassVar[str] = "base"
    needs_key_mass: ClassVar[bool] = False
    bounded: ClassVar[bool] = True
    observes_queries: ClassVar[bool] = False
    extends_attention: ClassVar[bool] = False

    def observe(self, layer: int, q: torch.Tensor, q_rope_positions: torch.Tensor) -> None:
        return None

    def extend(self, layer: int, q: torch.Tensor, q_rope_positions: torch.Tensor, out: torch.Tensor,
               lse: torch.Tensor, rotate: Rotate) -> torch.Tensor:
        return out

    def host_nbytes(self) -> int:
        return 0

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What the policy holds beyond its parameters (saved with the session), by name."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what `state_tensors` returned (on a fresh policy with the same parameters)."""
        if tensors:
            raise ValueError(f"policy {self.name!r} holds no state, got {sorted(tensors)[:3]}")

    def decide(self, view: CacheView) -> Keep:  # pragma: no cover - abstract
        raise NotImplementedError

    def evicted(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
                positions: torch.Tensor) -> None:
        return None

    def config(self) -> dict[str, Any]:
        return {"name": self.name}
