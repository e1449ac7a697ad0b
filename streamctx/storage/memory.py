"""Memory tiers: state held as tensors on one torch device (the device tier, or host memory)."""

from __future__ import annotations

from typing import Iterable

import torch

from streamctx.state import StateBlob

from .base import ByteAccounting, StorageError, TierFullError, storage_nbytes


def _owns_storage(t: torch.Tensor, device: torch.device) -> bool:
    """True when `t` is on `device` and is the whole of its storage (no hidden extra bytes)."""
    return (
        t.device == device
        and t.is_contiguous()
        and t.storage_offset() == 0
        and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )


class MemoryTier(ByteAccounting):
    """Holds StateBlobs as tensors on `device`, charged by the bytes of their storages.

    A blob already on the device whose tensors own their storages is kept as is (no copy);
    anything else (another device, a view into a larger tensor) is copied, so the tier never pins
    more memory than it charges. `pin_memory` pins host copies when CUDA is present.
    """

    def __init__(self, name: str, device: torch.device | str, capacity: int | None, *, pin_memory: bool = False) -> None:
        if capacity is not None and capacity < 0:
            raise ValueError(f"{name} tier capacity must be >= 0 bytes or None, got {capacity}")
        self.name = name
        self.device = torch.device(device)
        self.capacity = capacity
        self.pin_memory = pin_memory and self.device.type == "cpu" and torch.cuda.is_available()
        self._blobs: dict[str, StateBlob] = {}
        self._charged: dict[str, int] = {}
        self._used = 0

    def live_bytes(self) -> int:
        """Bytes of the storages this tier's tensors actually hold (independent of the accounting)."""
        return storage_nbytes(t for b in self._blobs.values() for t in b.tensors.values())

    def put(self, key: str, blob: StateBlob) -> int:
        if key in self._blobs:
            raise StorageError(f"{self.name} tier already holds session {key!r}")
        need = self.charge(blob)
        if self.capacity is not None and self._used + need > self.capacity:
            raise TierFullError(
                f"{self.name} tier is full: session {key!r} needs {need} bytes, "
                f"{self.capacity - self._used} of {self.capacity} free"
            )
        if all(_owns_storage(t, self.device) for t in blob.tensors.values()) and not self.pin_memory:
            held = blob
        else:
            try:
                held = blob.to(self.device, pin_memory=self.pin_memory)
            except RuntimeError as exc:  # out of memory (torch.OutOfMemoryError is one): nothing changed
                raise StorageError(
                    f"{self.name} tier could not copy session {key!r} ({need} bytes) to {self.device}: {exc}"
                ) from exc
        self._blobs[key] = held
        self._charged[key] = need
        self._used += need
        return need

    def get(self, key: str) -> StateBlob:
        try:
            return self._blobs[key]
        except KeyError:
            raise KeyError(f"{self.name} tier does not hold session {key!r}") from None

    def delete(self, key: str) -> None:
        self._blobs.pop(key)
        self._used -= self._charged.pop(key)

    def keys(self) -> Iterable[str]:
        return list(self._blobs)

    def __contains__(self, key: object) -> bool:
        return key in self._blobs

    def __len__(self) -> int:
        return len(self._blobs)
