"""Read a Hugging Face model folder: `config.json`, `*.safetensors` (sharded through
`model.safetensors.index.json` or not) and `tokenizer.json`.

Only safetensors are read; pickled `pytorch_model.bin` files are refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from streamctx.model.checkpoint import Checkpoint, validate_weights
from streamctx.model.config import ModelConfig, ModelLoadError, config_from_hf, eos_ids
from streamctx.model.tokenizer import Tokenizer

INDEX_FILE = "model.safetensors.index.json"

# Buffers some checkpoints carry that are not parameters of the model.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: file is missing") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from exc


def read_hf_config(folder: Path) -> ModelConfig:
    """Config of a HF folder; EOS ids from `generation_config.json` when it names them."""
    path = folder / "config.json"
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    config = config_from_hf(cfg, source=str(path))
    generation = folder / "generation_config.json"
    if generation.is_file():
        gen = _read_json(generation)
        if not isinstance(gen, dict):
            raise ModelLoadError(f"{generation}: expected a JSON object")
        if gen.get("eos_token_id") is not None:
            config = dataclasses.replace(config, eos_token_ids=eos_ids(gen["eos_token_id"], source=str(generation)))
    return config


def _weight_files(folder: Path) -> dict[Path, list[str] | None]:
    """Safetensors files to read, each with the tensor names the index assigns it (None: all)."""
    index = folder / INDEX_FILE
    if index.is_file():
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index}: no 'weight_map'")
        files: dict[Path, list[str] | None] = {}
        for name, file in weight_map.items():
            if not isinstance(file, str) or Path(file).name != file or not file.endswith(".safetensors"):
                raise ModelLoadError(f"{index}: tensor {name!r} is mapped to {file!r}, not a .safetensors file "
                                     "in this folder")
            names = files.setdefault(folder / file, [])
            assert names is not None
            names.append(name)
        for file in files:
            if not file.is_file():
                raise ModelLoadError(f"{index}: lists shard {file.name}, which is missing")
        return files
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return {f: None for f in found}
    pickled = [p.name for p in folder.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"}]
    if pickled:
        raise ModelLoadError(
            f"{folder}: only pickled weights ({', '.join(sorted(pickled))}); these are refused because loading "
            "them can run arbitrary code. Convert the model to safetensors "
            "(transformers: model.save_pretrained(folder, safe_serialization=True))"
        )
    raise ModelLoadError(f"{folder}: no *.safetensors weight files")


def read_safetensors(files: dict[Path, list[str] | None], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors of the given files, converted to `dtype` (tensor name -> tensor)."""
    weights: dict[str, torch.Tensor] = {}
    for file, names in files.items():
        try:
            with safe_open(str(file), framework="pt") as f:
                present = set(f.keys())
                wanted = names if names is not None else sorted(present)
                for name in wanted:
                    if name not in present:
                        raise ModelLoadError(f"{file}: the index places tensor {name!r} here, but the file lacks it")
                    if name.endswith(_IGNORED_SUFFIXES):
                        continue
                    weights[name] = f.get_tensor(name).to(dtype)
        except ModelLoadError:
            raise
        except Exception as exc:  # SafetensorError, OSError: truncated, corrupt or unreadable
            raise ModelLoadError(f"{file}: not a readable safetensors file (truncated or corrupt?): {exc}") from exc
    return weights


def load_hf_checkpoint(folder: Path, *, dtype: torch.dtype = torch.float32) -> Checkpoint:
    """`Checkpoint` from a Hugging Face folder (validated against its config)."""
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: not a folder")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder}: no config.json; expected a Hugging Face model folder or a .gguf file")
    config = read_hf_config(folder)
    tokenizer_path = folder / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise ModelLoadError(f"{folder}: no tokenizer.json (a model folder needs its tokenizer)")
    weights = read_safetensors(_weight_files(folder), dtype)
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)  # some writers store the tied copy; it is the embedding
    validate_weights(weights, config, source=str(folder))
    tokenizer = Tokenizer.from_file(tokenizer_path)
    if not config.eos_token_ids and tokenizer.eos_token_ids:
        config = dataclasses.replace(config, eos_token_ids=tokenizer.eos_token_ids)
    return Checkpoint(config=config, weights=weights, tokenizer=tokenizer, source=str(folder))
