from __future__ import annotations

import errno
import os
import stat

import pytest
import torch

from streamctx.state import StateBlob
from streamctx.storage import DiskTier, MemoryTier, StorageError, TierFullError
from tests.storage.blobs import kv_blob


def test_memory_tier_copies_views_and_charges_live_bytes() -> None:
    tier = MemoryTier("device", "cpu", capacity=10_000_000)
    big = torch.zeros(1000, 100)
    view_blob = StateBlob("x", {"row": big[3]})  # a view into a 400 KB storage
    tier.put("a", view_blob)
    assert tier.used() == 400 == tier.live_bytes()
    own = kv_blob(1, 8)
    tier.put("b", own)
    assert tier.get("b") is own  # owning tensors are kept without a copy
    assert tier.live_bytes() == tier.used() == 400 + own.nbytes()
    with pytest.raises(TierFullError, match="device tier is full"):
        MemoryTier("device", "cpu", capacity=10).put("c", own)
    with pytest.raises(StorageError, match="already holds"):
        tier.put("b", own)
    tier.delete("a")
    assert tier.used() == own.nbytes()


def test_disk_tier_private_files_atomic_roundtrip(tmp_path) -> None:
    disk = DiskTier(tmp_path, capacity=None)
    try:
        assert stat.S_IMODE(os.stat(disk.path).st_mode) == 0o700
        blob = kv_blob(3, 33)
        disk.put("session/with odd:chars", blob)
        files = list(disk.path.iterdir())
        assert len(files) == 1 and files[0].suffix == ".safetensors"
        assert stat.S_IMODE(os.stat(files[0]).st_mode) == 0o600
        assert disk.get("session/with odd:chars").equal(blob)
        assert disk.used() == blob.nbytes()
        disk.delete("session/with odd:chars")
        assert list(disk.path.iterdir()) == [] and disk.used() == 0
    finally:
        disk.close()
    assert not disk.path.exists()


def test_disk_write_failure_is_clear_and_leaves_no_partial_file(tmp_path, monkeypatch) -> None:
    disk = DiskTier(tmp_path)
    blob = kv_blob(4, 16)
    real_write = os.write

    def full(fd, data):
        real_write(fd, bytes(data)[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(StorageError, match="No space left on device"):
        disk.put("s", blob)
    monkeypatch.undo()
    assert list(disk.path.iterdir()) == [] and "s" not in disk and disk.used() == 0
    disk.put("s", blob)  # the caller still holds the state; a retry stores it intact
    assert disk.get("s").equal(blob)
    disk.close()


def test_unwritable_spill_root_is_a_clear_error(tmp_path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(StorageError, match="cannot create a spill directory"):
        DiskTier(not_a_dir)


def test_disk_capacity(tmp_path) -> None:
    disk = DiskTier(tmp_path, capacity=100)
    with pytest.raises(TierFullError, match="disk tier is full"):
        disk.put("s", kv_blob(0, 64))
    disk.close()
