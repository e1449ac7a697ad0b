"""Unwritable and full spill storage: clear errors, nothing lost, accounting intact, no partial files.

Faults are injected with `tests.fixtures.faulty_fs` (tests run as root: permissions alone never
stop a write).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from schedulers.memory_budget import MemoryBudgetScheduler
from streamctx.state import StateBlob, StateFormatError
from streamctx.storage import DiskTier, MemoryTier, StorageError
from streamctx.storage.packing import pack_blob, pack_views, unpack_blob, unpack_parts
from streamctx.storage.safetensors_io import read_blob
from tests.fixtures.faulty_fs import Faults, faulty_filesystem, files_under, inject_faults
from tests.storage.blobs import clone_blob, kv_blob

# --- the fault injector itself ------------------------------------------------------------------------


def test_injector_fails_only_under_its_root(tmp_path: Path) -> None:
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    faults = Faults(error=errno.EACCES, on_call=1, sticky=True)
    with inject_faults(inside, faults):
        (outside / "f").write_bytes(b"fine")
        with pytest.raises(PermissionError):
            (inside / "f").write_bytes(b"no")
        with pytest.raises(PermissionError):
            os.open(inside / "g", os.O_WRONLY | os.O_CREAT)
        with pytest.raises(PermissionError):
            os.replace(outside / "f", inside / "f")
    assert (outside / "f").read_bytes() == b"fine" and files_under(inside) == []
    assert len(faults.injected) == 3 and all(str(inside) in s for s in faults.injected)
    (inside / "f").write_bytes(b"ok after")  # restored on exit


@pytest.mark.parametrize("how", ["os.write", "os.writev", "file object"])
def test_injector_short_write_then_enospc(tmp_path: Path, how: str) -> None:
    faults = Faults(after_bytes=10)
    with inject_faults(tmp_path, faults), pytest.raises(OSError) as info:
        if how == "file object":
            with open(tmp_path / "f", "wb") as f:
                for _ in range(4):
                    f.write(b"x" * 6)
        else:
            fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                for _ in range(4):
                    n = os.write(fd, b"x" * 6) if how == "os.write" else os.writev(fd, [b"xxx", b"xxx"])
                    assert n in (6, 4)  # the second write is cut short at the limit
            finally:
                os.close(fd)
    assert info.value.errno == errno.ENOSPC
    assert (tmp_path / "f").stat().st_size == 10 == faults.written


def test_injector_pyarrow_filesystem(tmp_path: Path) -> None:
    fs = faulty_filesystem(Faults(after_bytes=100))
    with pytest.raises(OSError, match="No space left"):
        with fs.open_output_stream(str(tmp_path / "a.bin")) as out:
            out.write(b"y" * 60)
            out.write(b"y" * 60)
    assert (tmp_path / "a.bin").stat().st_size == 100
    fs = faulty_filesystem(Faults(error=errno.EACCES, on_call=1, ops={"replace"}))
    (tmp_path / "b").write_bytes(b"b")
    with pytest.raises(OSError, match="Permission denied"):
        fs.move(str(tmp_path / "b"), str(tmp_path / "c"))
    fs.move(str(tmp_path / "b"), str(tmp_path / "c"))  # one-shot fault
    assert (tmp_path / "c").read_bytes() == b"b"
    with fs.open_output_stream(str(tmp_path / "d")) as out:
        out.write(b"ok")
    assert fs.open_input_stream(str(tmp_path / "d")).read() == b"ok"


# --- the disk tier under faults ----------------------------------------------------------------------

def _file_bytes(blob: StateBlob) -> int:
    d = DiskTier(tempfile.gettempdir())
    try:
        d.put("probe", blob)
        return d._files["probe"]
    finally:
        d.close()


def _assert_held(disk: DiskTier, held: dict[str, StateBlob]) -> None:
    assert sorted(disk.keys()) == sorted(held)
    assert disk.used() == sum(b.nbytes() for b in held.values())
    assert sorted(p.name for p in files_under(disk.path)) == sorted(disk._file(k).name for k in held)
    for k, b in held.items():
        assert disk.get(k).equal(b)


FAULTS = st.one_of(
    st.builds(lambda n: ("write", Faults(error=errno.ENOSPC, after_bytes=n)), st.integers(0, 4000)),
    st.builds(lambda e, op, k: (op, Faults(error=e, on_call=k, ops={op})),
              st.sampled_from([errno.EACCES, errno.ENOSPC, errno.EROFS, errno.EIO]),
              st.sampled_from(["open", "write", "replace"]), st.just(1)),
)


@given(fault=FAULTS, seed=st.integers(0, 1000), tokens=st.sampled_from([1, 7, 31]))
def test_failed_spill_is_clear_and_loses_nothing(tmp_path_factory, fault, seed: int, tokens: int) -> None:
    op, faults = fault
    disk = DiskTier(tmp_path_factory.getbasetemp())
    try:
        held = {"kept": kv_blob(seed + 1, 5)}
        disk.put("kept", held["kept"])
        blob = kv_blob(seed, tokens)
        original = clone_blob(blob)
        size = _file_bytes(blob)
        with inject_faults(disk.path, faults):
            try:
                disk.put("s", blob)
            except StorageError as exc:
                msg = str(exc)
                verb = {"open": "create", "write": "write", "replace": "rename"}[op]
                assert f"could not {verb} spill file {disk.path}" in msg and "'s'" in msg
                assert os.strerror(faults.error) in msg and "the state was not moved" in msg
                assert faults.injected
            else:  # only a byte budget at least the file's size lets the write through
                assert faults.after_bytes is not None and faults.after_bytes >= size and not faults.injected
                held["s"] = blob
        assert blob.equal(original)  # the caller's state is untouched
        _assert_held(disk, held)
        if "s" not in held:  # the disk recovers: a retry stores it intact
            disk.put("s", blob)
            held["s"] = blob
            _assert_held(disk, held)
    finally:
        disk.close()


def test_failed_read_keeps_the_state_on_disk(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path)
    blob = kv_blob(3, 9)
    disk.put("s", blob)
    with inject_faults(disk.path, Faults(error=errno.EIO, on_call=1, ops={"open_read"})):
        with pytest.raises(StorageError, match=f"could not read spill file {disk.path}.*Input/output error.*stays on disk"):
            disk.get("s")
    _assert_held(disk, {"s": blob})
    disk.close()


def test_damaged_spill_file_is_named(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path)
    disk.put("s", kv_blob(3, 9))
    path = disk._file("s")
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe{["
    path.write_bytes(bytes(data))
    with pytest.raises(StorageError, match=f"spill file {path} of session 's' is damaged"):
        disk.get("s")
    disk.close()


def test_unremovable_file_is_forgotten_and_removed_on_close(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path)
    disk.put("s", kv_blob(1, 3))
    with inject_faults(disk.path, Faults(error=errno.EACCES, on_call=1, ops={"unlink"})):
        disk.delete("s")
    assert disk.used() == 0 and "s" not in disk and len(files_under(disk.path)) == 1
    disk.close()
    assert not disk.path.exists()


def test_unwritable_spill_root(tmp_path: Path) -> None:
    with inject_faults(tmp_path, Faults(error=errno.EACCES, on_call=1, ops={"mkdir"})):
        with pytest.raises(StorageError, match="cannot create a spill directory.*Permission denied"):
            DiskTier(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_unsupported_dtype_leaves_no_temporary_file(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path)
    with pytest.raises(StateFormatError, match="does not store"):
        disk.put("c", StateBlob("x", {"z": torch.zeros(3, dtype=torch.complex64)}))
    assert files_under(disk.path) == [] and disk.used() == 0 and "c" not in disk
    disk.close()


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_spill_files_private_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        disk = DiskTier(tmp_path)
        disk.put("a", kv_blob(0, 4))
        disk.put("b", kv_blob(1, 4))
    finally:
        os.umask(old)
    assert stat.S_IMODE(disk.path.stat().st_mode) == 0o700
    files = files_under(disk.path)
    assert len(files) == 2 and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert all(f.suffix == ".safetensors" for f in files)
    disk.close()


# --- a scheduler whose disk tier fails: the state stays in its previous tier ----------------------------


def test_scheduler_spill_to_a_full_disk_keeps_state_in_place(tmp_path: Path) -> None:
    blobs = {f"s{i}": kv_blob(i, 8) for i in range(4)}
    size = blobs["s0"].nbytes()
    disk = DiskTier(tmp_path)
    sched = MemoryBudgetScheduler([MemoryTier("device", "cpu", size), MemoryTier("host", "cpu", size), disk])
    originals = {k: clone_blob(b) for k, b in blobs.items()}
    sched.admit("s0", blobs["s0"])
    sched.admit("s1", blobs["s1"])  # s0 -> host
    with inject_faults(disk.path, Faults(error=errno.ENOSPC, after_bytes=100)):
        with pytest.raises(StorageError, match="No space left on device"):
            sched.admit("s2", blobs["s2"])  # s1 (device) cannot go to disk
    assert sched.stats()["spills"] == 1
    assert {s: sched.tier_of(s) for s in sched.sessions()} == {"s0": "host", "s1": "device"}
    assert [t.used() for t in sched.tiers] == [size, size, 0] and files_under(disk.path) == []
    sched.admit("s2", blobs["s2"])  # the disk has room again
    sched.admit("s3", blobs["s3"])
    assert sched.stats()["tiers"]["disk"]["used"] == 2 * size
    for k in blobs:
        assert sched.get(k).equal(originals[k])
    sched.close()


def test_scheduler_restore_from_an_unreadable_disk_keeps_state_there(tmp_path: Path) -> None:
    blobs = {f"s{i}": kv_blob(i, 8) for i in range(3)}
    size = blobs["s0"].nbytes()
    disk = DiskTier(tmp_path)
    sched = MemoryBudgetScheduler([MemoryTier("device", "cpu", size), disk])
    for k, b in blobs.items():
        sched.admit(k, b)
    on_disk = [s for s in sched.sessions() if sched.tier_of(s) == "disk"]
    assert len(on_disk) == 2
    with inject_faults(disk.path, Faults(error=errno.EIO, on_call=1, sticky=True, ops={"open_read"})):
        with pytest.raises(StorageError, match="Input/output error"):
            sched.get(on_disk[0])
    # Room was made on the device first (its session went to disk); the failed read moved nothing.
    where = {s: sched.tier_of(s) for s in sched.sessions()}
    assert where == dict.fromkeys(blobs, "disk") and sched.device.used() == 0
    assert disk.used() == 3 * size and len(files_under(disk.path)) == 3
    for k in blobs:
        assert sched.get(k).equal(blobs[k])
    sched.close()


# --- hostile spill files and packed headers -----------------------------------------------------------


def _spill_bytes(blob: StateBlob) -> bytes:
    return blob.to_bytes()


def _read(data: bytes) -> StateBlob:
    import io

    return read_blob(io.BytesIO(data), size=len(data))


@given(seed=st.integers(0, 100), cut=st.floats(0, 1, exclude_max=True))
def test_truncated_spill_file_is_a_format_error(seed: int, cut: float) -> None:
    data = _spill_bytes(kv_blob(seed, 5))
    with pytest.raises(StateFormatError):
        _read(data[: int(len(data) * cut)])


@given(seed=st.integers(0, 100), edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                                 min_size=1, max_size=6))
def test_mutated_spill_header_is_a_format_error_or_reads(seed: int, edits: list[tuple[int, int]]) -> None:
    data = bytearray(_spill_bytes(kv_blob(seed, 3)))
    header_end = 8 + int.from_bytes(data[:8], "little")
    for pos, value in edits:
        data[pos % header_end] = value
    try:
        blob = _read(bytes(data))
    except StateFormatError:
        return
    assert blob.nbytes() <= len(data)


HOSTILE_ENTRIES = st.lists(st.one_of(
    st.none(), st.integers(), st.text(max_size=5),
    st.tuples(st.text(max_size=3), st.sampled_from(["torch.float32", "torch.int64", "torch.nope", "float32", "x"]),
              st.lists(st.integers(-3, 2**40), max_size=3), st.integers(-8, 64), st.integers(-8, 2**41)).map(list),
), max_size=3)


@given(entries=HOSTILE_ENTRIES, kind=st.one_of(st.text(max_size=3), st.integers()),
       meta=st.one_of(st.just({}), st.integers()))
def test_hostile_packed_header_is_a_format_error(entries: list, kind, meta) -> None:
    header = {"format": "streamctx.packed", "kind": kind, "meta": meta, "tensors": entries}
    buf = np.arange(64, dtype=np.uint8)
    for unpack in (lambda: unpack_blob(header, buf), lambda: unpack_parts(header, [buf[:4], buf[:8]])):
        try:
            blob = unpack()
        except StateFormatError:
            continue
        assert blob.nbytes() <= buf.nbytes  # what parsed describes bytes it really had


def test_packed_round_trip_and_tampered_header() -> None:
    blob = kv_blob(2, 5)
    header, buf = pack_blob(blob)
    assert unpack_blob(json.loads(json.dumps(header)), buf).equal(blob)
    header_v, parts = pack_views(blob)
    assert unpack_parts(header_v, [p.copy() for p in parts]).equal(blob)
    bad = json.loads(json.dumps(header))
    bad["tensors"][0][3] = -4  # a negative offset used to slice from the end: a silent wrong answer
    with pytest.raises(StateFormatError, match="malformed byte range"):
        unpack_blob(bad, buf)
    bad = json.loads(json.dumps(header))
    bad["tensors"][0][2] = [1, 1]
    with pytest.raises(StateFormatError, match="do not hold shape"):
        unpack_blob(bad, buf)
    with pytest.raises(StateFormatError, match="more parts"):
        unpack_parts(header_v, [p.copy() for p in parts] + [np.zeros(4, np.uint8)])


def test_memory_tier_out_of_memory_changes_nothing(monkeypatch) -> None:
    tier = MemoryTier("host", "cpu", capacity=None)
    kept = kv_blob(1, 4)
    tier.put("kept", kept)

    def oom(self, device, *, pin_memory=False):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(StateBlob, "to", oom)
    big = StateBlob("x", {"view": torch.zeros(100, 10)[3]})  # a view: the tier must copy it
    with pytest.raises(StorageError, match="host tier could not copy session 'big'.*out of memory"):
        tier.put("big", big)
    assert list(tier.keys()) == ["kept"] and tier.used() == kept.nbytes() == tier.live_bytes()
