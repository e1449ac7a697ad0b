"""Tier stores for session state (StateBlob): device/host memory, peer actors, disk spill files.

Every store moves state bit-exactly (DESIGN.md contract 4) and accounts its bytes; the memory-budget
scheduler (`streamctx.schedulers.memory_budget`) decides what lives where.
"""

from .base import StateLostError, StorageError, TierFullError, TierStore, storage_nbytes
from .disk import DiskTier
from .memory import MemoryTier
from .packing import pack_blob, unpack_blob

__all__ = [
    "DiskTier",
    "MemoryTier",
    "StateLostError",
    "StorageError",
    "TierFullError",
    "TierStore",
    "pack_blob",
    "storage_nbytes",
    "unpack_blob",
]
