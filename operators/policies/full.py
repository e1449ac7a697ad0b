"""The `full` policy: keep every token at its original position (exact full attention)."""

from __future__ import annotations

from typing import Any, ClassVar

from streamctx.operators.policies.base import KEEP_ALL, CacheView, Keep, PolicyBase


class FullPolicy(PolicyBase):
    """Never evicts; RoPE positions are the absolute positions. The cache skips `decide` for it."""

    name: ClassVar[str] = "full"
    bounded: ClassVar[bool] = False

    def decide(self, view: CacheView) -> Keep:
        return KEEP_ALL

    def config(self) -> dict[str, Any]:
        return {"name": self.name}
