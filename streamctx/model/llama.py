"""Llama-family decoder (Llama, SmolLM2, Qwen2, Mistral) over the paged KV cache.

Functional code over a weights dict taken from the loader (Hugging Face names). Weights are used
in place where possible: when they already have the model's dtype and device nothing is copied,
so a memory-mapped checkpoint is read straight from the page cache. A layer does one QKV product
and rotates q and k in one RoPE call (q and k are adjacent columns of its output): the packed
weights (below) stack q, k and v; the torch paths use a stacked `[(Hq + 2 Hkv) D, H]` copy, made
at load on other devices and dtypes and on first use on the CPU in fp32 (SmolLM2: 66 MB that a
packing model never holds). On a shared CPU every parallel region is a barrier that a
descheduled thread stalls, so fewer, larger calls matter most for decode. The lm_head runs only
on the rows whose logits are asked for (the last position of each session unless told
otherwise). On the CPU in fp32 the products run over packed copies of the weights (below);
elsewhere every projection goes through `streamctx.model.linear.linear`.

The forward is batch-first: `forward([(cache, ids), ...])` packs every session's new tokens into
one `[N, H]` activation for the dense layers and runs attention per session over its own
cache, so sessions of different lengths batch without padding (ragged attention).

Sessions that decode one token and whose policy has no attention hooks form the *decode group*
(continuous batching's common step): their RoPE is one call and their K/V writes one indexed
copy per layer, and their block tables are kept as single runs (`streamctx.kv.batch`), so each
session's attention reads its cache as a zero-copy view. On the CPU (fp32, head_dim a multiple of
16) where the native kernels are built, the group attends in one `paged_decode_attention` call
that reads every session's blocks in place through its block table, and a lone decoding session
takes the same kernel, so batched and one-at-a-time decode give the same bits (16 sessions at
512 tokens: ~15 ms a step for 30 layers, against 41 ms in per-session calls). When the whole step
is the decode group (at most 64 sessions), each layer is one native call
(`decode_layer_unchecked`: norms, products, RoPE and cache write, attention, MLP, residuals in one
parallel region): the same kernels in the same order, so the same bits, without ~6 returns to
Python a layer (SmolLM2, one session at 2K: 47.5 vs 41.5 tok/s). Without the native kernels, the
per-session calls remain: gathering all caches into a padded `[B, Hkv, Tmax, D]` batch was measured and rejected: the
gather copies every attended key each step and cost more than the per-session attention calls it
replaced (16 sessions x 2K tokens: 30 ms vs 3.6 ms per layer on 2 cores). On CUDA the per-session
calls are launch-bound and the gather is cheap, so the group attends in one padded call
(`_padded_decode_attention`). Sessions whose policy observes queries or extends attention
(snapkv, retrieval, hierarchical, compressive) and prefill chunks take the per-session path.

Products on the CPU (fp32, native kernels built): on first use every layer's matrices and the
lm_head are packed once (`native.pack_weights`: strips of 32 columns, `[K][32]` each, gate and up
interleaved for the SwiGLU pair, on transparent huge pages) and every product of every step reads
them in place through `native.gemm_packed`, with the RMSNorms folded into the products, the SwiGLU
pair in one pass and the residuals added in place. One layout for all row counts: a decode step's
few rows split the strips between the threads (each one sequential stream), a prefill chunk's many
rows take the register tiles of the BLIS-style GEMM, and each output is summed in an order fixed by
K alone, so a session's row has the same bits batched or alone. The plain weights stay for the
torch paths; their pages are handed back to the kernel once packed (`native.release_pages`), so
the resident weights are not doubled (SmolLM2: peak RSS +8%, the fused q/k/v copy and the torch
paths' plain matrices that are not file-backed). 16 sessions at 512 tokens: the step's products
~30 -> ~24 ms against the plain-layout decode kernels (`matmul_nt`, which other models' `linear`
calls keep). Prefill chunks attend through `causal_attention` (flash-style, over the cache they
were just appended to).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Sequence

import torch
import torch.nn.functional as F

from streamctx.kv.apply import apply_policy
from streamctx.kv.batch import append_one_each, reserve_slots
from streamctx.kv.cache import SessionKV
from streamctx.kv.pool import BlockPool
from streamctx.model.config import LlamaConfig
from streamctx.model.functional import NATIVE_MAX_ROWS, Weights, rms_norm, silu_mul
from streamctx.model.linear import choose_path, linear
from streamctx.model.ops import attention
from streamctx.model.rope import Rope, apply_rope, rerotate
from streamctx.operators import cpu as native
from streamctx.operators.policies.base import CachePolicy
from streamctx.state import StateBlob


@dataclass
class _Layer:
    ln_attn: torch.Tensor  # [H]
    w_q: torch.Tensor  # [Hq D, H]
    w_k: torch.Tensor  # [Hkv D, H]
    w_v: torch.Tensor  # [Hkv D, H]
    b_qkv: torch.Tensor | None  # [(Hq + 2 Hkv) D]
    w_o: torch.Tensor  # [H, Hq D]
    b_o: torch.Tensor | None
    ln_mlp: torch.Tensor  # [H]
    w_gate: torch.Tensor  # [I, H]
    w_up: torch.Tensor  # [I, H]
    b_gate: torch.Tensor | None
    b_up: torch.Tensor | None
    w_down: torch.Tensor  # [H, I]
    b_down: torch.Tensor | None

    @functools.cached_property
    def w_qkv(self) -> torch.Tensor:
        """`[(Hq + 2 Hkv) D, H]`: q, k, v stacked, for one QKV product on the torch paths (made on
        first use: a packing model never needs it)."""
        return torch.cat([self.w_q, self.w_k, self.w_v])

    def tensors(self) -> list[torch.Tensor]:
        """The layer's weights (not the stacked copy)."""
        return [t for f in fields(self) if (t := getattr(self, f.name)) is not None]


@dataclass(frozen=True)
class _PackedLayer:
    """One layer's matrices packed for the native products (`native.gemm_packed`)."""

    qkv: native.PackedWeight
    o: native.PackedWeight
    gate_up: native.PackedWeight  # the SwiGLU pair
    down: native.PackedWeight


class LlamaModel:
    """A Llama-family decoder whose sessions hold a `SessionKV` in the model's `BlockPool`.

    `weights` (Hugging Face names) is consumed: tensors are popped as they are converted.
    """

    kind = "llama"
    fused_decode = True  # decode steps run each layer as one native call where they can (tests compare)

    def __init__(self, config: LlamaConfig, weights: dict[str, torch.Tensor], *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 block_size: int = 64, source: str = "checkpoint") -> None:
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        c = config
        self.scale = c.head_dim ** -0.5
        h, v = c.hidden_size, c.vocab_size
        w = Weights(weights, dtype=dtype, device=self.device, source=source)
        self.embed = w.take("model.embed_tokens.weight", (v, h))  # [V, H]
        self.lm_head = self.embed if c.tie_word_embeddings else w.take("lm_head.weight", (v, h))
        self.norm = w.take("model.norm.weight", (h,))
        self.layers = [self._layer(w, i) for i in range(c.num_layers)]
        w.finish()
        self.rope = Rope(c.head_dim, c.rope_theta, c.rope_scaling, dtype=dtype, device=self.device)
        self.pool = BlockPool(c.num_layers, c.num_kv_heads, c.head_dim, block_size=block_size,
                              dtype=dtype, device=self.device)
        self._mlp_biases = any(layer.b_gate is not None or layer.b_up is not None for layer in self.layers)
        # Built on first use, for the layers this model holds (a pipeline stage drops the others):
        self._packed: list[_PackedLayer | None] | None = None  # the layers' matrices, packed
        self._packed_head: native.PackedWeight | None = None
        self._layer_weights: list[native.LayerWeights | None] | None = None  # for the fused decode step

    def _layer(self, w: Weights, i: int) -> _Layer:
        c, p = self.config, f"model.layers.{i}."
        h, d, inter = c.hidden_size, c.head_dim, c.intermediate_size
        qd, kvd = c.num_heads * d, c.num_kv_heads * d
        att, mlp = p + "self_attn.", p + "mlp."
        b_qkv = None
        if c.attention_bias:
            b_qkv = torch.cat([w.take(att + "q_proj.bias", (qd,)), w.take(att + "k_proj.bias", (kvd,)),
                               w.take(att + "v_proj.bias", (kvd,))])
        layer = _Layer(
            ln_attn=w.take(p + "input_layernorm.weight", (h,)),
            w_q=w.take(att + "q_proj.weight", (qd, h)),
            w_k=w.take(att + "k_proj.weight", (kvd, h)),
            w_v=w.take(att + "v_proj.weight", (kvd, h)),
            b_qkv=b_qkv,
            w_o=w.take(att + "o_proj.weight", (h, qd)),
            b_o=w.maybe(att + "o_proj.bias", c.o_proj_bias, (h,)),
            ln_mlp=w.take(p + "post_attention_layernorm.weight", (h,)),
            w_gate=w.take(mlp + "gate_proj.weight", (inter, h)),
            w_up=w.take(mlp + "up_proj.weight", (inter, h)),
            b_gate=w.maybe(mlp + "gate_proj.bias", c.mlp_bias, (inter,)),
            b_up=w.maybe(mlp + "up_proj.bias", c.mlp_bias, (inter,)),
            w_down=w.take(mlp + "down_proj.weight", (h, inter)),
            b_down=w.maybe(mlp + "down_proj.bias", c.mlp_bias, (h,)),
        )
        if not (self.dtype == torch.float32 and self.device.type == "cpu"):  # no packing: stack once
            layer.w_q, layer.w_k, layer.w_v = layer.w_qkv.split([qd, kvd, kvd])  # views: one copy in memory
        return layer

    # -- sessions ---------------------------------------------------------------------------------
    def new_state(self) -> SessionKV:
        return SessionKV(self.pool)

    def state_nbytes(self, state: SessionKV) -> int:
        return state.nbytes()

    def free_state(self, state: SessionKV) -> None:
        state.free()

    def weight_nbytes(self) -> int:
        seen: dict[int, int] = {}
        tensors = [self.embed, self.lm_head, self.norm]
        for layer in self.layers:
            tensors.extend(layer.tensors())
        for t in tensors:
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return sum(seen.values())

    def rerotate(self, keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return rerotate(keys, delta, self.rope)

    @torch.inference_mode()  # the pool may have grown inside forward: its tensors are inference tensors
    def apply_policy(self, state: SessionKV, policy: CachePolicy) -> None:
        apply_policy(state, policy, self.rerotate)

    # -- forward ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, batch: Sequence[tuple[SessionKV, torch.Tensor]], *,
                all_logits: Sequence[bool] | bool = False, key_mass: bool = False) -> list[torch.Tensor]:
        """Append each session's new tokens `ids [T_i]` to its cache and return its logits.

        Returns per session `[T_i, V]` where `all_logits` asks for it, else `[V]` (last position).
        """
        flags = [all_logits] * len(batch) if isinstance(all_logits, bool) else list(all_logits)
        lens = [int(ids.shape[0]) for _, ids in batch]
        ids = batch[0][1] if len(batch) == 1 else torch.cat([ids for _, ids in batch])
        x = self.embed_ids(ids)
        x = self.forward_layers([cache for cache, _ in batch], x, lens, key_mass=key_mass)
        return self.head(x, lens, flags)

    # The three parts of `forward`, also run apart by a pipeline split over layer ranges
    # (streamctx.model.pipeline): embed -> layer ranges -> head.
    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids `[N]` -> hidden states `[N, H]`."""
        return F.embedding(ids.to(self.device), self.embed)

    @torch.inference_mode()
    def forward_layers(self, caches: Sequence[SessionKV], x: torch.Tensor, lens: Sequence[int], *,
                       layers: range | None = None, key_mass: bool = False) -> torch.Tensor:
        """Run `layers` (default: all) over `x [N, H]`, the packed new tokens of each session
        (`lens[i]` rows each, in order), appending to the caches; returns `x [N, H]`.

        Each cache holds exactly these layers: its layer `j` is model layer `layers[j]`.
        """
        c, dev = self.config, self.device
        layers = range(c.num_layers) if layers is None else layers
        batch = [(cache, None) for cache in caches]
        caches = list(caches)
        hq, d = c.num_heads * c.head_dim, c.head_dim
        hqk = c.num_heads + c.num_kv_heads  # heads that RoPE rotates
        rope_memo: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

        def rope_for(start: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            if (start, n) not in rope_memo:
                cos, sin = self.rope.cos_sin(range(start, start + n))
                rope_memo[start, n] = (cos, sin, torch.arange(start, start + n, device=dev))
            return rope_memo[start, n]

        # Attention through the native kernels (decode and prefill chunks) where they take the shapes.
        native_attention = (not key_mass and c.sliding_window is None and self._native_attention_fits()
                            and native.enabled())
        # Sessions decoding one token with no attention hooks form the decode group: their RoPE and
        # cache writes are one call each per layer, their caches kept contiguous (zero-copy reads).
        # With the native kernels a lone session is a group too (the same kernels, the same bits).
        group = _decode_group(caches, lens, min_size=1 if native_attention else 2)
        in_group = set(group)
        abs_pos = [None if i in in_group else torch.arange(cache.n_fed, cache.n_fed + n, device=dev)
                   for i, (cache, n) in enumerate(zip(caches, lens))]
        offsets = [0]
        for n in lens:
            offsets.append(offsets[-1] + n)
        g_rows = torch.tensor([offsets[i] for i in group], dtype=torch.int64, device=dev)
        g_caches = [caches[i] for i in group]
        g_pos = torch.tensor([caches[i].n_fed for i in group], dtype=torch.int64, device=dev)
        if native_attention and len(group) == len(caches) and self._fused_decode_fits(len(group), layers):
            x = self._fused_decode_layers(g_caches, x, layers, g_pos)
            for cache in caches:
                cache.n_fed += 1
            return x
        rope_prev: tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        packed = self._packed_layers(layers)
        if packed is not None:
            x = x.contiguous().clone()  # the residual sums are written in place
        for li, layer in enumerate(self.layers[layers.start:layers.stop]):
            if packed is not None:  # RMSNorm folded into the QKV product
                qkv = native.gemm_packed_unchecked(x, packed[li].qkv, layer.b_qkv, layer.ln_attn, c.rms_norm_eps)
            else:
                qkv = linear(rms_norm(x, layer.ln_attn, c.rms_norm_eps), layer.w_qkv, layer.b_qkv)
            qkv = qkv.view(-1, hqk + c.num_kv_heads, d)  # [N, Hq + 2 Hkv, D]
            a: torch.Tensor | None = None
            if group:
                rope_at = [cc.layers[li].next_rope for cc in g_caches]
                if rope_prev is None or rope_prev[0] != rope_at:  # layers usually share positions
                    rope_t = torch.tensor(rope_at, dtype=torch.int64, device=dev)
                    cos, sin = self.rope.cos_sin(rope_t)  # [B, D]
                    rope_prev = (rope_at, rope_t, cos, sin)
                _, rope_t, cos, sin = rope_prev
                part = qkv if len(group) == len(caches) else qkv.index_select(0, g_rows)  # [B, Hq + 2 Hkv, D]
                if native_attention:  # RoPE with the cache writes, then attention: two native calls
                    slots = torch.tensor(reserve_slots(g_caches, li, rope_at), dtype=torch.int64)
                    pool = g_caches[0].pool  # after any growth in reserve_slots
                    q = native.rope_append_unchecked(part, cos, sin, slots, g_pos, rope_t, pool.flat_k(li),
                                                     pool.flat_v(li), pool.pos[li].view(-1),
                                                     pool.rope_pos[li].view(-1), c.num_heads)  # [B, Hq, D]
                    a = _native_decode_attention(g_caches, li, q, self.scale).reshape(-1, hq)
                else:
                    qk = apply_rope(part[:, :hqk], cos[:, None], sin[:, None])  # [B, Hq + Hkv, D]
                    append_one_each(g_caches, li, qk[:, c.num_heads:], part[:, hqk:], g_pos, rope_at)
                    a = self._group_attention(g_caches, li, qk[:, :c.num_heads], key_mass)
                if len(group) < len(caches):
                    a = torch.empty(x.shape[0], hq, dtype=x.dtype, device=dev).index_copy_(0, g_rows, a)
            outs = []
            off = 0
            for i, ((cache, _), n, pos) in enumerate(zip(batch, lens, abs_pos)):
                if i in in_group:
                    off += n
                    continue
                cos, sin, rpos = rope_for(cache.layers[li].next_rope, n)
                part = qkv[off:off + n].transpose(0, 1)  # [Hq + 2 Hkv, n, D]
                qk = apply_rope(part[:hqk], cos, sin)  # [Hq + Hkv, n, D], one call for q and k
                q, k, v = qk[:c.num_heads], qk[c.num_heads:], part[hqk:]
                past = cache.layers[li].length
                cache.append(li, k, v, pos, rpos)
                policy = cache.policy
                if policy is not None and getattr(policy, "observes_queries", False):
                    policy.observe(li, q, rpos)
                extend = policy is not None and getattr(policy, "extends_attention", False)
                if native_attention and not extend:
                    if n == 1:  # the decode group's kernel: the same bits
                        o = _native_decode_attention([cache], li, q.transpose(0, 1), self.scale).view(n, hq)
                    else:  # a prefill chunk over the cache it was just appended to
                        keys, values = cache.kv(li)
                        o = native.causal_attention_unchecked(q, keys, values, past, self.scale).view(n, hq)
                    if a is not None:
                        a[off:off + n] = o
                    else:
                        outs.append(o)
                    off += n
                    continue
                keys, values = cache.kv(li)
                res = attention(q[None], keys[None], values[None], causal=True, q_offset=past,
                                window=c.sliding_window, scale=self.scale, return_lse=extend,
                                return_key_mass=key_mass)
                if not isinstance(res, tuple):
                    res = (res,)
                o = res[0]
                if key_mass:
                    cache.add_key_mass(li, _group_mass(res[-1][0], c.num_kv_heads))
                if extend:  # keys the policy holds outside the cache (pooled, retrieved, memory)
                    o = policy.extend(li, q, rpos, o[0], res[1][0], self.rerotate)[None]
                o = o[0].transpose(0, 1).reshape(n, hq)  # [n, Hq D]
                if a is not None:
                    a[off:off + n] = o
                else:
                    outs.append(o)
                off += n
            if a is None:
                a = outs[0] if len(outs) == 1 else torch.cat(outs)
            if packed is not None:  # residuals added in place by the products, the SwiGLU pair in one pass
                native.gemm_packed_unchecked(a, packed[li].o, layer.b_o, residual=x, out=x)
                mid = native.gemm_packed_unchecked(x, packed[li].gate_up, norm_weight=layer.ln_mlp, eps=c.rms_norm_eps)
                native.gemm_packed_unchecked(mid, packed[li].down, layer.b_down, residual=x, out=x)
                continue
            x = x + linear(a, layer.w_o, layer.b_o)
            h = rms_norm(x, layer.ln_mlp, c.rms_norm_eps)
            gate = linear(h, layer.w_gate, layer.b_gate)  # [N, I]
            x = x + linear(silu_mul(gate, linear(h, layer.w_up, layer.b_up)), layer.w_down, layer.b_down)
        for (cache, _), n in zip(batch, lens):
            cache.n_fed += n
        return x

    def _packs(self) -> bool:
        """Whether this model's products run over packed weights (`native.gemm_packed`): fp32 CPU,
        native kernels on (and `linear`'s fast paths), no MLP biases (the fused SwiGLU has none; no
        Llama-family checkpoint here uses them), nothing autograd must see."""
        return (self.dtype == torch.float32 and self.device.type == "cpu" and not self._mlp_biases
                and not torch.is_grad_enabled() and choose_path(1, 1, 1)[0] == "native")

    def _packed_layers(self, layers: range) -> list[_PackedLayer] | None:
        """The packed matrices of `layers` (packed on first use, into one buffer on huge pages), or
        None where the products take the torch path."""
        if not self._packs():
            return None
        if self._packed is None:
            self._packed = self._pack_layers()
        out = self._packed[layers.start:layers.stop]
        return None if any(p is None for p in out) else out  # type: ignore[return-value]

    def _pack_layers(self) -> list[_PackedLayer | None]:
        """Pack every held layer's matrices once: the layout every product reads (decode's few rows
        and prefill's many, the same bits at any row count). The plain weights stay for the torch
        paths; their pages are handed back to the kernel (`release_pages`: a mapped checkpoint's
        are read again from the file if a torch path needs them), so the packed copy does not
        double the resident weights."""
        c = self.config
        qkv_rows = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim

        def sizes(layer: _Layer) -> list[int]:  # qkv, o, the SwiGLU pair, down
            return [native.packed_floats(qkv_rows, c.hidden_size), native.packed_floats(*layer.w_o.shape),
                    native.packed_floats(*layer.w_gate.shape, swiglu=True), native.packed_floats(*layer.w_down.shape)]

        buffer = native.huge_page_floats(sum(sum(sizes(layer)) for layer in self.layers if layer is not None))
        out: list[_PackedLayer | None] = []
        at = 0
        for layer in self.layers:
            if layer is None:
                out.append(None)
                continue
            parts = []
            for n in sizes(layer):
                parts.append(buffer[at:at + n])
                at += n
            out.append(_PackedLayer(
                qkv=_pack_stacked([layer.w_q, layer.w_k, layer.w_v], parts[0]),
                o=native.pack_weights(layer.w_o, out=parts[1]),
                gate_up=native.pack_swiglu(layer.w_gate, layer.w_up, out=parts[2]),
                down=native.pack_weights(layer.w_down, out=parts[3])))
            layer.__dict__.pop("w_qkv", None)  # a stacked copy an earlier torch path made: remade if needed
            for t in (layer.w_q, layer.w_k, layer.w_v, layer.w_o, layer.w_gate, layer.w_up, layer.w_down):
                native.release_pages(t)
        return out

    def _fused_decode_fits(self, rows: int, layers: range) -> bool:
        """Whether a decode step of `rows` sessions through `layers` runs each layer as one native
        call (`native.decode_layer_unchecked`): exactly where the separate calls would all be native."""
        if not self.fused_decode or rows > NATIVE_MAX_ROWS or self._packed_layers(layers) is None:
            return False
        if self._layer_weights is None:  # None for a layer this model does not hold (a pipeline stage's)
            c = self.config
            assert self._packed is not None
            self._layer_weights = [
                None if layer is None or packed is None else native.layer_weights(
                    {"ln_attn": layer.ln_attn, "w_qkv": packed.qkv, "b_qkv": layer.b_qkv, "w_o": packed.o,
                     "b_o": layer.b_o, "ln_mlp": layer.ln_mlp, "w_gate_up": packed.gate_up, "w_down": packed.down,
                     "b_down": layer.b_down},
                    num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, eps=c.rms_norm_eps,
                    scale=self.scale)
                for layer, packed in zip(self.layers, self._packed)]
        return all(w is not None for w in self._layer_weights[layers.start:layers.stop])

    def _fused_decode_layers(self, caches: Sequence[SessionKV], x: torch.Tensor, layers: range,
                             positions: torch.Tensor) -> torch.Tensor:
        """`forward_layers` for a step where every session decodes one token with the native kernels:
        one native call a layer. x `[B, H]`; positions `[B]` the new tokens' absolute positions.

        The layers of a step usually share their RoPE positions and block layout, so the tensors
        the kernel reads (and the pointers to them) are rebuilt only where a layer differs."""
        x = x.contiguous().clone()  # updated in place by the kernel; the caller's tensor stays as it was
        weights_of = self._layer_weights[layers.start:layers.stop]
        scratch = native.decode_scratch(weights_of[0], len(caches))
        args = native.LayerCache()
        args.pos = positions.data_ptr()
        keep: dict[str, torch.Tensor] = {}  # the tensors args points into
        rope_prev: list[int] | None = None
        layout_prev: list[tuple[int, int, int]] | None = None
        for li, weights in enumerate(weights_of):
            rope_at = [cc.layers[li].next_rope for cc in caches]
            if rope_at != rope_prev:
                rope_prev = rope_at
                keep["rope_pos"] = torch.tensor(rope_at, dtype=torch.int64)
                cos, sin = self.rope.cos_sin(keep["rope_pos"])  # [B, D]
                keep["cos"], keep["sin"] = cos.contiguous(), sin.contiguous()
                for name in ("rope_pos", "cos", "sin"):
                    setattr(args, name, keep[name].data_ptr())
                args.ldcs = cos.shape[1] if cos.shape[0] > 1 else 0
            slot_list = reserve_slots(caches, li, rope_at)  # each table now one run of blocks
            layout = [(t.blocks[0], len(t.blocks), t.length) for t in (cc.layers[li] for cc in caches)]
            if layout != layout_prev:
                layout_prev = layout
                keep["slots"] = torch.tensor(slot_list, dtype=torch.int64)
                keep["blocks"], keep["offsets"], keep["lengths"] = _block_tables(caches, li)
                for name in ("slots", "blocks", "offsets", "lengths"):
                    setattr(args, name, keep[name].data_ptr())
            pool = caches[0].pool  # after any growth in reserve_slots
            k_pool = pool.k[li]  # [Hkv, blocks, block_size, D]
            args.S, args.bs = k_pool.shape[1] * pool.block_size, pool.block_size
            args.k_pool, args.v_pool = k_pool.data_ptr(), pool.v[li].data_ptr()
            args.pos_pool, args.rope_pool = pool.pos[li].data_ptr(), pool.rope_pos[li].data_ptr()
            native.decode_layer_unchecked(weights, args, x, scratch)
        return x

    def _group_attention(self, caches: Sequence[SessionKV], li: int, q: torch.Tensor, key_mass: bool) -> torch.Tensor:
        """The decode group's attention through torch: q `[B, Hq, D]` -> `[B, Hq D]`; one padded
        call on `PADDED_DECODE_DEVICES`, else one call per session over its zero-copy cache view."""
        c = self.config
        hq = c.num_heads * c.head_dim
        if q.device.type in PADDED_DECODE_DEVICES and not key_mass and c.sliding_window is None:
            return _padded_decode_attention(caches, li, q, self.scale).reshape(-1, hq)
        out = []
        for j, cache in enumerate(caches):
            keys, values = cache.kv(li)
            res = attention(q[j, None, :, None], keys[None], values[None], causal=True,
                            q_offset=cache.layers[li].length - 1, window=c.sliding_window,
                            scale=self.scale, return_key_mass=key_mass)
            if key_mass:
                cache.add_key_mass(li, _group_mass(res[1][0], c.num_kv_heads))
                res = res[0]
            out.append(res.reshape(hq))
        return torch.stack(out)  # [B, Hq D]

    def _native_attention_fits(self) -> bool:
        """Whether the native decode attention kernel takes this model's shapes on its device."""
        c = self.config
        return (self.device.type == "cpu" and self.dtype == torch.float32 and c.head_dim % 16 == 0
                and c.head_dim <= native.kernels.MAX_HEAD_DIM
                and c.num_heads // c.num_kv_heads <= native.kernels.MAX_GROUP)

    def head(self, x: torch.Tensor, lens: Sequence[int], flags: Sequence[bool]) -> list[torch.Tensor]:
        """Final norm and lm_head on `x [N, H]`: per session `[T_i, V]` where `flags[i]`, else `[V]`."""
        c = self.config
        rows, off = [], 0
        for n, flag in zip(lens, flags):
            rows.append(x[off:off + n] if flag else x[off + n - 1:off + n])
            off += n
        sel = rows[0] if len(rows) == 1 else torch.cat(rows)
        if self._packs():  # the final norm folded into the product
            if self._packed_head is None:
                self._packed_head = _pack_releasing(self.lm_head)  # a tied embedding's lookups touch a few rows again
            logits = native.gemm_packed_unchecked(sel, self._packed_head, norm_weight=self.norm, eps=c.rms_norm_eps)
        else:
            logits = linear(rms_norm(sel, self.norm, c.rms_norm_eps), self.lm_head)  # [R, V]
        out, off = [], 0
        for r, flag in zip(rows, flags):
            m = r.shape[0]
            out.append(logits[off:off + m] if flag else logits[off])
            off += m
        return out

    # -- state as data ----------------------------------------------------------------------------
    def state_to_blob(self, state: SessionKV) -> StateBlob:
        """The kept K/V/positions of every layer in logical order, plus counters (bit-exact)."""
        tensors: dict[str, torch.Tensor] = {}
        for li in range(self.config.num_layers):
            k, v = state.kv(li)
            pos, rpos = state.positions(li)
            tensors[f"k.{li}"], tensors[f"v.{li}"] = k.contiguous(), v.contiguous()
            tensors[f"pos.{li}"], tensors[f"rope_pos.{li}"] = pos.contiguous(), rpos.contiguous()
            if state.key_mass[li] is not None:
                tensors[f"key_mass.{li}"] = state.key_mass[li]  # type: ignore[assignment]
        meta = {"n_fed": state.n_fed, "next_rope": [t.next_rope for t in state.layers],
                "n_new": list(state.n_new)}
        return StateBlob("llama.session", tensors, meta)

    @torch.inference_mode()  # writes into pool tensors that forward may have grown (inference tensors)
    def state_from_blob(self, blob: StateBlob) -> SessionKV:
        c = self.config
        state = self.new_state()
        for li in range(c.num_layers):
            k = blob.tensors.get(f"k.{li}")
            want = (c.num_kv_heads, c.head_dim)
            if k is None or k.dim() != 3 or (k.shape[0], k.shape[2]) != want:
                state.free()
                raise ValueError(f"session state does not fit this model: layer {li} keys "
                                 f"{None if k is None else list(k.shape)}, expected [{want[0]}, T, {want[1]}]")
            state.append(li, k.to(self.device, self.dtype), blob.tensors[f"v.{li}"].to(self.device, self.dtype),
                         blob.tensors[f"pos.{li}"].to(self.device), blob.tensors[f"rope_pos.{li}"].to(self.device))
            state.layers[li].next_rope = int(blob.meta["next_rope"][li])
            mass = blob.tensors.get(f"key_mass.{li}")
            state.key_mass[li] = None if mass is None else mass.to(self.device)
        state.n_fed = int(blob.meta["n_fed"])
        state.n_new = [int(n) for n in blob.meta["n_new"]]
        return state


def _pack_stacked(parts: list[torch.Tensor], out: torch.Tensor) -> native.PackedWeight:
    """`native.pack_weights(torch.cat(parts))` into `out`, without the stacked copy where every part
    but the last is whole strips (32 rows: q/k/v of SmolLM2, Qwen2, Llama 3)."""
    k = parts[0].shape[1]
    n = sum(p.shape[0] for p in parts)
    if any(p.shape[0] % 32 for p in parts[:-1]):
        return native.pack_weights(torch.cat(parts), out=out)
    r0 = 0
    for part in parts:  # rows r0.. start at strip r0 / 32, float r0 * k
        native.pack_weights(part, out=out[r0 * k:r0 * k + native.packed_floats(part.shape[0], k)])
        r0 += part.shape[0]
    return native.PackedWeight(out.view(-1, k, 32), n, k, False)


def _pack_releasing(weight: torch.Tensor, rows_per_chunk: int = 4096) -> native.PackedWeight:
    """`native.pack_weights(weight)` a chunk of rows at a time, handing each chunk's plain pages
    back as it goes (`native.release_pages`): a vocabulary-sized lm_head is never resident twice."""
    n, k = weight.shape
    strips = native.huge_page_floats(native.packed_floats(n, k))
    for r0 in range(0, n, rows_per_chunk):  # a multiple of 32 rows: chunk r0 starts at strip r0 / 32
        part = weight[r0:r0 + rows_per_chunk]
        native.pack_weights(part, out=strips[r0 * k:r0 * k + native.packed_floats(part.shape[0], k)])
        native.release_pages(part)
    return native.PackedWeight(strips.view(-1, k, 32), n, k, False)


# Devices where the decode group's attention runs as one padded call: on a GPU each per-session call
# costs a launch; on the CPU the gather costs more than the calls (module docstring).
PADDED_DECODE_DEVICES = frozenset({"cuda"})


def _padded_decode_attention(caches: Sequence[SessionKV], layer: int, q: torch.Tensor, scale: float
                             ) -> torch.Tensor:
    """The decode group's attention in one call: q `[B, Hq, D]` (one token each, after its own key
    was appended) -> `[B, Hq, D]`. Each session's keys (a single run in the pool) are gathered into
    a padded `[B, Hkv, Tmax, D]` batch with a key-padding mask; query heads are regrouped per KV
    head, so GQA needs no key copies."""
    pool = caches[0].pool
    b, hq, d = q.shape
    hkv, bs, dev = pool.num_kv_heads, pool.block_size, q.device
    tables = [cache.layers[layer] for cache in caches]
    assert all(t.contiguous for t in tables), "the decode group keeps each cache a single run"
    lengths = torch.tensor([t.length for t in tables], device=dev)
    starts = torch.tensor([t.blocks[0] * bs for t in tables], device=dev)
    steps = torch.arange(max(t.length for t in tables), device=dev)
    valid = steps[None, :] < lengths[:, None]  # [B, Tmax]
    idx = (starts[:, None] + steps[None, :]).masked_fill_(~valid, 0).view(-1)
    k, v = (x.index_select(1, idx).view(hkv, b, -1, d).transpose(0, 1)  # [B, Hkv, Tmax, D]
            for x in (pool.flat_k(layer), pool.flat_v(layer)))
    out = F.scaled_dot_product_attention(q.view(b, hkv, hq // hkv, d), k, v, attn_mask=valid[:, None, None, :],
                                         scale=scale)  # [B, Hkv, G, D]
    return out.reshape(b, hq, d)


def _native_decode_attention(caches: Sequence[SessionKV], layer: int, q: torch.Tensor, scale: float
                             ) -> torch.Tensor:
    """Decode attention of sessions that each appended one token (its key already in the cache):
    q `[B, Hq, D]` -> `[B, Hq, D]`, straight from the pool's blocks through each block table
    (`streamctx.operators.cpu.paged_decode_attention`; no gather, any table layout)."""
    pool = caches[0].pool
    blocks, offsets, lengths = _block_tables(caches, layer)
    return native.paged_decode_attention_unchecked(q.contiguous(), pool.flat_k(layer), pool.flat_v(layer), blocks,
                                                   offsets, lengths, pool.block_size, scale)


def _block_tables(caches: Sequence[SessionKV], layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sessions' block tables of `layer` as the native kernels take them: blocks (int32, one
    table after another), offsets `[B + 1]` and lengths `[B]` (int64)."""
    blocks: list[int] = []
    offsets, lengths = [0], []
    for cache in caches:
        table = cache.layers[layer]
        blocks.extend(table.blocks)
        offsets.append(len(blocks))
        lengths.append(table.length)
    return (torch.tensor(blocks, dtype=torch.int32), torch.tensor(offsets, dtype=torch.int64),
            torch.tensor(lengths, dtype=torch.int64))


def _decode_group(caches: Sequence[SessionKV], lens: Sequence[int], *, min_size: int = 2) -> list[int]:
    """Indices of the sessions that decode one token and whose policy has no attention hooks
    (none when fewer than `min_size`)."""
    out = []
    for i, (cache, n) in enumerate(zip(caches, lens)):
        policy = cache.policy
        hooks = policy is not None and (getattr(policy, "observes_queries", False)
                                        or getattr(policy, "extends_attention", False))
        if n == 1 and not hooks:
            out.append(i)
    return out if len(out) >= min_size else []


def _group_mass(mass: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Key mass `[Hq or Hkv, Tk]` summed to `[Hkv, Tk]` over the query heads of each group."""
    if mass.shape[0] == num_kv_heads:
        return mass
    return mass.view(num_kv_heads, -1, mass.shape[-1]).sum(1)
