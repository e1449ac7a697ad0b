"""Shared hypothesis strategies for attention tests: awkward shapes, GQA, offsets, masks, patterns."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from streamctx.operators.attn import patterns

LENGTHS = [1, 2, 3, 5, 7, 13, 17, 19, 31, 37, 53]


@dataclass(frozen=True)
class Case:
    b: int
    hkv: int
    groups: int
    tq: int
    tk: int
    d: int
    q_offset: int
    causal: bool
    window: int | None
    sinks: int
    pattern: patterns.BlockPattern | None
    chunk: int

    def kwargs(self) -> dict:
        return dict(causal=self.causal, q_offset=self.q_offset, window=self.window, sinks=self.sinks,
                    pattern=self.pattern, chunk_size=self.chunk)

    def tensors(self, dtype: torch.dtype, seed: int = 0, device: str = "cpu"):
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(self.b, self.hkv * self.groups, self.tq, self.d, generator=gen, dtype=torch.float64)
        k = torch.randn(self.b, self.hkv, self.tk, self.d, generator=gen, dtype=torch.float64)
        v = torch.randn(self.b, self.hkv, self.tk, self.d, generator=gen, dtype=torch.float64)
        return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


@st.composite
def pattern_st(draw) -> patterns.BlockPattern:
    bs = draw(st.sampled_from([2, 3, 4, 8]))
    kind = draw(st.sampled_from(["strided", "random", "sparse", "union"]))
    strided = patterns.strided_pattern(bs, stride=draw(st.integers(2, 5)), local=draw(st.integers(0, 2)))
    rand = patterns.random_pattern(bs, draw(st.sampled_from([0.0, 0.2, 0.5, 1.0])), seed=draw(st.integers(0, 99)))
    if kind == "strided":
        return strided
    if kind == "random":
        return rand
    n = draw(st.integers(1, 30))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 99)))
    sparse = patterns.block_sparse_pattern(torch.rand(n, n, generator=gen) < 0.4, bs)
    return sparse if kind == "sparse" else patterns.union(strided, rand, sparse)


@st.composite
def case_st(draw, *, masks: bool = True, patterns_too: bool = True, max_len: int | None = None) -> Case:
    lengths = [n for n in LENGTHS if max_len is None or n <= max_len]
    tq = draw(st.sampled_from(lengths))
    causal = draw(st.booleans())
    after_cache = draw(st.booleans())
    tk = draw(st.sampled_from(lengths))
    if after_cache:  # queries continue a cache: keys [0, tk) hold the cache and the chunk itself
        tk = tk + tq
        q_offset = tk - tq
    else:
        q_offset = draw(st.integers(-3, tk))
    window = draw(st.sampled_from([None, None, 1, 3, 8])) if masks else None
    sinks = draw(st.sampled_from([0, 1, 4])) if masks and window else 0
    pattern = draw(pattern_st()) if patterns_too and masks and draw(st.integers(0, 3)) == 0 else None
    if pattern is not None and draw(st.booleans()):
        sinks = draw(st.sampled_from([0, 2]))
    return Case(b=draw(st.sampled_from([1, 2])), hkv=draw(st.sampled_from([1, 2])),
                groups=draw(st.sampled_from([1, 3, 4])), tq=tq, tk=tk, d=draw(st.sampled_from([4, 8])),
                q_offset=q_offset, causal=causal, window=window, sinks=sinks, pattern=pattern,
                chunk=draw(st.sampled_from([4, 5, 8, 16])))
