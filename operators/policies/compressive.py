"""`compressive` (Infini-attention, training-free): evicted tokens are folded into a linear-attention
memory per layer and KV head; queries read it back and the read is gated with local attention.

    out = sigmoid(gate) * memory_retrieve(q) + (1 - sigmoid(gate)) * attention(q, kept keys)

The memory is position-free: keys are un-rotated to position 0 before they are written and
queries are un-rotated before they read. `gate` is one fixed scalar (Infini-attention learns one
per head; there is no training here), so this is an approximate policy measured in the benchmark.

RoPE rule: the cache itself behaves as `sink_window` (kept slots at 0..n-1, new tokens at n).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from streamctx.operators.memory import MemoryState, empty_memory, gated_memory_attention, memory_retrieve, memory_update
from streamctx.operators.policies._bounded import (
    BoundedPolicy, check_non_negative, check_positive, require_rotate, sinks_and_recent, unrotate,
)
from streamctx.operators.policies.base import KEEP_ALL, CacheView, Keep, Rotate


@dataclass
class CompressivePolicy(BoundedPolicy):
    name: ClassVar[str] = "compressive"
    extends_attention: ClassVar[bool] = True
    sinks: int = 4
    window: int = 1020
    gate: float = -2.0
    rule: Literal["linear", "delta"] = "delta"
    slack: int = 64
    _memory: dict[int, MemoryState] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_positive(window=self.window)
        check_non_negative(sinks=self.sinks, slack=self.slack)
        if self.rule not in ("linear", "delta"):
            raise ValueError(f'rule must be "linear" or "delta", got {self.rule!r}')

    @property
    def capacity(self) -> int:
        return self.sinks + self.window

    def config(self) -> dict:
        out = super().config()
        out.pop("_memory", None)
        return out

    def memory(self, layer: int) -> MemoryState | None:
        """The layer's memory: M `[1, Hkv, D, D]`, z `[1, Hkv, D]` (fp32), or None before any eviction."""
        return self._memory.get(layer)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{layer}.{name}": t for layer, mem in self._memory.items() for name, t in zip("Mz", mem)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for layer in {int(k.split(".")[0]) for k in tensors}:
            self._memory[layer] = MemoryState(tensors[f"{layer}.M"], tensors[f"{layer}.z"])

    def decide(self, view: CacheView) -> Keep:
        if not self.over(view):
            return KEEP_ALL
        rotate = require_rotate(view, self.name)
        idx = sinks_and_recent(view.length, self.sinks, self.window)
        s = min(self.sinks, view.length)
        ev = slice(s, view.length - self.window)
        k = unrotate(view.keys[:, ev], view.rope_positions[ev], rotate)
        hkv, _, d = k.shape
        mem = self._memory.get(view.layer) or empty_memory(1, hkv, d, view.values.shape[-1], device=k.device)
        self._memory[view.layer] = memory_update(k[None], view.values[None, :, ev], mem, rule=self.rule)
        return Keep(idx, torch.arange(idx.numel()), idx.numel())

    def extend(self, layer: int, q: torch.Tensor, q_rope_positions: torch.Tensor, out: torch.Tensor,
               lse: torch.Tensor, rotate: Rotate) -> torch.Tensor:
        mem = self._memory.get(layer)
        if mem is None:
            return out
        g = q.shape[0] // mem.M.shape[1]
        state = (mem.M.repeat_interleave(g, dim=1), mem.z.repeat_interleave(g, dim=1))
        read = memory_retrieve(unrotate(q, q_rope_positions, rotate)[None], state)
        gate = torch.tensor(self.gate, dtype=torch.float32, device=q.device)
        return gated_memory_attention(out[None].float(), read.float(), gate)[0].to(out.dtype)
