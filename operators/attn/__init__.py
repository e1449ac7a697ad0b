"""Exact attention: blockwise online-softmax attention, lse merge, block-sparse patterns,
hierarchical attention. Plain references live in `streamctx.operators.attn.naive`."""

from __future__ import annotations

from .hierarchical import hierarchical_attention, pool_summaries, summary_nodes
from .merge import merge_attention
from .blockwise import attention
from .patterns import (
    BlockPattern,
    block_sparse_pattern,
    local_pattern,
    random_pattern,
    strided_pattern,
    union,
)

__all__ = [
    "attention",
    "merge_attention",
    "BlockPattern",
    "strided_pattern",
    "random_pattern",
    "block_sparse_pattern",
    "union",
    "local_pattern",
    "hierarchical_attention",
    "pool_summaries",
    "summary_nodes",
]
