"""`snapkv`: at the end of each fed segment, keep the tokens its observation window attends most.

The last `observe` queries of the stream (per layer, rotated as attention saw them) score the older
keys: softmax attention per query head, summed over the window and the heads, smoothed by average
pooling over `kernel` neighbours (SnapKV's clustering), and the top `capacity_selected` survive with
the recent `window`. RoPE rule: positions inside the cache (kept slots at 0..n-1, new tokens at n).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from streamctx.operators.policies._bounded import BoundedPolicy, check_non_negative, check_positive, grouped
from streamctx.operators.policies.base import KEEP_ALL, CacheView, Keep


@dataclass
class SnapKVPolicy(BoundedPolicy):
    name: ClassVar[str] = "snapkv"
    observes_queries: ClassVar[bool] = True
    selected: int = 512
    window: int = 512
    observe_window: int = 32
    kernel: int = 7
    slack: int = 64
    _queries: dict[int, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_positive(window=self.window, observe_window=self.observe_window, kernel=self.kernel)
        check_non_negative(selected=self.selected, slack=self.slack)
        if self.observe_window > self.window:
            raise ValueError(f"observe_window ({self.observe_window}) must fit in window ({self.window})")

    @property
    def capacity(self) -> int:
        return self.selected + self.window

    def config(self) -> dict:
        out = super().config()
        out.pop("_queries", None)
        return out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {str(layer): q for layer, q in self._queries.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self._queries = {int(k): t for k, t in tensors.items()}

    def observe(self, layer: int, q: torch.Tensor, q_rope_positions: torch.Tensor) -> None:
        """Remember the last `observe_window` queries `[Hq, w, D]` of `layer`."""
        prev = self._queries.get(layer)
        q = q if prev is None else torch.cat([prev, q], dim=1)
        self._queries[layer] = q[:, -self.observe_window:].detach().clone()

    def scores(self, view: CacheView) -> torch.Tensor:
        """Observation-window attention `[T]` each slot received (fp32, before pooling)."""
        q = self._queries.get(view.layer)
        if q is None:
            return torch.zeros(view.length)
        hkv, t, d = view.keys.shape
        w = q.shape[1]
        s = torch.einsum("hgid,hjd->hgij", grouped(q.float(), hkv), view.keys.float()) / math.sqrt(d)
        # Observation query i sits at slot t - w + i: it sees keys up to there.
        slot = torch.arange(t, device=s.device)
        qpos = torch.arange(t - w, t, device=s.device)
        s = s.masked_fill(slot[None, :] > qpos[:, None], float("-inf"))
        return torch.softmax(s, dim=-1).sum(dim=(0, 1, 2)).cpu()

    def decide(self, view: CacheView) -> Keep:
        if not self.over(view):
            return KEEP_ALL
        old = view.length - self.window
        score = self.scores(view)[:old]
        pooled = F.avg_pool1d(score[None, None], self.kernel, stride=1, padding=self.kernel // 2,
                              count_include_pad=False)[0, 0, :old]
        top = torch.sort(torch.topk(pooled - torch.arange(old) * 1e-12, min(self.selected, old)).indices).values
        idx = torch.cat([top, torch.arange(old, view.length)])
        return Keep(idx, torch.arange(idx.numel()), idx.numel())
