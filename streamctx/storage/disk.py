"""Disk tier: one safetensors file per session in a private spill directory.

The directory is created 0700 and files 0600; writes go to a temporary file in the same directory
and are renamed into place (atomic: a reader never sees a torn file). Writes and reads make one
copy each way (`safetensors_io`). No fsync: spill files are a cache for this process, not a
durable checkpoint.

Failures: a failed write (unwritable directory, full disk) removes the partial file and raises
`StorageError` naming the file and the operation (create, write, rename); the tier's contents and
accounting are unchanged and the caller still holds the state, so nothing is lost. A failed read
raises `StorageError` and keeps the file, so the state stays in this tier. A file that cannot be
removed on `delete` is forgotten by the accounting (the state has moved on) and removed with the
directory on `close`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from streamctx.state import StateBlob, StateFormatError

from .base import ByteAccounting, StorageError, TierFullError
from .safetensors_io import read_blob, write_blob

_log = logging.getLogger(__name__)


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
            os.chmod(self.path, 0o700)  # whatever the umask
        except OSError as exc:
            raise StorageError(f"cannot create a spill directory in {root!r}: {exc.strerror or exc}") from exc
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
        op, target = "create", tmp
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                op = "write"
                written = write_blob(fd, blob)
            finally:
                os.close(fd)
            op, target = "rename", final
            os.replace(tmp, final)
        except BaseException as exc:
            _remove(tmp)
            if isinstance(exc, OSError):
                raise StorageError(
                    f"disk tier could not {op} spill file {target} for session {key!r} ({need} bytes of "
                    f"tensors): {exc.strerror or exc}; the state was not moved"
                ) from exc
            raise
        self._files[key] = written
        self._sizes[key] = need
        self._used += need
        return need

    def get(self, key: str) -> StateBlob:
        if key not in self._sizes:
            raise KeyError(f"disk tier does not hold session {key!r}")
        path = self._file(key)
        try:
            with open(path, "rb", buffering=0) as f:
                return read_blob(f, size=self._files[key])
        except OSError as exc:
            raise StorageError(
                f"disk tier could not read spill file {path} of session {key!r}: {exc.strerror or exc}; "
                "the state stays on disk"
            ) from exc
        except StateFormatError as exc:
            raise StorageError(f"disk tier spill file {path} of session {key!r} is damaged: {exc}") from exc

    def delete(self, key: str) -> None:
        self._used -= self._sizes.pop(key)
        self._files.pop(key, None)
        path = self._file(key)
        if not _remove(path):
            _log.warning("could not remove spill file %s; it is removed with the spill directory", path)

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
        self._files.clear()
        self._used = 0


def _remove(path: Path) -> bool:
    """Remove `path` if it exists; False when it exists and cannot be removed."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        return False
    return True
