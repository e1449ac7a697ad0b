"""A StateBlob as one contiguous uint8 buffer plus a small JSON-able header (for bulk moves).

Used where state crosses process boundaries in bulk (Ray peer actors): numpy buffers pass through
Ray's object store without pickling tensors. Round trips are bit-exact (dtype, shape and bytes).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from streamctx.state import StateBlob, StateFormatError

PACK_FORMAT = "streamctx.packed"


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name.removeprefix("torch."), None) if name.startswith("torch.") else None
    if not isinstance(dt, torch.dtype):
        raise StateFormatError(f"packed state has unknown dtype {name!r}")
    return dt


def pack_views(blob: StateBlob) -> tuple[dict[str, Any], list[np.ndarray]]:
    """(header, per-tensor uint8 arrays) without copying CPU-contiguous tensors; concatenated in
    order, the arrays are the packed buffer."""
    entries = []
    views: list[np.ndarray] = []
    offset = 0
    for name, t in blob.tensors.items():
        n = t.numel() * t.element_size()
        entries.append([name, str(t.dtype), list(t.shape), offset, n])
        offset += n
        if n:
            views.append(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    header = {"format": PACK_FORMAT, "kind": blob.kind, "meta": blob.meta, "tensors": entries}
    return header, views


def pack_blob(blob: StateBlob) -> tuple[dict[str, Any], np.ndarray]:
    """(header, buffer): every tensor's bytes back to back in one uint8 array; one copy."""
    header, views = pack_views(blob)
    buf = np.concatenate(views) if views else np.empty(0, dtype=np.uint8)
    return header, buf


def _entries(header: dict[str, Any]) -> list[tuple[str, torch.dtype, list[int], int, int]]:
    """The header's tensor entries (name, dtype, shape, offset, nbytes), each checked for shape and size."""
    if not isinstance(header, dict) or header.get("format") != PACK_FORMAT:
        fmt = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise StateFormatError(f"not a packed streamctx state (format={fmt!r})")
    if not isinstance(header.get("kind"), str) or not isinstance(header.get("meta"), dict):
        raise StateFormatError("packed state header needs a str `kind` and a dict `meta`")
    entries = header.get("tensors")
    if not isinstance(entries, list):
        raise StateFormatError("packed state header has no tensor list")
    out = []
    for e in entries:
        if not (isinstance(e, (list, tuple)) and len(e) == 5 and isinstance(e[0], str) and isinstance(e[1], str)):
            raise StateFormatError(f"packed state has a malformed tensor entry {e!r}")
        name, dtype_name, shape, off, n = e
        dt = _dtype(dtype_name)
        if not (isinstance(shape, (list, tuple)) and all(type(d) is int and d >= 0 for d in shape)):
            raise StateFormatError(f"packed tensor {name!r} has a malformed shape {shape!r}")
        if type(off) is not int or type(n) is not int or off < 0:
            raise StateFormatError(f"packed tensor {name!r} has a malformed byte range {off!r}, {n!r}")
        numel = 1
        for d in shape:
            numel *= d
        if n != numel * torch.empty((), dtype=dt).element_size():
            raise StateFormatError(f"packed tensor {name!r}: {n} bytes do not hold shape {list(shape)} of {dt}")
        out.append((name, dt, list(shape), off, n))
    return out


def unpack_blob(header: dict[str, Any], buf: np.ndarray) -> StateBlob:
    """Inverse of `pack_blob`; the result owns fresh CPU tensors (one copy)."""
    entries = _entries(header)
    data = np.asarray(buf, dtype=np.uint8).reshape(-1)
    tensors: dict[str, torch.Tensor] = {}
    for name, dt, shape, off, n in entries:
        if off + n > data.size:
            raise StateFormatError(f"packed state is truncated at tensor {name!r}")
        raw = torch.from_numpy(data[off : off + n].copy())
        tensors[name] = raw.view(dt).reshape(shape) if n else torch.empty(shape, dtype=dt)
    return StateBlob(header["kind"], tensors, dict(header["meta"]))


def unpack_parts(header: dict[str, Any], parts: list[np.ndarray]) -> StateBlob:
    """Inverse of `pack_views`: one array per non-empty tensor; the result owns fresh CPU tensors."""
    entries = _entries(header)
    tensors: dict[str, torch.Tensor] = {}
    it = iter(parts)
    for name, dt, shape, _, n in entries:
        if not n:
            tensors[name] = torch.empty(shape, dtype=dt)
            continue
        part = next(it, None)
        if part is None or part.nbytes != n:
            raise StateFormatError(f"packed state part of tensor {name!r} is missing or has the wrong size")
        raw = torch.empty(n, dtype=torch.uint8)
        raw.numpy()[:] = np.asarray(part, dtype=np.uint8).reshape(-1)
        tensors[name] = raw.view(dt).reshape(shape)
    if next(it, None) is not None:
        raise StateFormatError("packed state has more parts than its header lists tensors")
    return StateBlob(header["kind"], tensors, dict(header["meta"]))
