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


def _eos_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _rope_from_hf(cfg: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from a config dict written by transformers 4 or 5.

    transformers 4 writes `rope_theta` and `rope_scaling`; 5 writes `rope_parameters` holding both.
    Scaling dicts are normalised to carry `rope_type` (older files say `type`); plain RoPE is None.
    """
    params = cfg.get("rope_parameters")
    scaling = dict(params) if isinstance(params, Mapping) else dict(cfg.get("rope_scaling") or {})
    theta = scaling.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        return float(theta), None
    return float(theta), scaling


def _field(cfg: Mapping[str, Any], key: str, source: str) -> Any:
    if key not in cfg:
        raise ModelLoadError(f"{source}: missing field {key!r}")
    return cfg[key]


def llama_config_from_hf(cfg: Mapping[str, Any], architecture: str, *, source: str = "config.json") -> LlamaConfig:
    """Build a `LlamaConfig` from a Hugging Face config dict of a Llama-family model."""
    family = LLAMA_ARCHITECTURES[architecture]
    hidden = int(_field(cfg, "hidden_size", source))
    heads = int(_field(cfg, "num_attention_heads", source))
    theta, scaling = _rope_from_hf(cfg)
    if family == "qwen2":
        qkv_bias, o_bias = True, False
    else:
        qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
    sliding = cfg.get("sliding_window")
    if family == "qwen2" and not cfg.get("use_sliding_window", False):
        sliding = None
    head_dim = cfg.get("head_dim") or hidden // heads
    return LlamaConfig(
        vocab_size=int(_field(cfg, "vocab_size", source)),
        hidden_size=hidden,
        intermediate_size=int(_field(cfg, "intermediate_size", source)),
        num_layers=int(_field(cfg, "num_hidden_layers", source)),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=qkv_bias,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_tuple(cfg.get("eos_token_id")),
        architecture=family,
        o_proj_bias=o_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        hidden_act=str(cfg.get("hidden_act", "silu")),
        sliding_window=int(sliding) if sliding else None,
    )


def mamba_config_from_hf(cfg: Mapping[str, Any], *, source: str = "config.json") -> MambaConfig:
    """Build a `MambaConfig` from a Hugging Face `MambaConfig` dict."""
    hidden = int(_field(cfg, "hidden_size", source))
    rank = cfg.get("time_step_rank", "auto")
    if rank == "auto":
        rank = math.ceil(hidden / 16)
    expand = int(cfg.get("expand", 2))
    inner = cfg.get("intermediate_size")
    if inner is not None and int(inner) != expand * hidden:
        raise ModelLoadError(
            f"{source}: intermediate_size={inner} does not equal expand * hidden_size = {expand * hidden}"
        )
    return MambaConfig(
        vocab_size=int(_field(cfg, "vocab_size", source)),
        hidden_size=hidden,
        state_size=int(cfg.get("state_size", 16)),
        num_layers=int(_field(cfg, "num_hidden_layers", source)),
        expand=expand,
        conv_kernel=int(cfg.get("conv_kernel", 4)),
        time_step_rank=int(rank),
        use_bias=bool(cfg.get("use_bias", False)),
        use_conv_bias=bool(cfg.get("use_conv_bias", True)),
        layer_norm_epsilon=float(cfg.get("layer_norm_epsilon", 1e-5)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        residual_in_fp32=bool(cfg.get("residual_in_fp32", True)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_tuple(cfg.get("eos_token_id")),
        hidden_act=str(cfg.get("hidden_act", "silu")),
        pad_token_id=cfg.get("pad_token_id"),
    )


def config_from_hf(cfg: Mapping[str, Any], *, source: str = "config.json") -> ModelConfig:
    """Dispatch on `architectures` (or `model_type`) to the matching config family."""
    archs = cfg.get("architectures") or []
    if not archs:
        by_type = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
                   "mamba": "MambaForCausalLM"}
        model_type = cfg.get("model_type")
        if model_type not in by_type:
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
