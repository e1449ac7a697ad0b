"""Placement policies: which sessions leave a full tier first.

A policy is small and side-effect free: given the tier's evictable entries and what the dataflow
runtime says is queued next, it returns them in eviction order (first = evict first). Policies
compose by wrapping a tie-breaker: ``Lookahead(Priority(LRU()))``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence


@dataclass(frozen=True)
class Entry:
    """What a policy may know about one session's state in a tier."""

    session_id: str
    nbytes: int
    last_used: int  # logical clock of the last get/admit (larger = more recent)
    priority: int = 0  # larger = more important to keep


@dataclass(frozen=True)
class PolicyContext:
    """upcoming: session id -> position in the queue of pending records (0 = next)."""

    upcoming: Mapping[str, int] = field(default_factory=dict)
    now: int = 0


class PlacementPolicy(Protocol):
    def eviction_order(self, entries: Sequence[Entry], ctx: PolicyContext) -> list[Entry]:
        ...


class LRU:
    """Least recently used first."""

    def eviction_order(self, entries: Sequence[Entry], ctx: PolicyContext) -> list[Entry]:
        return sorted(entries, key=lambda e: (e.last_used, e.session_id))


class SizeAware:
    """Largest idle footprint first: age x bytes (frees the most memory per move, keeps small hot state)."""

    def eviction_order(self, entries: Sequence[Entry], ctx: PolicyContext) -> list[Entry]:
        return sorted(entries, key=lambda e: (-(ctx.now - e.last_used + 1) * e.nbytes, e.session_id))


@dataclass(frozen=True)
class Priority:
    """Lowest priority first; `then` orders sessions of equal priority."""

    then: PlacementPolicy = field(default_factory=LRU)

    def eviction_order(self, entries: Sequence[Entry], ctx: PolicyContext) -> list[Entry]:
        ordered = self.then.eviction_order(entries, ctx)
        rank = {e.session_id: i for i, e in enumerate(ordered)}
        return sorted(entries, key=lambda e: (e.priority, rank[e.session_id]))


@dataclass(frozen=True)
class Lookahead:
    """Sessions with nothing queued first (ordered by `then`), then queued ones, farthest next use first.

    With the full queue known this is Belady's rule for the queued part.
    """

    then: PlacementPolicy = field(default_factory=LRU)

    def eviction_order(self, entries: Sequence[Entry], ctx: PolicyContext) -> list[Entry]:
        idle = [e for e in entries if e.session_id not in ctx.upcoming]
        queued = sorted(
            (e for e in entries if e.session_id in ctx.upcoming),
            key=lambda e: (-ctx.upcoming[e.session_id], e.session_id),
        )
        return self.then.eviction_order(idle, ctx) + queued
