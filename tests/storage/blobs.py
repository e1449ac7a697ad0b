"""Session states shaped like a small model's KV for storage and scheduler tests."""

from __future__ import annotations

import torch

from streamctx.state import StateBlob


def kv_blob(seed: int, tokens: int, *, layers: int = 2, heads: int = 3, dim: int = 16,
            dtype: torch.dtype = torch.bfloat16) -> StateBlob:
    """k, v: [L, H, T, D] in `dtype`, plus an int64 position counter and meta."""
    g = torch.Generator().manual_seed(seed)
    shape = (layers, heads, tokens, dim)
    return StateBlob(
        "test.kv",
        {
            "k": torch.randn(shape, generator=g).to(dtype),
            "v": torch.randn(shape, generator=g).to(dtype),
            "pos": torch.tensor([tokens], dtype=torch.int64),
        },
        {"seed": seed, "tokens": tokens},
    )


def clone_blob(blob: StateBlob) -> StateBlob:
    return StateBlob(blob.kind, {k: v.clone() for k, v in blob.tensors.items()}, dict(blob.meta))
