"""Write and read a StateBlob as a safetensors file with one copy each way.

`StateBlob.to_bytes()` builds the whole file in memory before it is written, and
`StateBlob.from_bytes()` copies the tensors out of the bytes it was given: two copies per move.
Here the header is built alone, the tensors' own bytes are handed to `os.writev`, and a read
allocates each tensor and `readinto`s its bytes: one copy each way, the floor a file allows.
The files are standard safetensors with the same metadata as `StateBlob.to_bytes()` (the two are
interchangeable; tests check both directions).
"""

from __future__ import annotations

import json
import os
from typing import BinaryIO

import torch

from streamctx.state import STATE_FORMAT, STATE_FORMAT_VERSION, StateBlob, StateFormatError

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_FROM_NAME = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 2**20


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 CPU tensor (a view when already contiguous on CPU)."""
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)


def write_blob(fd: int, blob: StateBlob) -> int:
    """Write `blob` to the open file descriptor as safetensors; returns the bytes written."""
    for name, t in blob.tensors.items():
        if t.dtype not in _DTYPES:
            raise StateFormatError(f"tensor {name!r} has dtype {t.dtype}, which the spill format does not store")
    raws = {name: _raw(t) for name, t in sorted(blob.tensors.items())}
    header: dict[str, object] = {
        "__metadata__": {
            "format": STATE_FORMAT,
            "version": str(STATE_FORMAT_VERSION),
            "kind": blob.kind,
            "meta": json.dumps(blob.meta, sort_keys=True),
        }
    }
    offset = 0
    for name, raw in raws.items():
        t = blob.tensors[name]
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + raw.numel()]}
        offset += raw.numel()
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8-byte alignment
    buffers: list[memoryview] = [memoryview(len(text).to_bytes(8, "little") + text)]
    buffers += [memoryview(raw.numpy()) for raw in raws.values() if raw.numel()]
    total = sum(b.nbytes for b in buffers)
    written = 0
    while buffers:
        n = os.writev(fd, buffers)
        written += n
        while buffers and n >= buffers[0].nbytes:  # drop what was fully written, trim a partial one
            n -= buffers[0].nbytes
            buffers.pop(0)
        if buffers and n:
            buffers[0] = buffers[0][n:]
    assert written == total
    return total


def read_blob(f: BinaryIO, *, size: int) -> StateBlob:
    """Read a blob written by `write_blob` (or `StateBlob.to_bytes`) from a file opened 'rb'.

    Anything that is not a well-formed state file of `size` bytes (truncated, foreign, a header
    whose tensors overlap, run past the end or do not match their shapes) raises
    `StateFormatError`; nothing is allocated before the header has been checked against the size.
    """
    head = f.read(8)
    if len(head) < 8:
        raise StateFormatError("spill file is truncated (no header length)")
    n = int.from_bytes(head, "little")
    if n <= 0 or n > _MAX_HEADER or 8 + n > size:
        raise StateFormatError("spill file header is truncated or corrupt")
    raw_header = f.read(n)
    if len(raw_header) < n:
        raise StateFormatError("spill file header is truncated or corrupt")
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateFormatError(f"spill file header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise StateFormatError("spill file header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        raise StateFormatError("spill file is not a streamctx state blob")
    if meta.get("version") != str(STATE_FORMAT_VERSION):
        raise StateFormatError(f"unsupported state format version {meta.get('version')!r}")
    try:
        user_meta = json.loads(meta.get("meta", "{}"))
    except (TypeError, json.JSONDecodeError) as exc:
        raise StateFormatError(f"spill file metadata is not valid JSON: {exc}") from exc
    if not isinstance(user_meta, dict) or not isinstance(meta.get("kind", ""), str):
        raise StateFormatError("spill file metadata is malformed")
    base = 8 + n
    layout = [(name, *_entry(name, info, size - base)) for name, info in header.items()]
    layout.sort(key=lambda e: e[3])
    for prev, cur in zip(layout, layout[1:]):
        if cur[3] < prev[4]:
            raise StateFormatError(f"spill file tensors {prev[0]!r} and {cur[0]!r} overlap")
    tensors: dict[str, torch.Tensor] = {}
    for name, dtype, shape, start, end in layout:
        t = torch.empty(shape, dtype=dtype)
        if end > start:
            f.seek(base + start)
            view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            got = 0
            while got < len(view):
                k = f.readinto(view[got:])
                if not k:
                    raise StateFormatError(f"spill file is truncated inside tensor {name!r}")
                got += k
        tensors[name] = t
    return StateBlob(meta.get("kind", ""), tensors, user_meta)


def _entry(name: str, info: object, data_size: int) -> tuple[torch.dtype, list[int], int, int]:
    """(dtype, shape, start, end) of one header entry, checked against itself and the data size."""
    if not isinstance(info, dict):
        raise StateFormatError(f"spill file entry {name!r} is not an object")
    dtype = _FROM_NAME.get(info.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise StateFormatError(f"spill file tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise StateFormatError(f"spill file tensor {name!r} has a malformed shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise StateFormatError(f"spill file tensor {name!r} has malformed data_offsets {offsets!r}")
    start, end = offsets
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if not 0 <= start <= end <= data_size or end - start != nbytes:
        raise StateFormatError(f"spill file tensor {name!r} does not match its byte range")
    return dtype, shape, start, end
