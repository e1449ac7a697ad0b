"""Native CPU kernels (fp32, AVX-512) for the steps decode spends its time on.

`matmul_nt` (few-row `x @ W^T`), `paged_decode_attention` (one query per session over its
paged K/V), `rope_append` (RoPE and the cache write of decoded tokens), `rms_norm` and `silu_mul`
run a small C library compiled on first use (`native`); `decode_layer_unchecked` runs them all for
one Llama-family layer in one call (`layer_weights` describes the layer). Where the library cannot
be built, `available()` is False and callers keep their torch paths. The plain references with the
same signatures are in `naive`.
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

__all__ = ["LAYER_WEIGHT_NAMES", "LayerCache", "LayerWeights", "available", "causal_attention",
           "causal_attention_unchecked", "decode_layer_unchecked", "decode_scratch", "layer_weights", "enabled",
           "matmul_nt", "matmul_nt_unchecked", "native_kernels", "paged_decode_attention",
           "paged_decode_attention_unchecked", "rms_norm", "rms_norm_unchecked", "rope_append",
           "rope_append_unchecked", "silu_mul", "silu_mul_unchecked", "why_unavailable"]
