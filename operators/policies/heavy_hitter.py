"""`heavy_hitter` (H2O): the `heavy` tokens with the largest accumulated attention + a recent window.

Attention mass is accumulated per key over every query since it entered the cache (summed over
heads; the model computes it blockwise, `return_key_mass=True`). RoPE rule: positions inside the
cache, as StreamingLLM: the kept slots (in stream order) sit at 0..n-1, new tokens continue at n.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from streamctx.operators.policies._bounded import BoundedPolicy, check_non_negative, check_positive
from streamctx.operators.policies.base import KEEP_ALL, CacheView, Keep


@dataclass
class HeavyHitterPolicy(BoundedPolicy):
    name: ClassVar[str] = "heavy_hitter"
    needs_key_mass: ClassVar[bool] = True
    heavy: int = 512
    recent: int = 512
    slack: int = 64

    def __post_init__(self) -> None:
        check_positive(recent=self.recent)
        check_non_negative(heavy=self.heavy, slack=self.slack)

    @property
    def capacity(self) -> int:
        return self.heavy + self.recent

    def decide(self, view: CacheView) -> Keep:
        if not self.over(view):
            return KEEP_ALL
        old = view.length - self.recent
        mass = view.key_mass
        score = torch.zeros(old) if mass is None else mass[:, :old].float().sum(0).cpu()
        # Ties (e.g. no mass yet) go to the earlier token: stable and deterministic.
        top = torch.sort(torch.topk(score - torch.arange(old) * 1e-12, min(self.heavy, old)).indices).values
        idx = torch.cat([top, torch.arange(old, view.length)])
        return Keep(idx, torch.arange(idx.numel()), idx.numel())
