"""Synthetic conversation streams for the dataflow tests."""

from __future__ import annotations

import random
from typing import Any


def conversations(n_sessions: int, turns: int, *, prefix: str = "s", end: bool = True,
                  generate_every: int = 0) -> list[list[dict[str, Any]]]:
    """Per-session record lists in turn order."""
    out = []
    for s in range(n_sessions):
        sid = f"{prefix}{s}"
        recs = []
        for t in range(turns):
            r: dict[str, Any] = {"session_id": sid, "turn": t, "role": "user" if t % 2 == 0 else "assistant",
                                 "text": f"{sid} says {t}"}
            if generate_every and t % generate_every == generate_every - 1:
                r["generate"] = True
                r["max_new_tokens"] = 3
            if end and t == turns - 1:
                r["end"] = True
            recs.append(r)
        out.append(recs)
    return out


def interleave(sessions: list[list[dict[str, Any]]], seed: int) -> list[dict[str, Any]]:
    """A random merge: sessions interleave in a shuffled arrival order, each keeps its own order."""
    rng = random.Random(seed)
    queues = [list(s) for s in sessions]
    slots = [i for i, q in enumerate(queues) for _ in q]
    rng.shuffle(slots)
    pos = [0] * len(queues)
    out = []
    for i in slots:
        out.append(queues[i][pos[i]])
        pos[i] += 1
    return out


def multi_session_stream(n_sessions: int = 20, turns: int = 25, *, seed: int = 17) -> list[dict[str, Any]]:
    """`n_sessions` x `turns` interleaved records (500 by default); every 5th turn generates 3 tokens."""
    return interleave(conversations(n_sessions, turns, generate_every=5), seed=seed)
