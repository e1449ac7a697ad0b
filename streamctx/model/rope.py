"""Rotary position embeddings (rotate-half form, as in Hugging Face Llama).

Supported `rope_scaling` types: default (none), `linear` and `llama3`; `dynamic`, `yarn`,
`longrope` and others raise `UnsupportedRopeError` instead of silently computing something else.
cos/sin are computed in fp32 exactly as transformers does (`position * inv_freq`), from a table
that grows on demand, so a position gives the same bits however the sequence was split.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedRopeError(ValueError):
    """A config asks for a RoPE scaling type this runtime does not implement."""


def inv_frequencies(head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Inverse frequencies `[head_dim // 2]` (fp32) for RoPE with optional HF-style scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = "default"
    if scaling:
        rope_type = str(scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])  # type: ignore[index]
    if rope_type == "llama3":
        assert scaling is not None
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise UnsupportedRopeError(
        f"rope_scaling type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
    )


class Rope:
    """cos/sin tables `[P, head_dim]` in the model dtype, grown by doubling as positions advance."""

    def __init__(self, head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None,
                 *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 initial: int = 4096) -> None:
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.inv_freq = inv_frequencies(head_dim, theta, scaling).to(self.device)
        self._cos = torch.empty(0, head_dim, dtype=dtype, device=self.device)
        self._sin = torch.empty(0, head_dim, dtype=dtype, device=self.device)
        self._grow(initial)

    def _grow(self, n: int) -> None:
        pos = torch.arange(n, device=self.device, dtype=torch.int64).float()
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self._cos, self._sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def cos_sin(self, positions: torch.Tensor | range) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[T, head_dim]` for integer positions (a `range` gives views, no gather)."""
        hi = (positions.stop if isinstance(positions, range) else int(positions.max()) + 1) if len(positions) else 0
        if hi > self._cos.shape[0]:
            self._grow(max(hi, 2 * self._cos.shape[0]))
        if isinstance(positions, range):
            return self._cos[positions.start:positions.stop], self._sin[positions.start:positions.stop]
        if int(positions.min()) < 0:
            # Negative deltas appear when re-rotating keys to smaller positions.
            freqs = positions.to(self.device).float()[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            return emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        return self._cos[positions], self._sin[positions]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x [..., T, D]` by cos/sin `[T, D]` (broadcast over leading dims)."""
    return x * cos + rotate_half(x) * sin


def rerotate(keys: torch.Tensor, delta: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Keys rotated at positions p, re-rotated to p + delta: `keys [H, T, D]`, `delta [T]` int.

    Rotations compose, R(p + d) = R(d) R(p), so this equals rotating the raw key at p + d up to
    one extra rounding; policies that re-assign positions (StreamingLLM) use it.
    """
    cos, sin = rope.cos_sin(delta)
    return apply_rope(keys, cos, sin)
