"""Step scheduler for continuous batching: which sessions run together in the next model step.

Numbers in, decisions out (no model imports). Each step the caller lists what every session with
work wants (`Demand`: one decode token, or a prefill of new input) and the scheduler grants a
subset that fits the step's token budget, its session cap and its memory budget:

- Order: effective priority first, `priority + steps_waited // aging` (aging lifts a waiting
  session one level every `aging` steps, so none starves behind a stream of higher priorities);
  then decodes before prefills (a generating session's next token is the latency users see);
  then longest waiting; then least recently granted; then arrival order. With equal priorities
  this is round-robin.
- Token budget: a decode costs 1 token; a prefill costs its granted chunk (at most
  `prefill_chunk`). A splittable prefill takes what is left of the budget; an atomic one
  (`split=False`: the caller needs fixed chunk boundaries, e.g. to match one-at-a-time results
  under a bounded KV policy) runs whole or waits.
- Memory budget: the granted sessions' state bytes plus their growth this step
  (`tokens * bytes_per_token`) stay within `memory_budget`.
- Progress: the first session in order is always granted (alone if it alone exceeds a budget),
  so every step runs something while any demand exists.
- Continuous: sessions join by appearing in a step's demands and leave by disappearing; the
  scheduler forgets sessions that have no demand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

__all__ = ["Demand", "Grant", "StepScheduler"]


@dataclass(frozen=True)
class Demand:
    """What one session wants from the next step.

    prefill: tokens of new input waiting (0 for a decode step).
    decode: True when the session wants one decode token (then `prefill` must be 0).
    split: whether a prefill may be granted fewer tokens than `min(prefill, prefill_chunk)`.
    state_bytes: bytes the session's state holds now; bytes_per_token: its growth per token.
    """

    session_id: str
    prefill: int = 0
    decode: bool = False
    priority: int = 0
    split: bool = True
    state_bytes: int = 0
    bytes_per_token: int = 0

    def __post_init__(self) -> None:
        if self.prefill < 0:
            raise ValueError(f"Demand.prefill must be >= 0, got {self.prefill}")
        if self.decode == (self.prefill > 0):
            raise ValueError(f"Demand for {self.session_id!r} must be either decode=True or prefill > 0 "
                             f"(got decode={self.decode}, prefill={self.prefill})")
        if self.state_bytes < 0 or self.bytes_per_token < 0:
            raise ValueError(f"Demand bytes must be >= 0, got state_bytes={self.state_bytes}, "
                             f"bytes_per_token={self.bytes_per_token}")


@dataclass(frozen=True)
class Grant:
    """One session's share of a step: `tokens` to run (1 for a decode)."""

    session_id: str
    tokens: int
    kind: Literal["decode", "prefill"]


class StepScheduler:
    """Picks each step's batch; remembers only how long each session has waited and its arrival."""

    def __init__(self, token_budget: int = 512, *, max_sessions: int = 64, prefill_chunk: int = 512,
                 memory_budget: int | None = None, aging: int = 4) -> None:
        for name, value in (("token_budget", token_budget), ("max_sessions", max_sessions),
                            ("prefill_chunk", prefill_chunk), ("aging", aging)):
            if value < 1:
                raise ValueError(f"StepScheduler {name} must be >= 1, got {value}")
        if memory_budget is not None and memory_budget < 0:
            raise ValueError(f"StepScheduler memory_budget must be >= 0, got {memory_budget}")
        self.token_budget = token_budget
        self.max_sessions = max_sessions
        self.prefill_chunk = prefill_chunk
        self.memory_budget = memory_budget
        self.aging = aging
        self._waited: dict[str, int] = {}  # steps since the session last ran (or arrived)
        self._arrival: dict[str, int] = {}
        self._arrivals = 0
        self._last_grant: dict[str, int] = {}  # sequence number of the session's latest grant
        self._grants = 0

    def waited(self, session_id: str) -> int:
        """Steps `session_id` has waited with a demand since it last ran (0 if unknown)."""
        return self._waited.get(session_id, 0)

    def order(self, demands: Sequence[Demand]) -> list[Demand]:
        """Demands in the order the scheduler considers them (see the module docstring)."""
        for d in demands:
            if d.session_id not in self._arrival:
                self._arrival[d.session_id] = self._arrivals
                self._arrivals += 1
        return sorted(demands, key=lambda d: (-(d.priority + self._waited.get(d.session_id, 0) // self.aging),
                                              not d.decode, -self._waited.get(d.session_id, 0),
                                              self._last_grant.get(d.session_id, -1),
                                              self._arrival[d.session_id]))

    def step(self, demands: Sequence[Demand]) -> list[Grant]:
        """Grant this step's batch (in the order considered) and age every session left waiting."""
        ids = [d.session_id for d in demands]
        if len(set(ids)) != len(ids):
            raise ValueError("StepScheduler.step: one demand per session per step")
        tokens_left = self.token_budget
        mem_left = self.memory_budget
        grants: list[Grant] = []
        for d in self.order(demands):
            if len(grants) == self.max_sessions or tokens_left <= 0:
                break
            want = 1 if d.decode else min(d.prefill, self.prefill_chunk)
            n = want if not d.split else min(want, tokens_left)
            if grants and n > tokens_left:
                continue  # an atomic chunk that does not fit: a smaller demand may
            need = d.state_bytes + n * d.bytes_per_token
            if grants and mem_left is not None and need > mem_left:
                continue
            grants.append(Grant(d.session_id, n, "decode" if d.decode else "prefill"))
            tokens_left -= n
            if mem_left is not None:
                mem_left -= need
        for g in grants:
            self._last_grant[g.session_id] = self._grants
            self._grants += 1
        granted = {g.session_id for g in grants}
        self._waited = {sid: 0 if sid in granted else self._waited.get(sid, 0) + 1 for sid in ids}
        self._arrival = {sid: self._arrival[sid] for sid in ids}
        self._last_grant = {sid: n for sid, n in self._last_grant.items() if sid in self._arrival}
        return grants
