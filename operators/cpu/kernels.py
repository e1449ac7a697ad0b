"""Tensor-level entry points to the native kernels (`native` builds and loads them)."""

from __future__ import annotations

import ctypes
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch

from streamctx.operators.cpu import native

if TYPE_CHECKING:
    from streamctx.operators.cpu.gemm import PackedWeight

MAX_GROUP = 16  # query heads per KV head the attention kernel takes (kernels.c MAX_G)
MAX_HEAD_DIM = 256  # kernels.c MAX_DV * 16

_switched_on = True


def available() -> bool:
    """Whether the native kernels are built and loaded (building them on the first call)."""
    return native.available()


def enabled() -> bool:
    """Whether callers should take the native kernels now: available and not switched off."""
    return _switched_on and native.available()


@contextmanager
def native_kernels(on: bool) -> Iterator[None]:
    """Let callers take the native kernels (`on`) or keep them on their torch paths inside the
    block (process-wide; benchmarks and tests compare the two)."""
    global _switched_on
    before, _switched_on = _switched_on, on
    try:
        yield
    finally:
        _switched_on = before


def why_unavailable() -> str | None:
    return native.why_unavailable()


def _require() -> None:
    """The checked entry points' first step: a clear error where the kernels could not be had."""
    if native.library() is None:
        raise RuntimeError(f"native kernels unavailable: {native.why_unavailable()}")


def _check_cpu_f32(name: str, t: torch.Tensor) -> None:
    if t.dtype != torch.float32 or t.device.type != "cpu":
        raise ValueError(f"{name} must be a float32 CPU tensor, got {t.dtype} on {t.device}")


def matmul_nt(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x [M, K] @ weight [N, K]^T (+ bias [N])` -> `[M, N]`, as `F.linear`.

    Each output is summed in an order that depends on K only, so a row's result does not depend
    on M or on the thread count. `x` may have a row stride; `weight` and `bias` are contiguous.
    """
    _require()
    for name, t in (("x", x), ("weight", weight)) + ((("bias", bias),) if bias is not None else ()):
        _check_cpu_f32(name, t)
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"matmul_nt needs x [M, K] and weight [N, K], got {list(x.shape)} and {list(weight.shape)}")
    m, k = x.shape
    n = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must be [{n}], got {list(bias.shape)}")
    return matmul_nt_unchecked(x, weight.contiguous(), None if bias is None else bias.contiguous())


def matmul_nt_unchecked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`matmul_nt` for callers that checked dtypes, devices and shapes (weight and bias contiguous):
    `linear` calls it for every few-row product, where the checks cost a few percent."""
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty(m, n, dtype=torch.float32)
    if m and n:
        native.library().sc_matmul_nt(x.data_ptr(), x.stride(0), weight.data_ptr(),  # type: ignore[union-attr]
                                      None if bias is None else bias.data_ptr(), out.data_ptr(), n, m, n, k)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the rows of `x [M, H]` (row stride allowed) times `weight [H]` -> `[M, H]`, fp32.

    Single-threaded, in one pass: for the few rows of decode (torch's fused op: ~40 us a call)."""
    _require()
    _check_cpu_f32("x", x)
    _check_cpu_f32("weight", weight)
    if x.dim() != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"rms_norm needs x [M, H] and weight [H], got {list(x.shape)} and {list(weight.shape)}")
    return rms_norm_unchecked(x, weight.contiguous(), eps)


def rms_norm_unchecked(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm` for callers that checked dtypes, devices and shapes (weight contiguous)."""
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.float32)
    native.library().sc_rms_norm(x.data_ptr(), x.stride(0), weight.data_ptr(), eps,  # type: ignore[union-attr]
                                 out.data_ptr(), x.shape[0], x.shape[1])
    return out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` elementwise (the SwiGLU MLP's middle step), fp32, one pass."""
    _require()
    _check_cpu_f32("gate", gate)
    _check_cpu_f32("up", up)
    if gate.shape != up.shape:
        raise ValueError(f"gate and up differ in shape: {list(gate.shape)} and {list(up.shape)}")
    return silu_mul_unchecked(gate, up)


def silu_mul_unchecked(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu_mul` for callers that checked dtypes, devices and shapes."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty(gate.shape, dtype=torch.float32)
    native.library().sc_silu_mul(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel())  # type: ignore[union-attr]
    return out


def rope_append(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                positions: torch.Tensor, rope_positions: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                pos_pool: torch.Tensor, rope_pool: torch.Tensor, num_heads: int) -> torch.Tensor:
    """RoPE and the cache write of one decoded token per session, in one pass.

    qkv `[B, Hq + 2 Hkv, D]` (rows may be strided; not rotated); cos, sin `[B, D]` or `[1, D]`;
    slots, positions, rope_positions `[B]` int64. Writes the rotated k and the v of session b at
    pool slot `slots[b]` of k_pool, v_pool `[Hkv, S, D]` and its positions into pos_pool,
    rope_pool `[S]`; returns the rotated queries `[B, Hq, D]`. The same bits as `apply_rope`.
    """
    _require()
    for name, t in (("qkv", qkv), ("cos", cos), ("sin", sin), ("k_pool", k_pool), ("v_pool", v_pool)):
        _check_cpu_f32(name, t)
    b, heads, d = qkv.shape
    hkv = (heads - num_heads) // 2
    if num_heads + 2 * hkv != heads or tuple(k_pool.shape[::2]) != (hkv, d) or k_pool.shape != v_pool.shape:
        raise ValueError(f"qkv {list(qkv.shape)} with {num_heads} query heads does not fit pools {list(k_pool.shape)}")
    if cos.shape != sin.shape or cos.shape[-1] != d or cos.shape[0] not in (1, b) or d % 2:
        raise ValueError(f"cos/sin must be [{b} or 1, {d}] (even D), got {list(cos.shape)}")
    for name, t in (("slots", slots), ("positions", positions), ("rope_positions", rope_positions)):
        if t.dtype != torch.int64 or t.shape != (b,):
            raise ValueError(f"{name} must be int64 [{b}]")
    if pos_pool.dtype != torch.int64 or rope_pool.dtype != torch.int64 or pos_pool.shape != (k_pool.shape[1],) \
            or rope_pool.shape != (k_pool.shape[1],):
        raise ValueError(f"pos_pool and rope_pool must be int64 [{k_pool.shape[1]}]")
    if b and (int(slots.min()) < 0 or int(slots.max()) >= k_pool.shape[1]):
        raise ValueError("a slot is outside the pool")
    if not (k_pool.is_contiguous() and v_pool.is_contiguous() and pos_pool.is_contiguous()
            and rope_pool.is_contiguous()):
        raise ValueError("the pools must be contiguous (they are written in place)")
    return rope_append_unchecked(qkv, cos.contiguous(), sin.contiguous(), slots.contiguous(), positions.contiguous(),
                                 rope_positions.contiguous(), k_pool, v_pool, pos_pool, rope_pool, num_heads)


def rope_append_unchecked(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                          positions: torch.Tensor, rope_positions: torch.Tensor, k_pool: torch.Tensor,
                          v_pool: torch.Tensor, pos_pool: torch.Tensor, rope_pool: torch.Tensor,
                          num_heads: int) -> torch.Tensor:
    """`rope_append` without its checks (the model's decode step builds valid inputs)."""
    lib = native.library()
    assert lib is not None
    b, heads, d = qkv.shape
    if qkv.stride(2) != 1 or qkv.stride(1) != d:
        qkv = qkv.contiguous()
    q = torch.empty(b, num_heads, d, dtype=torch.float32)
    lib.sc_rope_append(qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), d if cos.shape[0] > 1 else 0,
                       slots.data_ptr(), positions.data_ptr(), rope_positions.data_ptr(), k_pool.data_ptr(),
                       v_pool.data_ptr(), pos_pool.data_ptr(), rope_pool.data_ptr(), k_pool.shape[1], q.data_ptr(),
                       b, num_heads, (heads - num_heads) // 2, d)
    return q


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, blocks: torch.Tensor,
                           offsets: torch.Tensor, lengths: torch.Tensor, block_size: int, scale: float, *,
                           return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of B sessions, one query each, over one layer of a paged cache.

    q `[B, Hq, D]`; k_pool, v_pool `[Hkv, S, D]` (S slots, slot = block * block_size + offset);
    session b's blocks are `blocks[offsets[b]:offsets[b + 1]]` (int32) and it attends its first
    `lengths[b]` keys (int64, >= 1), all of them (its query is the newest position). Query head i
    reads KV head `i // (Hq // Hkv)`. Returns out `[B, Hq, D]` (and lse `[B, Hq]`, natural log).
    """
    _require()
    for name, t in (("q", q), ("k_pool", k_pool), ("v_pool", v_pool)):
        _check_cpu_f32(name, t)
    b, hq, d = q.shape
    hkv, slots, dk = k_pool.shape
    if tuple(v_pool.shape) != (hkv, slots, d) or dk != d:
        raise ValueError(f"k_pool/v_pool must be [Hkv, S, {d}], got {list(k_pool.shape)} and {list(v_pool.shape)}")
    if d % 16 or d > MAX_HEAD_DIM or hq % hkv or hq // hkv > MAX_GROUP:
        raise ValueError(f"unsupported heads: Hq={hq}, Hkv={hkv}, D={d} (need D % 16 == 0, D <= {MAX_HEAD_DIM}, "
                         f"Hq // Hkv <= {MAX_GROUP})")
    if blocks.dtype != torch.int32 or offsets.dtype != torch.int64 or lengths.dtype != torch.int64:
        raise ValueError("blocks must be int32, offsets and lengths int64")
    if offsets.shape != (b + 1,) or lengths.shape != (b,):
        raise ValueError(f"offsets must be [{b + 1}] and lengths [{b}]")
    need = (lengths + block_size - 1) // block_size
    if b and (bool((lengths < 1).any()) or bool((offsets[1:] - offsets[:-1] < need).any())):
        raise ValueError("every session needs length >= 1 and enough blocks for its length")
    if blocks.numel() and (int(blocks.min()) < 0 or (int(blocks.max()) + 1) * block_size > slots):
        raise ValueError("a block id is outside the pool")
    return paged_decode_attention_unchecked(q.contiguous(), k_pool.contiguous(), v_pool.contiguous(),
                                            blocks.contiguous(), offsets.contiguous(), lengths.contiguous(),
                                            block_size, scale, return_lse=return_lse)


def paged_decode_attention_unchecked(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                                     blocks: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor,
                                     block_size: int, scale: float, *, return_lse: bool = False
                                     ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`paged_decode_attention` without its checks, for callers that build valid, contiguous
    inputs themselves (the model's decode step; the checks cost more than the kernel there)."""
    lib = native.library()
    assert lib is not None
    b, hq, d = q.shape
    hkv, slots, _ = k_pool.shape
    out = torch.empty(b, hq, d, dtype=torch.float32)
    lse = torch.empty(b, hq, dtype=torch.float32) if return_lse else None
    if b:
        rc = lib.sc_paged_decode_attention(q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), slots,
                                           blocks.data_ptr(), offsets.data_ptr(), lengths.data_ptr(), block_size,
                                           b, hq, hkv, d, scale, out.data_ptr(),
                                           None if lse is None else lse.data_ptr())
        if rc != 0:
            raise ValueError(f"the kernel refused the shapes Hq={hq}, Hkv={hkv}, D={d}")
    return (out, lse) if lse is not None else out


# -- one decoder layer per call ---------------------------------------------------------------------
_P, _I64 = ctypes.c_void_p, ctypes.c_int64
LAYER_WEIGHT_NAMES = ("ln_attn", "w_qkv", "b_qkv", "w_o", "b_o", "ln_mlp", "w_gate_up", "w_down", "b_down")
_PACKED = ("w_qkv", "w_o", "w_gate_up", "w_down")


class LayerWeights(ctypes.Structure):
    """`sc_layer_weights`: pointers to one Llama-family layer's weights, the matrices packed (kept
    alive in `tensors`)."""

    _fields_ = [(name, _P) for name in LAYER_WEIGHT_NAMES] + [(name, _I64) for name in ("H", "I", "Hq", "Hkv", "D")] \
        + [("eps", ctypes.c_float), ("scale", ctypes.c_float)]


class LayerCache(ctypes.Structure):
    """`sc_layer_cache`: one layer's pool and the step's slots, positions, RoPE rows and block tables."""

    _fields_ = [("k_pool", _P), ("v_pool", _P), ("pos_pool", _P), ("rope_pool", _P), ("S", _I64), ("bs", _I64),
                ("slots", _P), ("pos", _P), ("rope_pos", _P), ("cos", _P), ("sin", _P), ("ldcs", _I64),
                ("blocks", _P), ("offsets", _P), ("lengths", _P)]


def layer_weights(tensors: dict[str, torch.Tensor | PackedWeight | None], *, num_heads: int, num_kv_heads: int, head_dim: int,
                  eps: float, scale: float) -> LayerWeights | None:
    """The `LayerWeights` of one layer for `decode_layer_unchecked`, or None where its weights do not fit the
    kernel (not fp32 CPU, or heads it does not take): the caller keeps its other path.

    `tensors`: the names of `LAYER_WEIGHT_NAMES` (biases may be None): ln_attn and ln_mlp `[H]`
    tensors; w_qkv (`[(Hq + 2 Hkv) D, H]`, q, k, v stacked), w_o (`[H, Hq D]`) and w_down (`[H, I]`)
    packed by `pack_weights`, w_gate_up (`[I, H]` each) by `pack_swiglu`; each bias the size of its
    product's output.
    """
    gate_up = tensors["w_gate_up"]
    if gate_up is None or head_dim % 16 or head_dim > MAX_HEAD_DIM or num_heads % num_kv_heads \
            or num_heads // num_kv_heads > MAX_GROUP:
        return None
    inter, hidden = gate_up.n, gate_up.k
    qd, qkv = num_heads * head_dim, (num_heads + 2 * num_kv_heads) * head_dim
    packed = {"w_qkv": (qkv, hidden, False), "w_o": (hidden, qd, False), "w_gate_up": (inter, hidden, True),
              "w_down": (hidden, inter, False)}
    vectors = {"ln_attn": hidden, "b_qkv": qkv, "b_o": hidden, "ln_mlp": hidden, "b_down": hidden}
    for name, (n, k, swiglu) in packed.items():
        t = tensors[name]
        if t is None or (t.n, t.k, t.swiglu) != (n, k, swiglu):
            return None
    for name, n in vectors.items():
        t = tensors[name]
        if t is None and name.startswith("b_"):
            continue
        if t is None or tuple(t.shape) != (n,) or t.dtype != torch.float32 or t.device.type != "cpu" \
                or not t.is_contiguous() or t.requires_grad:
            return None

    def pointer(name: str) -> int:
        t = tensors[name]
        return 0 if t is None else t.strips.data_ptr() if name in _PACKED else t.data_ptr()

    out = LayerWeights(*(pointer(name) for name in LAYER_WEIGHT_NAMES), hidden, inter, num_heads, num_kv_heads,
                       head_dim, eps, scale)
    out.tensors = dict(tensors)  # type: ignore[attr-defined]  # the pointers' owners
    return out


def decode_scratch(weights: LayerWeights, rows: int) -> torch.Tensor:
    """A scratch buffer for `decode_layer_unchecked` over `rows` sessions (reusable across layers)."""
    lib = native.library()
    assert lib is not None
    return torch.empty(int(lib.sc_decode_scratch_floats(ctypes.addressof(weights), rows)), dtype=torch.float32)


def decode_layer_unchecked(weights: LayerWeights, cache: LayerCache, x: torch.Tensor, scratch: torch.Tensor) -> None:
    """One decoder layer for B sessions decoding a token each, in place on `x [B, H]` (contiguous
    fp32): RMSNorm, QKV, RoPE and the K/V write at `cache.slots`, paged decode attention, o_proj and
    the residual, RMSNorm, SwiGLU MLP and the residual, in one native call. The same kernels in the
    same order as the separate calls (`gemm_packed` with the norms folded and the residuals in
    place, `rope_append`, `paged_decode_attention`), so the same bits; for callers that built valid
    inputs (the model)."""
    lib = native.library()
    assert lib is not None
    rc = lib.sc_decode_layer(ctypes.addressof(weights), ctypes.addressof(cache), x.data_ptr(), x.shape[0],
                             scratch.data_ptr())
    if rc == -2:
        raise MemoryError("sc_decode_layer: out of memory for its span or packing buffers")
    if rc != 0:
        raise ValueError("sc_decode_layer refused the layer's shapes")
