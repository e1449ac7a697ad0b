"""`hierarchical`: recent tokens exact, older ones pooled into blocks at decreasing resolution.

Evicted tokens (in stream order, `group` at a time) become level-0 summaries: the mean of their
raw keys and values, weighted by the tokens they stand for. When a level holds more than
`per_level` summaries, its oldest `factor` merge into one summary of the next level; the top
level drops its oldest. Summaries are attended with a `log(count)` bias (as if each were
repeated `count` times) and merged with the exact attention over the cache through the lse.

RoPE rule: sinks at 0..s-1; a gap of `levels * per_level` positions holds the summaries, oldest
first, the newest right before the window; the window follows the gap, and new tokens continue
after it. Summaries are kept raw (un-rotated) and rotated to their gap position when attended.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from streamctx.operators.attn import merge_attention
from streamctx.operators.policies._bounded import (
    BoundedPolicy, check_non_negative, check_positive, laid_out, require_rotate, unrotate,
)
from streamctx.operators.policies._pooled import pooled_attention
from streamctx.operators.policies.base import KEEP_ALL, CacheView, Keep, Rotate


@dataclass
class _Level:
    k: torch.Tensor  # [Hkv, S, D] raw (position-0) mean keys
    v: torch.Tensor  # [Hkv, S, D]
    n: torch.Tensor  # [S] tokens each summary stands for (fp32)
    start: torch.Tensor  # [S] int64 original position of each summary's first token (spans are contiguous)


def _merge_oldest(level: _Level, factor: int) -> tuple[_Level, _Level]:
    """(the oldest `factor` summaries pooled into one, the rest)."""
    w = level.n[:factor]  # bookkeeping stays on the CPU; the summaries live where the cache does
    tot = w.sum()
    wd = w.to(level.k.device)[None, :, None]
    k = (level.k[:, :factor] * wd).sum(1, keepdim=True) / tot.to(level.k.device)
    v = (level.v[:, :factor] * wd).sum(1, keepdim=True) / tot.to(level.k.device)
    return (_Level(k, v, tot[None], level.start[:1]),
            _Level(level.k[:, factor:], level.v[:, factor:], level.n[factor:], level.start[factor:]))


def _cat(a: _Level | None, b: _Level) -> _Level:
    if a is None:
        return b
    return _Level(torch.cat([a.k, b.k], 1), torch.cat([a.v, b.v], 1), torch.cat([a.n, b.n]),
                  torch.cat([a.start, b.start]))


@dataclass
class HierarchicalPolicy(BoundedPolicy):
    name: ClassVar[str] = "hierarchical"
    extends_attention: ClassVar[bool] = True
    sinks: int = 4
    window: int = 960
    group: int = 16
    factor: int = 4
    per_level: int = 20
    levels: int = 3
    slack: int = 64
    _levels: dict[int, list[_Level | None]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_positive(window=self.window, group=self.group, per_level=self.per_level, levels=self.levels)
        check_non_negative(sinks=self.sinks, slack=self.slack)
        if self.factor < 2 or self.factor > self.per_level:
            raise ValueError(f"factor must be in [2, per_level={self.per_level}], got {self.factor}")
        if self.slack < self.group - 1:  # whole groups leave the cache: the cap needs this slack
            raise ValueError(f"slack ({self.slack}) must be at least group - 1 ({self.group - 1})")

    @property
    def capacity(self) -> int:
        return self.sinks + self.window

    @property
    def extra_keys(self) -> int:
        return self.levels * self.per_level

    def config(self) -> dict:
        out = super().config()
        out.pop("_levels", None)
        return out

    def summaries(self, layer: int) -> _Level | None:
        """All summaries of `layer`, oldest first: raw keys/values `[Hkv, S, D]`, counts `[S]`."""
        out: _Level | None = None
        for lvl in reversed(self._levels.get(layer, [])):
            if lvl is not None and lvl.n.numel():
                out = _cat(out, lvl)
        return out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for layer, levels in self._levels.items():
            for i, lvl in enumerate(levels):
                if lvl is not None:
                    for name in ("k", "v", "n", "start"):
                        out[f"{layer}.{i}.{name}"] = getattr(lvl, name).contiguous()
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for key in tensors:
            layer, i, _ = key.split(".")
            levels = self._levels.setdefault(int(layer), [None] * self.levels)
            p = f"{layer}.{i}."
            levels[int(i)] = _Level(tensors[p + "k"], tensors[p + "v"], tensors[p + "n"], tensors[p + "start"])

    def summary_positions(self, n: int) -> torch.Tensor:
        """RoPE positions `[n]` of the n summaries (oldest first), right-aligned in the gap."""
        return torch.arange(n) + self.sinks + self.extra_keys - n

    def _absorb(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Pool evicted raw keys/values `[Hkv, E, D]` (E a multiple of group, contiguous positions
        `[E]`) into level 0, then cascade."""
        hkv, e, d = k.shape
        g = e // self.group
        new = _Level(k.float().view(hkv, g, self.group, d).mean(2), v.float().view(hkv, g, self.group, d).mean(2),
                     torch.full((g,), float(self.group)), positions[::self.group].cpu().clone())
        levels = self._levels.setdefault(layer, [None] * self.levels)
        levels[0] = _cat(levels[0], new)
        for i in range(self.levels):
            lvl = levels[i]
            while lvl is not None and lvl.n.numel() > self.per_level:
                if i + 1 == self.levels:
                    keep = slice(-self.per_level, None)
                    lvl = _Level(lvl.k[:, keep], lvl.v[:, keep], lvl.n[keep], lvl.start[keep])
                    break
                up, lvl = _merge_oldest(lvl, self.factor)
                levels[i + 1] = _cat(levels[i + 1], up)
            levels[i] = lvl

    def decide(self, view: CacheView) -> Keep:
        if not self.over(view):
            return KEEP_ALL
        rotate = require_rotate(view, self.name)
        s = min(self.sinks, view.length)
        e = (view.length - s - self.window) // self.group * self.group
        ev = slice(s, s + e)
        self._absorb(view.layer, unrotate(view.keys[:, ev], view.rope_positions[ev], rotate), view.values[:, ev],
                     view.positions[ev])
        idx = torch.cat([torch.arange(s), torch.arange(s + e, view.length)])
        rope = laid_out(s, idx.numel() - s, self.extra_keys + self.sinks - s)
        return Keep(idx, rope, int(rope[-1]) + 1)

    def extend(self, layer: int, q: torch.Tensor, q_rope_positions: torch.Tensor, out: torch.Tensor,
               lse: torch.Tensor, rotate: Rotate) -> torch.Tensor:
        summ = self.summaries(layer)
        if summ is None:
            return out
        pos = self.summary_positions(summ.n.numel()).to(q.device)
        k = rotate(summ.k.to(q.device, q.dtype), pos)
        o2, l2 = pooled_attention(q, k, summ.v.to(q.device, q.dtype), summ.n, 1.0 / math.sqrt(q.shape[-1]))
        return merge_attention(out, lse, o2, l2)[0]
