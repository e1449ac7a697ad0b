"""Cache of dequantized GGUF weights as safetensors, so a GGUF is dequantized once per machine.

One file per GGUF: `<cache>/gguf/<key>.safetensors` holding the float32 weights (HF names, Q/K
already un-permuted) and, in its string metadata, the config and the tokenizer. The key covers
the file's size, mtime and a SHA-256 of its leading bytes (the GGUF header: metadata, tokenizer
and tensor index), plus the cache format version. Entries are written to a temporary file and
renamed into place, so readers never see half a file; the directory is 0700 and files 0600.

The weights are read in place from the mapped file, so the file puts every tensor's bytes at a
multiple of `ALIGN` bytes (header padded, tensors whose size is a multiple of it first): the
native decode kernels stream weight rows with 64-byte loads, and rows that straddle cache lines
stream 1.5x slower (SmolLM2 one-row products: 25.7 vs 16.9 ms a token). Still standard
safetensors: the padding is the header's trailing spaces, which the format allows.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from streamctx.model.config import LlamaConfig, config_to_dict
from streamctx.model.tokenizer import Tokenizer, TokenizerSettings

CACHE_FORMAT = "streamctx.gguf-cache.v2"  # v2: tensors 64-byte aligned in the file
ALIGN = 64
# Bytes hashed for the key: GGUF headers (metadata with the tokenizer, then the tensor index)
# are ~2 MB for a 50k vocabulary and under 8 MiB for 150k ones.
HEADER_HASH_BYTES = 8 << 20


@dataclass
class GGUFContents:
    """What one pass over a GGUF file yields: float32 weights under HF names (Q/K un-permuted),
    config and tokenizer; the unit the cache stores."""

    config: LlamaConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer


def default_cache_dir() -> Path:
    """`$STREAMCTX_CACHE`, else `~/.cache/streamctx`."""
    env = os.environ.get("STREAMCTX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "streamctx"


def cache_key(path: Path) -> str:
    """Hex key of a GGUF file: size, mtime and a hash of its header bytes."""
    stat = path.stat()
    digest = hashlib.sha256()
    digest.update(f"{CACHE_FORMAT}:{stat.st_size}:{stat.st_mtime_ns}:".encode())
    with path.open("rb") as f:
        digest.update(f.read(HEADER_HASH_BYTES))
    return digest.hexdigest()[:32]


class GGUFCache:
    """Read and write dequantized GGUF contents under one cache directory."""

    def __init__(self, cache_dir: str | os.PathLike[str] | None = None) -> None:
        self.root = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "gguf"

    def entry(self, path: Path) -> Path:
        return self.root / f"{cache_key(path)}.safetensors"

    def load_tokenizer(self, path: Path) -> Tokenizer | None:
        """The cached tokenizer of `path` (reads only the entry's header), or None."""
        entry = self.entry(path)
        if not entry.is_file():
            return None
        try:
            with safe_open(str(entry), framework="pt") as f:
                meta = f.metadata() or {}
            return _tokenizer_from_meta(meta) if meta.get("format") == CACHE_FORMAT else None
        except Exception:
            return None

    def load(self, path: Path) -> GGUFContents | None:
        """The cached contents of `path`, or None when there is no valid entry (a corrupt one is ignored
        and rewritten by the caller)."""
        entry = self.entry(path)
        if not entry.is_file():
            return None
        try:
            with safe_open(str(entry), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != CACHE_FORMAT:
                    return None
                weights = {name: f.get_tensor(name) for name in f.keys()}
            config_dict = json.loads(meta["config"])
            config_dict["eos_token_ids"] = tuple(config_dict["eos_token_ids"])
            config = LlamaConfig(**config_dict)
            tokenizer = _tokenizer_from_meta(meta)
        except Exception:
            # safetensors raises its own error type on damaged files; any damage means "recompute".
            return None
        return GGUFContents(config, weights, tokenizer)

    def store(self, path: Path, contents: GGUFContents) -> Path:
        """Write an entry atomically; returns its path."""
        self.root.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.root.mkdir(exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        entry = self.entry(path)
        settings = contents.tokenizer.settings
        meta = {
            "format": CACHE_FORMAT,
            "source": path.name,
            "config": json.dumps(config_to_dict(contents.config)),
            "tokenizer": contents.tokenizer.to_json_str(),
            "tokenizer_settings": json.dumps(
                {
                    "bos_token_id": settings.bos_token_id,
                    "eos_token_ids": list(settings.eos_token_ids),
                    "add_bos_token": settings.add_bos_token,
                    "chat_template": settings.chat_template,
                }
            ),
        }
        tensors = {k: v.to(torch.float32).contiguous() for k, v in contents.weights.items()}
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".safetensors")  # created 0600
        try:
            try:
                write_aligned_safetensors(fd, tensors, meta)
            finally:
                os.close(fd)
            os.chmod(tmp, 0o600)
            os.replace(tmp, entry)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return entry


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
              torch.int32: "I32"}


def write_aligned_safetensors(fd: int, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write `tensors` (contiguous CPU) as safetensors to `fd` with each tensor's data at a file
    offset that is a multiple of `ALIGN` where its predecessors' sizes allow: tensors whose byte
    size is a multiple of `ALIGN` go first (all of a model's matrices, in practice)."""
    order = sorted(tensors, key=lambda k: (tensors[k].numel() * tensors[k].element_size() % ALIGN != 0, k))
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % ALIGN)  # data starts at 8 + len(text)
    buffers = [memoryview(len(text).to_bytes(8, "little") + text)]
    buffers += [memoryview(tensors[n].reshape(-1).view(torch.uint8).numpy()) for n in order if tensors[n].numel()]
    for buf in buffers:
        while buf.nbytes:
            buf = buf[os.write(fd, buf):]


def _tokenizer_from_meta(meta: dict[str, str]) -> Tokenizer:
    settings = json.loads(meta["tokenizer_settings"])
    settings["eos_token_ids"] = tuple(settings["eos_token_ids"])
    return Tokenizer.from_json_str(meta["tokenizer"], TokenizerSettings(**settings))
