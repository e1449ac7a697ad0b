"""Native CPU kernels (fp32, AVX-512) for the steps decode and prefill spend their time on.

A small C library compiled on first use (`native`). Products: `gemm_nt` / `gemm_nt_swiglu` (with
the RMSNorm, SwiGLU and residual fused) and `gemm_packed` over a model's weights packed once
(`pack_weights`, `pack_swiglu`), at any number of rows; `matmul_nt` (few-row `x @ W^T` over plain
weights). Attention: `paged_decode_attention` (one query per session over its paged K/V) and
`causal_attention` (flash-style, a chunk of queries over the cache). Decode's small steps:
`rope_append` (RoPE and the cache write of decoded tokens), `rms_norm` and `silu_mul`;
`decode_layer_unchecked` runs one Llama-family layer in one call (`layer_weights` describes it). Where the
library cannot be built, `available()` is False and callers keep their torch paths. The plain
references with the same signatures are in `naive`.
"""

from streamctx.operators.cpu.attention import causal_attention, causal_attention_unchecked
from streamctx.operators.cpu.kernels import (
    LAYER_WEIGHT_NAMES,
    LayerCache,
    LayerWeights,
    available,
    decode_layer_unchecked,
    decode_scratch,
    enabled,
    layer_weights,
    matmul_nt,
    matmul_nt_unchecked,
    native_kernels,
    paged_decode_attention,
    paged_decode_attention_unchecked,
    rms_norm,
    rms_norm_unchecked,
    rope_append,
    rope_append_unchecked,
    silu_mul,
    silu_mul_unchecked,
    why_unavailable,
)
from streamctx.operators.cpu.gemm import (
    PackedWeight,
    gemm_nt,
    gemm_nt_swiglu,
    gemm_nt_swiglu_unchecked,
    gemm_nt_unchecked,
    gemm_packed,
    gemm_packed_unchecked,
    pack_swiglu,
    pack_weights,
    packed_floats,
)
from streamctx.operators.cpu.memory import huge_page_floats, release_pages

__all__ = ["LAYER_WEIGHT_NAMES", "LayerCache", "LayerWeights", "available", "causal_attention",
           "causal_attention_unchecked", "decode_layer_unchecked", "decode_scratch", "layer_weights", "enabled",
           "matmul_nt", "matmul_nt_unchecked", "native_kernels", "paged_decode_attention",
           "paged_decode_attention_unchecked", "rms_norm", "rms_norm_unchecked", "rope_append",
           "rope_append_unchecked", "silu_mul", "silu_mul_unchecked", "why_unavailable",
           "gemm_nt", "gemm_nt_unchecked", "gemm_nt_swiglu", "gemm_nt_swiglu_unchecked", "PackedWeight",
           "gemm_packed", "gemm_packed_unchecked", "pack_weights", "pack_swiglu", "packed_floats",
           "huge_page_floats", "release_pages"]
