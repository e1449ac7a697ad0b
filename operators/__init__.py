"""Attention, state-space and memory operators: pure functions of (input, state).

Operators know nothing of sessions, Ray or config files. Each fast path has a plain reference
with the same signature in the `naive` module beside it (e.g. `streamctx.operators.attn.naive`).

Families (subpackages): `attn` (blockwise exact attention, lse merge, sparse patterns,
hierarchical attention), `ssm` (selective scan), `linear` (linear attention), `memory`
(compressive memory), `policies` (KV context policies). Their public names are re-exported here
lazily, so importing one family does not import the others.
"""

from __future__ import annotations

import importlib
from typing import Any

_FAMILIES = ("attn", "ssm", "linear", "memory", "policies")


def __getattr__(name: str) -> Any:
    for family in _FAMILIES:
        try:
            module = importlib.import_module(f"{__name__}.{family}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{family}":
                continue
            raise
        if name in getattr(module, "__all__", ()):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    names: list[str] = []
    for family in _FAMILIES:
        try:
            names.extend(getattr(importlib.import_module(f"{__name__}.{family}"), "__all__", ()))
        except ModuleNotFoundError:
            continue
    return sorted(names)
