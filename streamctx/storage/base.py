"""The tier-store interface and its errors."""

from __future__ import annotations

from typing import Iterable, Protocol

import torch

from streamctx.state import StateBlob


class StorageError(RuntimeError):
    """A tier could not store or read state; the state it was given is unchanged and still held by the caller."""


class TierFullError(StorageError):
    """The tier (and every tier below it) has no room for the state."""


class StateLostError(RuntimeError):
    """State a tier held can no longer be read (its store or node is gone, or did not answer in
    time); the session must be rebuilt from a checkpoint, never continued from empty state.

    Not a `StorageError`: no caller still holds the state. The dataflow runtime treats it like a
    crashed actor (restore every replica from the last checkpoint and replay)."""


class TierStore(Protocol):
    """A keyed store of StateBlobs with a byte capacity (None: unbounded)."""

    name: str
    capacity: int | None

    def used(self) -> int:
        """Bytes currently charged to this tier."""
        ...

    def charge(self, blob: StateBlob) -> int:
        """Bytes `blob` would occupy here."""
        ...

    def can_fit(self, nbytes: int) -> bool:
        """Whether a state of `nbytes` can be put now (a tier may be fragmented over several stores)."""
        ...

    def put(self, key: str, blob: StateBlob) -> int:
        """Store `blob` under `key` (which must be absent); returns the bytes charged."""
        ...

    def get(self, key: str) -> StateBlob:
        """The stored state (memory tiers: the held blob itself; others: a fresh CPU blob)."""
        ...

    def delete(self, key: str) -> None:
        ...

    def keys(self) -> Iterable[str]:
        ...

    def __contains__(self, key: object) -> bool:
        ...


class ByteAccounting:
    """The capacity bookkeeping local tiers share: `capacity` (None: unbounded) and `_used` bytes."""

    capacity: int | None
    _used: int

    def used(self) -> int:
        return self._used

    def charge(self, blob: StateBlob) -> int:
        return blob.nbytes()

    def can_fit(self, nbytes: int) -> bool:
        return self.capacity is None or self._used + nbytes <= self.capacity


def storage_nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (what the allocator really holds)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[(str(t.device), st.data_ptr())] = st.nbytes()
    return sum(seen.values())


def free_bytes(store: TierStore) -> int | None:
    return None if store.capacity is None else store.capacity - store.used()
