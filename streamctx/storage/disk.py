"""Disk tier: one safetensors file per session in a private spill directory.

The directory is created 0700 and files 0600; writes go to a temporary file in the same directory
and are renamed into place (atomic: a reader never sees a torn file). Writes and reads make one
copy each way (`safetensors_io`). No fsync: spill files are a
cache for this process, not a durable checkpoint. A failed write (unwritable, disk full) removes
the partial file and raises `StorageError`; the caller still holds the state, so nothing is lost.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from streamctx.state import StateBlob

from .base import ByteAccounting, StorageError, TierFullError
from .safetensors_io import read_blob, write_blob


class DiskTier(ByteAccounting):
    """Spill files under a private directory created inside `root` (default: the system temp dir)."""

    def __init__(self, root: str | os.PathLike[str] | None = None, capacity: int | None = None,
                 *, name: str = "disk") -> None:
        if capacity is not None and capacity < 0:
            raise ValueError(f"disk tier capacity must be >= 0 bytes or None, got {capacity}")
        self.name = name
        self.capacity = capacity
        try:
            self.path = Path(tempfile.mkdtemp(prefix="streamctx-spill-", dir=root))  # mode 0700
        except OSError as exc:
            raise StorageError(f"cannot create a spill directory in {root!r}: {exc.strerror or exc}") from exc
        os.chmod(self.path, 0o700)
        self._sizes: dict[str, int] = {}  # charged bytes (tensor bytes)
        self._files: dict[str, int] = {}  # file sizes
        self._used = 0

    def _file(self, key: str) -> Path:
        return self.path / (hashlib.sha256(key.encode("utf-8")).hexdigest()[:40] + ".safetensors")

    def put(self, key: str, blob: StateBlob) -> int:
        if key in self._sizes:
            raise StorageError(f"disk tier already holds session {key!r}")
        need = self.charge(blob)
        if self.capacity is not None and self._used + need > self.capacity:
            raise TierFullError(
                f"disk tier is full: session {key!r} needs {need} bytes, {self.capacity - self._used} "
                f"of {self.capacity} free"
            )
        final = self._file(key)
        tmp = final.with_suffix(".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                written = write_blob(fd, blob)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StorageError(
                f"disk tier could not write session {key!r} ({need} bytes of tensors) in {self.path}: "
                f"{exc.strerror or exc}; the state was not moved"
            ) from exc
        self._files[key] = written
        self._sizes[key] = need
        self._used += need
        return need

    def get(self, key: str) -> StateBlob:
        if key not in self._sizes:
            raise KeyError(f"disk tier does not hold session {key!r}")
        try:
            with open(self._file(key), "rb", buffering=0) as f:
                return read_blob(f, size=self._files[key])
        except OSError as exc:
            raise StorageError(f"disk tier could not read session {key!r}: {exc.strerror or exc}") from exc

    def delete(self, key: str) -> None:
        self._used -= self._sizes.pop(key)
        self._files.pop(key, None)
        self._file(key).unlink(missing_ok=True)

    def keys(self) -> Iterable[str]:
        return list(self._sizes)

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def close(self) -> None:
        """Remove the spill directory and everything in it."""
        shutil.rmtree(self.path, ignore_errors=True)
        self._sizes.clear()
        self._used = 0
