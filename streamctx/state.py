"""Session state as data: named tensors plus small JSON metadata (DESIGN.md contract 4).

A `StateBlob` is what every tier (device, host, peer, disk) stores and what checkpoints write.
It reports its bytes, serialises to safetensors bytes (never pickle), and moves between devices
bit-exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

STATE_FORMAT = "streamctx.state"
STATE_FORMAT_VERSION = 1


class StateFormatError(ValueError):
    """Raised when bytes are not a streamctx state blob of a supported version."""


@dataclass
class StateBlob:
    """Named tensors and JSON-serialisable metadata of one session (or one stage of it).

    tensors: name -> tensor, any shape/dtype; kept contiguous when serialised.
    meta: small JSON-serialisable values (counters, positions, policy parameters).
    kind: what produced it (e.g. "llama.session"), checked on restore.
    """

    kind: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes of tensor storage this blob references (metadata excluded)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to(self, device: torch.device | str, *, pin_memory: bool = False) -> "StateBlob":
        """Copy to `device`; values are unchanged bit for bit."""
        dev = torch.device(device)
        out: dict[str, torch.Tensor] = {}
        for name, t in self.tensors.items():
            moved = t.to(dev, copy=True)
            if pin_memory and dev.type == "cpu" and torch.cuda.is_available():
                moved = moved.pin_memory()
            out[name] = moved
        return StateBlob(self.kind, out, dict(self.meta))

    def to_bytes(self) -> bytes:
        """Serialise to safetensors bytes with the format name, version, kind and meta in its header."""
        header = {
            "format": STATE_FORMAT,
            "version": str(STATE_FORMAT_VERSION),
            "kind": self.kind,
            "meta": json.dumps(self.meta, sort_keys=True),
        }
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        return _st_save(tensors, metadata=header)

    @classmethod
    def from_bytes(cls, data: bytes, *, expect_kind: str | None = None) -> "StateBlob":
        """Parse bytes written by `to_bytes`; a clear `StateFormatError` for anything else."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise StateFormatError(f"state must be bytes, got {type(data).__name__}")
        data = bytes(data)
        header = _read_safetensors_metadata(data)
        if header.get("format") != STATE_FORMAT:
            raise StateFormatError(
                f"not a streamctx state blob (format={header.get('format')!r}, expected {STATE_FORMAT!r})"
            )
        version = int(header.get("version", "-1"))
        if version != STATE_FORMAT_VERSION:
            raise StateFormatError(
                f"unsupported state format version {version}; this streamctx reads version {STATE_FORMAT_VERSION}"
            )
        kind = header.get("kind", "")
        if expect_kind is not None and kind != expect_kind:
            raise StateFormatError(f"state kind {kind!r} does not match expected {expect_kind!r}")
        try:
            tensors = _st_load(data)
        except Exception as exc:  # safetensors raises its own error types
            raise StateFormatError(f"corrupt state tensors: {exc}") from exc
        return cls(kind, dict(tensors), json.loads(header.get("meta", "{}")))

    def equal(self, other: "StateBlob") -> bool:
        """Bit-exact equality of kind, meta and every tensor (dtype, shape and bytes)."""
        if self.kind != other.kind or self.meta != other.meta:
            return False
        if self.tensors.keys() != other.tensors.keys():
            return False
        for name, a in self.tensors.items():
            b = other.tensors[name]
            if a.dtype != b.dtype or a.shape != b.shape:
                return False
            if not torch.equal(_raw_bytes(a), _raw_bytes(b)):
                return False
        return True


def _raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor (so NaN payloads and -0.0 compare exactly)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _read_safetensors_metadata(data: bytes) -> Mapping[str, str]:
    if len(data) < 8:
        raise StateFormatError(f"state blob too short ({len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise StateFormatError("state blob header is truncated or corrupt")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateFormatError(f"state blob header is not valid JSON: {exc}") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise StateFormatError("state blob has no streamctx metadata")
    return meta
