"""Read a llama.cpp GGUF file into a `Checkpoint`: config from metadata, dequantized weights under
Hugging Face names, and the tokenizer from the embedded vocabulary.

llama.cpp's converter permutes the rows of the Q and K projections of Llama models so that RoPE
can rotate adjacent pairs (x0, x1), (x2, x3), ...; Hugging Face (and our decoders) rotate halves
(x_i, x_{i + d/2}). `unpermute_qk` undoes it. Qwen2 files use rotate-half already and are not
permuted.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamctx.model.checkpoint import Checkpoint, validate_weights
from streamctx.model.config import LlamaConfig, ModelLoadError
from streamctx.model.gguf_cache import GGUFCache, GGUFContents
from streamctx.model.tokenizer import Tokenizer, TokenizerSettings

_log = logging.getLogger(__name__)

# general.architecture values we read, and whether their Q/K rows are stored permuted.
_ARCHITECTURES: dict[str, bool] = {"llama": True, "qwen2": False}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str:
    """Hugging Face parameter name of a llama.cpp tensor name ("blk.3.attn_q.weight" ->
    "model.layers.3.self_attn.q_proj.weight")."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match is None or match.group(2) not in _BLOCK_NAMES:
        raise KeyError(gguf_name)
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's permutation of Q/K rows (what its HF -> GGUF converter applies).

    w: `[n_head * head_dim, ...]` (weight or bias); within each head, row order
    (pair, half) -> (half, pair) becomes (pair, half) interleaved.
    """
    d = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, d, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of `permute_qk`: interleaved-pair rows back to rotate-half order.

    w: `[n_head * head_dim, ...]`; n_head is the number of heads of this projection
    (query heads for Q, KV heads for K).
    """
    if w.shape[0] % (2 * n_head):
        raise ModelLoadError(f"cannot un-permute {tuple(w.shape)} rows into {n_head} heads of even size")
    d = w.shape[0] // n_head // 2
    return w.reshape(n_head, d, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _open(path: Path) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError/IndexError/... on truncated or foreign files
        raise ModelLoadError(f"{path}: not a readable GGUF file (truncated or corrupt?): {exc}") from exc


def _fields(reader: Any, path: Path) -> dict[str, Any]:
    skip = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"}
    out: dict[str, Any] = {}
    try:
        for name, field in reader.fields.items():
            out[name] = field if name in skip else field.contents()
    except Exception as exc:
        raise ModelLoadError(f"{path}: GGUF metadata is corrupt: {exc}") from exc
    return out


def _f32(value: Any) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999974e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _require(meta: dict[str, Any], key: str, path: Path) -> Any:
    if key not in meta:
        raise ModelLoadError(f"{path}: GGUF metadata lacks {key!r}")
    return meta[key]


_ABSENT = object()


def _meta_int(meta: dict[str, Any], key: str, path: Path, default: Any = _ABSENT) -> int:
    """An integer metadata value (a GGUF file may hold any type under any key)."""
    value = _require(meta, key, path) if default is _ABSENT else meta.get(key, default)
    if type(value) is not int:
        raise ModelLoadError(f"{path}: GGUF {key} must be an integer, got {value!r}")
    return value


def _meta_float(meta: dict[str, Any], key: str, path: Path, default: Any = _ABSENT) -> float:
    value = _require(meta, key, path) if default is _ABSENT else meta.get(key, default)
    if type(value) not in (int, float) or not np.isfinite(value):
        raise ModelLoadError(f"{path}: GGUF {key} must be a finite number, got {value!r}")
    return _f32(value)


def _rope_scaling(meta: dict[str, Any], arch: str, has_rope_freqs: bool, path: Path) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if has_rope_freqs:
        raise ModelLoadError(
            f"{path}: rope_freqs.weight (Llama 3 frequency scaling) is not supported from GGUF; "
            "load the Hugging Face folder of this model instead"
        )
    if kind == "none":
        return None
    factor = _meta_float(meta, f"{arch}.rope.scaling.factor", path)
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        original = _meta_int(meta, f"{arch}.rope.scaling.original_context_length", path)
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}
    raise ModelLoadError(f"{path}: unsupported {arch}.rope.scaling.type={kind!r} (supported: none, linear, yarn)")


def _config(meta: dict[str, Any], arch: str, tensor_names: set[str], n_vocab: int, path: Path) -> LlamaConfig:
    hidden = _meta_int(meta, f"{arch}.embedding_length", path)
    heads = _meta_int(meta, f"{arch}.attention.head_count", path)
    if heads <= 0:
        raise ModelLoadError(f"{path}: GGUF {arch}.attention.head_count must be positive, got {heads}")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    has_bias = "blk.0.attn_q.bias" in tensor_names
    return LlamaConfig(
        vocab_size=_meta_int(meta, f"{arch}.vocab_size", path, n_vocab),
        hidden_size=hidden,
        intermediate_size=_meta_int(meta, f"{arch}.feed_forward_length", path),
        num_layers=_meta_int(meta, f"{arch}.block_count", path),
        num_heads=heads,
        num_kv_heads=_meta_int(meta, f"{arch}.attention.head_count_kv", path, heads),
        head_dim=_meta_int(meta, f"{arch}.attention.key_length", path, hidden // heads),
        rms_norm_eps=_meta_float(meta, f"{arch}.attention.layer_norm_rms_epsilon", path),
        rope_theta=_meta_float(meta, f"{arch}.rope.freq_base", path, 10000.0),
        rope_scaling=_rope_scaling(meta, arch, "rope_freqs.weight" in tensor_names, path),
        max_position_embeddings=_meta_int(meta, f"{arch}.context_length", path),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias=has_bias,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=(eos,) if eos is not None else (),
        architecture=arch,
        o_proj_bias="blk.0.attn_output.bias" in tensor_names,
    )


def _tokenizer(meta: dict[str, Any], path: Path) -> Tokenizer:
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ModelLoadError(
            f"{path}: tokenizer.ggml.model={model!r} is not supported (only byte-level BPE, 'gpt2')"
        )
    try:
        tokens = _require(meta, "tokenizer.ggml.tokens", path).contents()
        merges = _require(meta, "tokenizer.ggml.merges", path).contents()
        types_field = meta.get("tokenizer.ggml.token_type")
        types = types_field.contents() if types_field is not None else [1] * len(tokens)
    except ModelLoadError:
        raise
    except Exception as exc:  # undecodable token text, wrong element types: a damaged vocabulary
        raise ModelLoadError(f"{path}: GGUF tokenizer vocabulary is corrupt: {exc}") from exc
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        if meta.get(key) is not None:
            _meta_int(meta, key, path)
    eos = meta.get("tokenizer.ggml.eos_token_id")
    settings = TokenizerSettings(
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=(eos,) if eos is not None else (),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"),
    )
    try:
        return Tokenizer.from_gguf_vocab(tokens, merges, types, pre=meta.get("tokenizer.ggml.pre"), settings=settings)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{path}: {exc}") from None


def _dequantize(tensor: Any) -> np.ndarray:
    """One GGUF tensor as a float32 array in numpy (row-major, HF) order: `[out, in]` for matrices."""
    import gguf

    return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)


def read_gguf(path: str | os.PathLike[str]) -> GGUFContents:
    """Parse and dequantize a whole GGUF file (float32 weights). Prefer `load_gguf_checkpoint`,
    which caches the result."""
    path = Path(path)
    reader = _open(path)
    meta = _fields(reader, path)
    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: GGUF general.architecture={arch!r} is not supported (supported: {', '.join(_ARCHITECTURES)})"
        )
    tokenizer = _tokenizer(meta, path)
    names = {t.name for t in reader.tensors}
    config = _config(meta, arch, names, tokenizer.vocab_size, path)
    permuted = _ARCHITECTURES[arch]
    weights: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        try:
            name = hf_name(tensor.name)
        except KeyError:
            raise ModelLoadError(f"{path}: unexpected tensor {tensor.name!r} for a {arch} model") from None
        try:
            w = torch.from_numpy(_dequantize(tensor).copy())
        except Exception as exc:
            raise ModelLoadError(
                f"{path}: tensor {tensor.name!r} cannot be read (truncated or corrupt?): {exc}"
            ) from exc
        if permuted and ".attn_q." in tensor.name:
            w = unpermute_qk(w, config.num_heads)
        elif permuted and ".attn_k." in tensor.name:
            w = unpermute_qk(w, config.num_kv_heads)
        weights[name] = w.contiguous()
    validate_weights(weights, config, source=str(path))
    return GGUFContents(config, weights, tokenizer)


def read_gguf_tokenizer(path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None) -> Tokenizer:
    """Only the tokenizer of a GGUF file: from the weights cache header when cached, else from the
    file's metadata (no dequantization)."""
    path = Path(path)
    cached = GGUFCache(cache_dir).load_tokenizer(path)
    if cached is not None:
        return cached
    return _tokenizer(_fields(_open(path), path), path)


def load_gguf_checkpoint(
    path: Path, *, dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike[str] | None = None
) -> Checkpoint:
    """`Checkpoint` from a GGUF file, through the dequantized-weights cache."""

    cache = GGUFCache(cache_dir)
    contents = cache.load(path)
    if contents is None:
        contents = read_gguf(path)
        try:
            cache.store(path, contents)
        except OSError as exc:  # a read-only or full cache must not stop the load
            _log.warning("could not cache dequantized weights of %s under %s: %s", path.name, cache.root, exc)
    weights = {k: v.to(dtype) for k, v in contents.weights.items()}
    return Checkpoint(config=contents.config, weights=weights, tokenizer=contents.tokenizer, source=str(path))
