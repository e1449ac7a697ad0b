"""Compressive memory (Infini-attention); `naive` holds the loop references."""

from streamctx.operators.memory.compressive import (
    MemoryState,
    empty_memory,
    gated_memory_attention,
    infini_segment,
    memory_retrieve,
    memory_update,
    sigma,
)

__all__ = ["MemoryState", "empty_memory", "memory_retrieve", "memory_update", "gated_memory_attention",
           "infini_segment", "sigma"]
