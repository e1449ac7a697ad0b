"""Block-level sparse attention patterns (Sparse Transformer, BigBird, explicit block masks).

A pattern decides, for a block of queries, which blocks of keys it may see. Blocks are fixed
`block_size` spans of *absolute* positions: query position `p` is in block `p // block_size`, key
`j` in block `j // block_size`. Because the pattern is defined on absolute positions (and the
random pattern is a stateless hash of `(seed, query block, key block)`), it never changes when a
cache grows or a sequence is fed in chunks.

Token-level meaning (used by the dense reference): a key `j` is visible to a query at `p` under the
pattern iff `block_mask([p // bs], (j // bs) + 1)[0, j // bs]`. In `attention(..., pattern=P)` the
pattern is united with the window and sinks (a key is visible if the pattern, the window or a sink
admits it) and intersected with causality.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "BlockPattern",
    "StridedPattern",
    "RandomPattern",
    "BlockSparsePattern",
    "UnionPattern",
    "strided_pattern",
    "random_pattern",
    "block_sparse_pattern",
    "union",
    "LocalPattern",
    "local_pattern",
]


@dataclass(frozen=True)
class BlockPattern:
    """Base class: a block-level visibility rule with a fixed `block_size`."""

    block_size: int

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")

    def block_mask(self, q_blocks: torch.Tensor, num_key_blocks: int) -> torch.Tensor:
        """Bool `[len(q_blocks), num_key_blocks]`: may query block `q_blocks[i]` see key block `j`."""
        raise NotImplementedError

    def key_blocks(self, q_block: int, num_key_blocks: int) -> list[int]:
        """The key blocks (ascending) that query block `q_block` may see, among `num_key_blocks`."""
        mask = self.block_mask(torch.tensor([q_block]), num_key_blocks)[0]
        return mask.nonzero().flatten().tolist()

    def token_mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Bool `[len(q_pos), len(k_pos)]` at token level (for references and boundary tiles)."""
        bs = self.block_size
        qb = torch.div(q_pos, bs, rounding_mode="floor")
        kb = torch.div(k_pos, bs, rounding_mode="floor")
        uq, q_inv = torch.unique(qb, return_inverse=True)
        nkb = int(kb.max().item()) + 1 if kb.numel() else 0
        return self.block_mask(uq, nkb)[q_inv][:, kb]

    def density(self, num_blocks: int, causal: bool = True) -> float:
        """Fraction of (causal, if asked) block pairs kept on a square `num_blocks` grid."""
        qb = torch.arange(num_blocks)
        m = self.block_mask(qb, num_blocks)
        if causal:
            tri = qb[:, None] >= qb[None, :]
            return float((m & tri).sum()) / float(tri.sum())
        return float(m.float().mean())


@dataclass(frozen=True)
class StridedPattern(BlockPattern):
    """Sparse Transformer "strided": the `local` most recent blocks, plus every `stride`-th block back.

    Query block `i` sees key block `j` iff `|i - j| < local` or `(i - j) % stride == 0`.
    """

    stride: int = 4
    local: int = 1

    def block_mask(self, q_blocks: torch.Tensor, num_key_blocks: int) -> torch.Tensor:
        d = q_blocks[:, None] - torch.arange(num_key_blocks)[None, :]
        return (d.abs() < self.local) | (d % self.stride == 0)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """A stateless 64-bit integer hash (splitmix64 finaliser), in int64 arithmetic (wraps)."""
    x = x + (-7046029254386353131)  # 0x9E3779B97F4A7C15 as int64
    x = (x ^ ((x >> 30) & 0x3FFFFFFFF)) * (-4658895280553007687)  # 0xBF58476D1CE4E5B9
    x = (x ^ ((x >> 27) & 0x1FFFFFFFFF)) * (-7723592293110705685)  # 0x94D049BB133111EB
    return x ^ ((x >> 31) & 0x1FFFFFFFF)


@dataclass(frozen=True)
class RandomPattern(BlockPattern):
    """BigBird-style random blocks: each (query block, key block) pair is kept with `probability`,
    decided by a hash of `(seed, query block, key block)`, so it is reproducible and stream-stable."""

    probability: float = 0.1
    seed: int = 0

    def block_mask(self, q_blocks: torch.Tensor, num_key_blocks: int) -> torch.Tensor:
        qb = q_blocks.to(torch.int64)[:, None]
        kb = torch.arange(num_key_blocks, dtype=torch.int64)[None, :]
        h = _splitmix64(_splitmix64(qb * 1_000_003 + self.seed * 7_919) ^ kb)
        u = (h & ((1 << 53) - 1)).to(torch.float64) / float(1 << 53)
        return u < self.probability


@dataclass(frozen=True, eq=False)
class BlockSparsePattern(BlockPattern):
    """An explicit block mask `[num_query_blocks, num_key_blocks]`; blocks outside it are hidden."""

    mask: torch.Tensor = torch.zeros(0, 0, dtype=torch.bool)

    def block_mask(self, q_blocks: torch.Tensor, num_key_blocks: int) -> torch.Tensor:
        out = torch.zeros(len(q_blocks), num_key_blocks, dtype=torch.bool)
        nq, nk = self.mask.shape
        inside = (q_blocks >= 0) & (q_blocks < nq)
        kk = min(nk, num_key_blocks)
        out[inside, :kk] = self.mask[q_blocks[inside]][:, :kk]
        return out


@dataclass(frozen=True)
class UnionPattern(BlockPattern):
    """A key block is visible if any member pattern admits it (all share one block size)."""

    parts: tuple[BlockPattern, ...] = ()

    def block_mask(self, q_blocks: torch.Tensor, num_key_blocks: int) -> torch.Tensor:
        out = torch.zeros(len(q_blocks), num_key_blocks, dtype=torch.bool)
        for p in self.parts:
            out |= p.block_mask(q_blocks, num_key_blocks)
        return out


def strided_pattern(block_size: int, stride: int, local: int = 1) -> StridedPattern:
    if stride < 1 or local < 0:
        raise ValueError(f"stride must be >= 1 and local >= 0, got stride={stride}, local={local}")
    return StridedPattern(block_size=block_size, stride=stride, local=local)


def random_pattern(block_size: int, probability: float, *, seed: int) -> RandomPattern:
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    return RandomPattern(block_size=block_size, probability=probability, seed=seed)


def block_sparse_pattern(mask: torch.Tensor, block_size: int) -> BlockSparsePattern:
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D [query blocks, key blocks], got shape {tuple(mask.shape)}")
    return BlockSparsePattern(block_size=block_size, mask=mask.detach().to("cpu", torch.bool).clone())


def union(*patterns: BlockPattern | Sequence[BlockPattern]) -> UnionPattern:
    flat: list[BlockPattern] = []
    for p in patterns:
        flat.extend(p if isinstance(p, (list, tuple)) else [p])
    if not flat:
        raise ValueError("union() needs at least one pattern")
    sizes = {p.block_size for p in flat}
    if len(sizes) != 1:
        raise ValueError(f"patterns in a union must share one block_size, got {sorted(sizes)}")
    return UnionPattern(block_size=flat[0].block_size, parts=tuple(flat))


@dataclass(frozen=True)
class LocalPattern(BlockPattern):
    """Block-local sections: query block `i` sees key blocks `j` with `|i - j| < blocks`."""

    blocks: int = 1

    def block_mask(self, q_blocks: torch.Tensor, num_key_blocks: int) -> torch.Tensor:
        return (q_blocks[:, None] - torch.arange(num_key_blocks)[None, :]).abs() < self.blocks


def local_pattern(block_size: int, blocks: int = 1) -> LocalPattern:
    if blocks < 1:
        raise ValueError(f"blocks must be >= 1, got {blocks}")
    return LocalPattern(block_size=block_size, blocks=blocks)
