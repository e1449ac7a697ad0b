"""`Checkpoint`: what loading a model yields, and the check of its weights against its config."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streamctx.model.config import ModelConfig, ModelLoadError
from streamctx.model.tokenizer import Tokenizer


@dataclass(frozen=True)
class Checkpoint:
    """A loaded model: its config, weights by Hugging Face name, and its tokenizer.

    weights: e.g. "model.layers.0.self_attn.q_proj.weight" `[num_heads * head_dim, hidden]`,
    "model.embed_tokens.weight" `[vocab, hidden]`; "lm_head.weight" is absent when tied.
    Mamba names follow `MambaForCausalLM` ("backbone.layers.0.mixer.in_proj.weight", ...).
    """

    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    source: str

    def __repr__(self) -> str:
        n = sum(t.numel() for t in self.weights.values())
        return f"Checkpoint({self.config.architecture}, {n / 1e6:.1f}M params, source={self.source!r})"


def validate_weights(weights: dict[str, torch.Tensor], config: ModelConfig, *, source: str) -> None:
    """Check names and shapes against the config; one clear error naming the tensor."""
    if config.num_layers > len(weights):  # e.g. num_hidden_layers 10**30: never list its names
        present = {name.split(".")[2] for name in weights if name.startswith("model.layers.") and name.count(".") > 2}
        first = next(i for i in range(config.num_layers) if str(i) not in present)
        raise ModelLoadError(f"{source}: missing tensors model.layers.{first}.* (the config has {config.num_layers} "
                             f"layers; the weights hold {len(weights)} tensors)")
    expected = config.expected_shapes()
    missing = [name for name in expected if name not in weights]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ModelLoadError(f"{source}: missing tensors {', '.join(missing[:5])}{more}")
    for name, shape in expected.items():
        actual = tuple(weights[name].shape)
        if actual != shape:
            raise ModelLoadError(
                f"{source}: tensor {name!r} has shape {list(actual)}, but the config expects {list(shape)}"
            )
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise ModelLoadError(
            f"{source}: tensors not used by a {config.architecture} model with this config: "
            f"{', '.join(unexpected[:5])}{more}"
        )

