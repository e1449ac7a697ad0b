"""Model runtime: Llama-family and Mamba decoders over streamctx operators, RoPE, sampling, and
checkpoint loading (GGUF or Hugging Face folders). Names are imported lazily.

- `LlamaModel` (`llama.py`): paged KV cache (`streamctx.kv`), fused QKV and gate/up matmuls.
- `MambaModel` (`mamba.py`): constant-size conv + SSM state per session, on `selective_scan`.
- `load_checkpoint` / `Checkpoint` / `ModelLoadError` (`loading.py`), configs (`config.py`).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LlamaModel": "streamctx.model.llama",
    "MambaModel": "streamctx.model.mamba",
    "MambaState": "streamctx.model.mamba",
    "Rope": "streamctx.model.rope",
    "UnsupportedRopeError": "streamctx.model.rope",
    "Sampler": "streamctx.model.sampling",
    "SamplingParams": "streamctx.model.sampling",
    "Checkpoint": "streamctx.model.loading",
    "load_checkpoint": "streamctx.model.loading",
    "LlamaConfig": "streamctx.model.config",
    "MambaConfig": "streamctx.model.config",
    "ModelLoadError": "streamctx.model.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
