"""Shared pieces of the bounded policies: parameters as dataclass fields, the eviction trigger,
and RoPE positions laid out inside the cache.

Every bounded policy keeps a fixed number of slots in the cache and evicts only once the layer has
grown `slack` tokens past it, so a decode step does not compact the cache each token. Between
decisions a layer holds at most `capacity + slack + chunk` keys (the chunk being the tokens of one
forward call): the hard cap on the KV a layer attends (`attended_cap`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from streamctx.operators.policies.base import CacheView, PolicyBase, Rotate


class PolicyConfigError(ValueError):
    """A policy parameter is out of range."""


def check_positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise PolicyConfigError(f"{name} must be a positive integer, got {v!r}")


def check_non_negative(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise PolicyConfigError(f"{name} must be a non-negative integer, got {v!r}")


class BoundedPolicy(PolicyBase):
    """Base of the bounded policies (subclasses are dataclasses)."""

    name: ClassVar[str] = "bounded"

    @property
    def capacity(self) -> int:
        """Slots a layer keeps in the cache right after a decision."""
        raise NotImplementedError

    @property
    def extra_keys(self) -> int:
        """Most keys attended from outside the cache (pooled, retrieved) per query."""
        return 0

    slack: int

    def attended_cap(self, chunk: int) -> int:
        """The most keys a query of a `chunk`-token forward call attends in one layer."""
        return self.capacity + self.slack + chunk + self.extra_keys

    def over(self, view: CacheView) -> bool:
        return view.length > self.capacity + self.slack

    def config(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}  # type: ignore[call-overload]


def sinks_and_recent(length: int, sinks: int, recent: int) -> torch.Tensor:
    """Slots `[min(sinks, L) + recent]`: the first `sinks` and the last `recent` of `length`."""
    s = min(sinks, length)
    return torch.cat([torch.arange(s), torch.arange(max(s, length - recent), length)])


def laid_out(n_sinks: int, n_rest: int, gap: int) -> torch.Tensor:
    """RoPE positions of kept slots: sinks at 0..s-1, a `gap` for keys held outside the cache, then
    the rest contiguous. `[n_sinks + n_rest]` int64."""
    return torch.cat([torch.arange(n_sinks), torch.arange(n_rest) + n_sinks + gap])


def require_rotate(view: CacheView, policy: str) -> Rotate:
    if view.rotate is None:
        raise ValueError(f"policy {policy!r} needs the model's RoPE (CacheView.rotate) to move evicted keys")
    return view.rotate


def unrotate(keys: torch.Tensor, rope_positions: torch.Tensor, rotate: Rotate) -> torch.Tensor:
    """Keys `[H, T, D]` rotated at `rope_positions [T]`, brought back to position 0 (raw keys)."""
    return rotate(keys, -rope_positions.to(torch.int64))


def grouped(q: torch.Tensor, hkv: int) -> torch.Tensor:
    """Queries `[Hq, n, D]` as `[Hkv, G, n, D]` (the G query heads sharing each KV head)."""
    return q.view(hkv, q.shape[0] // hkv, *q.shape[1:])
