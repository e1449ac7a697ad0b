"""KV context policies: decide which cached tokens each layer keeps, and at which RoPE positions.

`make_policy(spec)` builds a policy from a name or a dict `{"name": ..., **params}`; policies
register themselves in `POLICIES`.
"""

from __future__ import annotations

from typing import Any, Mapping

from streamctx.operators.policies.base import KEEP_ALL, CachePolicy, CacheView, Keep, PolicyBase
from streamctx.operators.policies.full import FullPolicy

POLICIES: dict[str, type] = {"full": FullPolicy}


class UnknownPolicyError(ValueError):
    """A policy name (or its parameters) is not recognised."""


def make_policy(spec: str | Mapping[str, Any] | CachePolicy) -> CachePolicy:
    """A policy from a name (`"full"`), a dict (`{"name": "full", ...params}`) or an instance."""
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, Mapping):
        params = dict(spec)
        name = params.pop("name", None)
        if not isinstance(name, str):
            raise UnknownPolicyError(f"policy dict needs a 'name' string, got {spec!r}")
    elif isinstance(spec, CachePolicy):
        return spec
    else:
        raise UnknownPolicyError(f"policy must be a name, a dict or a CachePolicy, got {type(spec).__name__}")
    cls = POLICIES.get(name)
    if cls is None:
        raise UnknownPolicyError(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    try:
        return cls(**params)
    except TypeError as exc:
        raise UnknownPolicyError(f"bad parameters for policy {name!r}: {exc}") from exc


__all__ = [
    "KEEP_ALL",
    "POLICIES",
    "CachePolicy",
    "CacheView",
    "FullPolicy",
    "Keep",
    "PolicyBase",
    "UnknownPolicyError",
    "make_policy",
]
