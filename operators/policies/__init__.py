"""KV context policies: decide which cached tokens each layer keeps, and at which RoPE positions.

`make_policy(spec)` builds a policy from a name, a preset (`speed`, `balanced`, `quality`) or a
dict `{"name": ..., **params}` (a dict may name a preset and override its sizes). Every bounded
policy keeps each layer's attended KV under `attended_cap(chunk)` however long the stream.
"""

from __future__ import annotations

from typing import Any, Mapping

from streamctx.operators.policies.base import KEEP_ALL, CachePolicy, CacheView, Keep, PolicyBase
from streamctx.operators.policies._bounded import BoundedPolicy, PolicyConfigError
from streamctx.operators.policies.compressive import CompressivePolicy
from streamctx.operators.policies.full import FullPolicy
from streamctx.operators.policies.heavy_hitter import HeavyHitterPolicy
from streamctx.operators.policies.hierarchical import HierarchicalPolicy
from streamctx.operators.policies.presets import PRESETS
from streamctx.operators.policies.retrieval import RetrievalPolicy
from streamctx.operators.policies.sink_window import SinkWindowPolicy
from streamctx.operators.policies.snapkv import SnapKVPolicy

POLICIES: dict[str, type] = {
    cls.name: cls
    for cls in (FullPolicy, SinkWindowPolicy, HeavyHitterPolicy, SnapKVPolicy, HierarchicalPolicy,
                CompressivePolicy, RetrievalPolicy)
}


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
    if name in PRESETS:
        params = {**PRESETS[name], **params}
        name = params.pop("name")
    cls = POLICIES.get(name)
    if cls is None:
        known = ", ".join([*sorted(POLICIES), *PRESETS])
        raise UnknownPolicyError(f"unknown policy {name!r}; known: {known}")
    if any(str(k).startswith("_") for k in params):
        raise UnknownPolicyError(f"bad parameters for policy {name!r}: private field in {sorted(params)}")
    try:
        return cls(**params)
    except (TypeError, ValueError) as exc:
        raise UnknownPolicyError(f"bad parameters for policy {name!r}: {exc}") from exc


__all__ = [
    "KEEP_ALL",
    "POLICIES",
    "PRESETS",
    "BoundedPolicy",
    "CachePolicy",
    "CacheView",
    "CompressivePolicy",
    "FullPolicy",
    "HeavyHitterPolicy",
    "HierarchicalPolicy",
    "PolicyConfigError",
    "RetrievalPolicy",
    "SinkWindowPolicy",
    "SnapKVPolicy",
    "Keep",
    "PolicyBase",
    "UnknownPolicyError",
    "make_policy",
]
