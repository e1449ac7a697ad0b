"""`sink_window` (StreamingLLM): the first `sinks` tokens plus a recent window.

RoPE rule: positions are assigned inside the cache. The kept slots sit at 0..n-1 in order and new
tokens continue at n, so no query or key ever leaves `[0, sinks + window + slack + chunk)`, however
long the stream (the model stays inside its trained context).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from streamctx.operators.policies._bounded import BoundedPolicy, check_non_negative, check_positive, sinks_and_recent
from streamctx.operators.policies.base import KEEP_ALL, CacheView, Keep


@dataclass
class SinkWindowPolicy(BoundedPolicy):
    """sinks `[s]` + the last `window` tokens; evicts when a layer grows `slack` past that."""

    name: ClassVar[str] = "sink_window"
    sinks: int = 4
    window: int = 1020
    slack: int = 64

    def __post_init__(self) -> None:
        check_positive(window=self.window)
        check_non_negative(sinks=self.sinks, slack=self.slack)

    @property
    def capacity(self) -> int:
        return self.sinks + self.window

    def decide(self, view: CacheView) -> Keep:
        if not self.over(view):
            return KEEP_ALL
        idx = sinks_and_recent(view.length, self.sinks, self.window)
        return Keep(idx, torch.arange(idx.numel()), idx.numel())
