from __future__ import annotations

import errno
import os
import stat

import pytest
import safetensors.torch
import torch
from hypothesis import given
from hypothesis import strategies as st

from streamctx.state import StateBlob, StateFormatError
from streamctx.storage import DiskTier, MemoryTier, StorageError, TierFullError
from streamctx.storage.safetensors_io import read_blob, write_blob
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
    real_writev = os.writev
    calls = []

    def full(fd, buffers):
        if calls:
            raise OSError(errno.ENOSPC, "No space left on device")
        calls.append(1)
        return real_writev(fd, [bytes(buffers[0])[:10]])  # a partial write, then the disk is full

    monkeypatch.setattr(os, "writev", full)
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


@given(seed=st.integers(0, 2**31 - 1), shapes=st.lists(st.lists(st.sampled_from([0, 1, 2, 5, 13]), max_size=3),
                                                       min_size=1, max_size=4),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.bool]))
def test_spill_files_are_standard_safetensors_both_ways(tmp_path_factory, seed, shapes, dtype) -> None:
    g = torch.Generator().manual_seed(seed)
    blob = StateBlob("k", {f"t{i}": (torch.randn(s, generator=g) * 50).to(dtype) for i, s in enumerate(shapes)},
                     {"seed": seed})
    d = tmp_path_factory.mktemp("st")
    with open(d / "a", "wb") as f:
        write_blob(f.fileno(), blob)
    data = (d / "a").read_bytes()
    assert StateBlob.from_bytes(data).equal(blob)  # our writer -> the reference reader
    assert set(safetensors.torch.load(data)) == set(blob.tensors)
    (d / "b").write_bytes(blob.to_bytes())  # the reference writer -> our reader
    with open(d / "b", "rb") as f:
        assert read_blob(f, size=(d / "b").stat().st_size).equal(blob)


def test_corrupt_spill_file_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "x").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with open(tmp_path / "x", "rb") as f, pytest.raises(StateFormatError, match="truncated or corrupt"):
        read_blob(f, size=10)
