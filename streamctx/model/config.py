"""Model configurations: frozen dataclasses the decoders are built from.

Two families are supported:

- `LlamaConfig`: the Llama family (Llama, SmolLM2, Qwen2 with q/k/v bias, Mistral-like).
- `MambaConfig`: the layout of Hugging Face `MambaForCausalLM`.

Both are parsed from a Hugging Face `config.json` (`from_hf_dict`) or built from GGUF metadata
(see `gguf_file.py`). Invalid values raise `ModelLoadError` naming the field and the value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping


class ModelLoadError(ValueError):
    """A model could not be loaded; the message names the file, field or tensor and the value."""


def _positive(owner: str, **values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ModelLoadError(f"{owner}.{name} must be a positive integer, got {value!r}")


def _special_ids(owner: str, vocab_size: int, bos: int | None, eos: tuple[int, ...]) -> None:
    """BOS/EOS ids must be rows of the embedding (a generation would never stop on an EOS past it)."""
    for name, ids in (("bos_token_id", () if bos is None else (bos,)), ("eos_token_ids", eos)):
        bad = [i for i in ids if not (type(i) is int and 0 <= i < vocab_size)]
        if bad:
            raise ModelLoadError(f"{owner}.{name} holds {bad[0]!r}, outside the vocabulary [0, {vocab_size})")


@dataclass(frozen=True)
class LlamaConfig:
    """Llama-family decoder.

    Attention projections: q `[num_heads * head_dim, hidden_size]`, k/v
    `[num_kv_heads * head_dim, hidden_size]`, o `[hidden_size, num_heads * head_dim]`.
    `attention_bias` adds biases to q/k/v (Qwen2, or Llama with `attention_bias=true`);
    `o_proj_bias` adds one to o (Llama with `attention_bias=true` only; Qwen2 has none).
    `rope_scaling` is the Hugging Face dict (`rope_type`: "llama3", "linear", "dynamic", ...)
    or None for plain RoPE with base `rope_theta`.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    architecture: str = "llama"
    o_proj_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        _positive(
            "LlamaConfig",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
        )
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"LlamaConfig.num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ModelLoadError(f"LlamaConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise ModelLoadError(f"LlamaConfig.rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ModelLoadError(f"LlamaConfig.rope_theta must be positive, got {self.rope_theta!r}")
        if self.hidden_act != "silu":
            raise ModelLoadError(f"LlamaConfig.hidden_act={self.hidden_act!r} is not supported (only 'silu')")
        _special_ids("LlamaConfig", self.vocab_size, self.bos_token_id, self.eos_token_ids)

    @property
    def num_groups(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter of the Hugging Face model with its shape, by Hugging Face name."""
        h, d, q, kv = self.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (self.vocab_size, h),
            "model.norm.weight": (h,),
        }
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            shapes[p + "input_layernorm.weight"] = (h,)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
            shapes[p + "self_attn.q_proj.weight"] = (q * d, h)
            shapes[p + "self_attn.k_proj.weight"] = (kv * d, h)
            shapes[p + "self_attn.v_proj.weight"] = (kv * d, h)
            shapes[p + "self_attn.o_proj.weight"] = (h, q * d)
            if self.attention_bias:
                shapes[p + "self_attn.q_proj.bias"] = (q * d,)
                shapes[p + "self_attn.k_proj.bias"] = (kv * d,)
                shapes[p + "self_attn.v_proj.bias"] = (kv * d,)
            if self.o_proj_bias:
                shapes[p + "self_attn.o_proj.bias"] = (h,)
            for proj, shape in (
                ("gate_proj", (self.intermediate_size, h)),
                ("up_proj", (self.intermediate_size, h)),
                ("down_proj", (h, self.intermediate_size)),
            ):
                shapes[p + f"mlp.{proj}.weight"] = shape
                if self.mlp_bias:
                    shapes[p + f"mlp.{proj}.bias"] = (shape[0],)
        return shapes


@dataclass(frozen=True)
class MambaConfig:
    """Mamba (v1) decoder in the layout of Hugging Face `MambaForCausalLM`.

    Per layer: `in_proj` `[2 * intermediate_size, hidden_size]`, depthwise `conv1d`
    `[intermediate_size, 1, conv_kernel]`, `x_proj` `[time_step_rank + 2 * state_size,
    intermediate_size]`, `dt_proj` `[intermediate_size, time_step_rank]`, `A_log` and `D`
    `[intermediate_size, state_size]` / `[intermediate_size]`, `out_proj`
    `[hidden_size, intermediate_size]`, with `intermediate_size = expand * hidden_size`.
    """

    vocab_size: int
    hidden_size: int
    state_size: int
    num_layers: int
    expand: int
    conv_kernel: int
    time_step_rank: int
    use_bias: bool
    use_conv_bias: bool
    layer_norm_epsilon: float
    tie_word_embeddings: bool
    residual_in_fp32: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    architecture: str = "mamba"
    hidden_act: str = "silu"
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        _positive(
            "MambaConfig",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            state_size=self.state_size,
            num_layers=self.num_layers,
            expand=self.expand,
            conv_kernel=self.conv_kernel,
            time_step_rank=self.time_step_rank,
        )
        if not (self.layer_norm_epsilon > 0 and math.isfinite(self.layer_norm_epsilon)):
            raise ModelLoadError(
                f"MambaConfig.layer_norm_epsilon must be positive, got {self.layer_norm_epsilon!r}"
            )
        if self.hidden_act != "silu":
            raise ModelLoadError(f"MambaConfig.hidden_act={self.hidden_act!r} is not supported (only 'silu')")
        _special_ids("MambaConfig", self.vocab_size, self.bos_token_id, self.eos_token_ids)

    @property
    def intermediate_size(self) -> int:
        """Inner width of the mixer (`expand * hidden_size`)."""
        return self.expand * self.hidden_size

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter of `MambaForCausalLM` with its shape, by Hugging Face name."""
        h, e, n, r = self.hidden_size, self.intermediate_size, self.state_size, self.time_step_rank
        shapes: dict[str, tuple[int, ...]] = {
            "backbone.embeddings.weight": (self.vocab_size, h),
            "backbone.norm_f.weight": (h,),
        }
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        for i in range(self.num_layers):
            p = f"backbone.layers.{i}."
            shapes[p + "norm.weight"] = (h,)
            shapes[p + "mixer.A_log"] = (e, n)
            shapes[p + "mixer.D"] = (e,)
            shapes[p + "mixer.in_proj.weight"] = (2 * e, h)
            shapes[p + "mixer.conv1d.weight"] = (e, 1, self.conv_kernel)
            shapes[p + "mixer.x_proj.weight"] = (r + 2 * n, e)
            shapes[p + "mixer.dt_proj.weight"] = (e, r)
            shapes[p + "mixer.dt_proj.bias"] = (e,)
            shapes[p + "mixer.out_proj.weight"] = (h, e)
            if self.use_bias:
                shapes[p + "mixer.in_proj.bias"] = (2 * e,)
                shapes[p + "mixer.out_proj.bias"] = (h,)
            if self.use_conv_bias:
                shapes[p + "mixer.conv1d.bias"] = (e,)
        return shapes


ModelConfig = LlamaConfig | MambaConfig

# Hugging Face `architectures` entries we load, and the config family each maps to.
LLAMA_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}
MAMBA_ARCHITECTURES: dict[str, str] = {"MambaForCausalLM": "mamba"}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = (*LLAMA_ARCHITECTURES, *MAMBA_ARCHITECTURES)


_MISSING = object()


def _get(cfg: Mapping[str, Any], key: str, source: str, default: Any) -> Any:
    value = cfg.get(key, default)
    if value is _MISSING:
        raise ModelLoadError(f"{source}: missing field {key!r}")
    return value


def _int(cfg: Mapping[str, Any], key: str, source: str, default: Any = _MISSING) -> int:
    """An integer field, exactly (a JSON `64`, not `64.0`, `"64"` or `true`)."""
    value = _get(cfg, key, source, default)
    if type(value) is not int:
        raise ModelLoadError(f"{source}: {key} must be an integer, got {value!r}")
    return value


def _opt_int(cfg: Mapping[str, Any], key: str, source: str) -> int | None:
    value = cfg.get(key)
    if value is not None and (type(value) is not int or value < 0):
        raise ModelLoadError(f"{source}: {key} must be a non-negative integer or null, got {value!r}")
    return value


def _float(cfg: Mapping[str, Any], key: str, source: str, default: Any = _MISSING) -> float:
    value = _get(cfg, key, source, default)
    if type(value) not in (int, float) or not math.isfinite(value):
        raise ModelLoadError(f"{source}: {key} must be a finite number, got {value!r}")
    return float(value)


def _bool(cfg: Mapping[str, Any], key: str, source: str, default: bool) -> bool:
    value = cfg.get(key, default)
    if type(value) is not bool:
        raise ModelLoadError(f"{source}: {key} must be true or false, got {value!r}")
    return value


def _str(cfg: Mapping[str, Any], key: str, source: str, default: str) -> str:
    value = cfg.get(key, default)
    if not isinstance(value, str):
        raise ModelLoadError(f"{source}: {key} must be a string, got {value!r}")
    return value


def eos_ids(value: Any, *, source: str, key: str = "eos_token_id") -> tuple[int, ...]:
    """`eos_token_id` as written by Hugging Face: null, an id, or a list of ids."""
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    if not all(type(v) is int and v >= 0 for v in items):
        raise ModelLoadError(f"{source}: {key} must be a token id or a list of token ids, got {value!r}")
    return tuple(items)


def _rope_from_hf(cfg: Mapping[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from a config dict written by transformers 4 or 5.

    transformers 4 writes `rope_theta` and `rope_scaling`; 5 writes `rope_parameters` holding both.
    Scaling dicts are normalised to carry `rope_type` (older files say `type`); plain RoPE is None.
    """
    for key in ("rope_parameters", "rope_scaling"):
        if cfg.get(key) is not None and not isinstance(cfg[key], Mapping):
            raise ModelLoadError(f"{source}: {key} must be an object or null, got {cfg[key]!r}")
    params = cfg.get("rope_parameters")
    key = "rope_parameters" if params is not None else "rope_scaling"
    raw = params if params is not None else cfg.get("rope_scaling")
    scaling = dict(raw or {})
    theta = _float({"rope_theta": scaling.pop("rope_theta", cfg.get("rope_theta", 10000.0))}, "rope_theta", source)
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    kind = scaling.get("rope_type", "default")
    if not isinstance(kind, str):
        raise ModelLoadError(f"{source}: {key}.rope_type must be a string, got {kind!r}")
    if kind == "default":
        return theta, None
    for name, value in scaling.items():
        numbers = value if isinstance(value, list) else [value]
        if name != "rope_type" and not all(
                v is None or type(v) is bool or (type(v) in (int, float) and math.isfinite(v)) for v in numbers):
            raise ModelLoadError(f"{source}: {key}.{name} must be a finite number, got {value!r}")
    return theta, scaling


def llama_config_from_hf(cfg: Mapping[str, Any], architecture: str, *, source: str = "config.json") -> LlamaConfig:
    """Build a `LlamaConfig` from a Hugging Face config dict of a Llama-family model."""
    family = LLAMA_ARCHITECTURES[architecture]
    hidden = _int(cfg, "hidden_size", source)
    heads = _int(cfg, "num_attention_heads", source)
    if heads <= 0:
        raise ModelLoadError(f"{source}: num_attention_heads must be a positive integer, got {heads!r}")
    theta, scaling = _rope_from_hf(cfg, source)
    if family == "qwen2":
        qkv_bias, o_bias = True, False
    else:
        qkv_bias = o_bias = _bool(cfg, "attention_bias", source, False)
    sliding = _opt_int(cfg, "sliding_window", source)
    if family == "qwen2" and not _bool(cfg, "use_sliding_window", source, False):
        sliding = None
    head_dim = cfg.get("head_dim")
    return LlamaConfig(
        vocab_size=_int(cfg, "vocab_size", source),
        hidden_size=hidden,
        intermediate_size=_int(cfg, "intermediate_size", source),
        num_layers=_int(cfg, "num_hidden_layers", source),
        num_heads=heads,
        num_kv_heads=heads if cfg.get("num_key_value_heads") is None else _int(cfg, "num_key_value_heads", source),
        head_dim=_int(cfg, "head_dim", source) if head_dim is not None else hidden // heads,
        rms_norm_eps=_float(cfg, "rms_norm_eps", source, 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=_int(cfg, "max_position_embeddings", source, 2048),
        tie_word_embeddings=_bool(cfg, "tie_word_embeddings", source, False),
        attention_bias=qkv_bias,
        bos_token_id=_opt_int(cfg, "bos_token_id", source),
        eos_token_ids=eos_ids(cfg.get("eos_token_id"), source=source),
        architecture=family,
        o_proj_bias=o_bias,
        mlp_bias=_bool(cfg, "mlp_bias", source, False),
        hidden_act=_str(cfg, "hidden_act", source, "silu"),
        sliding_window=sliding or None,
    )


def mamba_config_from_hf(cfg: Mapping[str, Any], *, source: str = "config.json") -> MambaConfig:
    """Build a `MambaConfig` from a Hugging Face `MambaConfig` dict."""
    hidden = _int(cfg, "hidden_size", source)
    rank = cfg.get("time_step_rank", "auto")
    rank = math.ceil(hidden / 16) if rank == "auto" else _int(cfg, "time_step_rank", source)
    expand = _int(cfg, "expand", source, 2)
    inner = cfg.get("intermediate_size")
    if inner is not None and _int(cfg, "intermediate_size", source) != expand * hidden:
        raise ModelLoadError(
            f"{source}: intermediate_size={inner} does not equal expand * hidden_size = {expand * hidden}"
        )
    return MambaConfig(
        vocab_size=_int(cfg, "vocab_size", source),
        hidden_size=hidden,
        state_size=_int(cfg, "state_size", source, 16),
        num_layers=_int(cfg, "num_hidden_layers", source),
        expand=expand,
        conv_kernel=_int(cfg, "conv_kernel", source, 4),
        time_step_rank=rank,
        use_bias=_bool(cfg, "use_bias", source, False),
        use_conv_bias=_bool(cfg, "use_conv_bias", source, True),
        layer_norm_epsilon=_float(cfg, "layer_norm_epsilon", source, 1e-5),
        tie_word_embeddings=_bool(cfg, "tie_word_embeddings", source, True),
        residual_in_fp32=_bool(cfg, "residual_in_fp32", source, True),
        bos_token_id=_opt_int(cfg, "bos_token_id", source),
        eos_token_ids=eos_ids(cfg.get("eos_token_id"), source=source),
        hidden_act=_str(cfg, "hidden_act", source, "silu"),
        pad_token_id=_opt_int(cfg, "pad_token_id", source),
    )


def config_from_hf(cfg: Mapping[str, Any], *, source: str = "config.json") -> ModelConfig:
    """Dispatch on `architectures` (or `model_type`) to the matching config family."""
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ModelLoadError(f"{source}: architectures must be a list of names, got {archs!r}")
    if not archs:
        by_type = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
                   "mamba": "MambaForCausalLM"}
        model_type = cfg.get("model_type")
        if not isinstance(model_type, str) or model_type not in by_type:
            raise ModelLoadError(
                f"{source}: no 'architectures' and unsupported model_type {model_type!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        archs = [by_type[model_type]]
    arch = archs[0]
    if arch in LLAMA_ARCHITECTURES:
        return llama_config_from_hf(cfg, arch, source=source)
    if arch in MAMBA_ARCHITECTURES:
        return mamba_config_from_hf(cfg, source=source)
    raise ModelLoadError(
        f"{source}: unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """Plain dict of a config (for logs and cache metadata)."""
    return {f.name: getattr(config, f.name) for f in fields(config)}
