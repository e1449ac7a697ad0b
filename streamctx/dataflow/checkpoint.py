"""Checkpoint storage: one folder per checkpoint, a manifest committed last (DESIGN.md contract 7).

Layout under the configured root (a local folder, or any `pyarrow.fs` filesystem / URI):

    chk-00000007/
        s00-r000.safetensors   one file per stage replica: the replica's `StateBlob`
        s01-r000.safetensors
        MANIFEST.json          written last: the checkpoint exists only once this file does

Every file is written to a temporary name and renamed into place, so a reader never sees a partial
file; on a local folder files are 0600 in 0700 folders. File names are generated here (stage and
replica indexes, never user strings), so nothing is written outside the root. The manifest names
the source offset the states reflect, the sink's committed position and a SHA-256 per state file;
a restore checks the format version and every hash before using anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

CHECKPOINT_FORMAT = "streamctx.checkpoint"
CHECKPOINT_VERSION = 1
MANIFEST = "MANIFEST.json"
_CHK_RE = re.compile(r"^chk-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; names the checkpoint, the path and the cause."""


def state_file(stage_index: int, replica: int) -> str:
    return f"s{stage_index:02d}-r{replica:03d}.safetensors"


def chk_dir(ckpt_id: int) -> str:
    return f"chk-{ckpt_id:08d}"


@dataclass(frozen=True)
class Manifest:
    """What a complete checkpoint records (JSON on disk; see `to_json`).

    source_offset: replay from here (every record before it is reflected in the states and sinks).
    seq: the stream ordinal of the next record (`_seq`, the logical clock of idle TTLs).
    records_in: records read before `source_offset` (counters continue from it).
    sinks: each sink's committed position (`{"parts": next part index}` for file sinks).
    states: per stage, per replica: {"file", "bytes", "sha256", "sessions"}.
    plan: [(stage name, replicas)] of the job that wrote it; a restore needs the same.
    """

    ckpt_id: int
    job: str
    source_offset: int
    seq: int
    records_in: int
    sinks: dict[str, Any]
    states: list[list[dict[str, Any]]]
    plan: list[tuple[str, int]]
    created: float = 0.0

    def to_json(self) -> bytes:
        return json.dumps({
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "checkpoint_id": self.ckpt_id,
            "job": self.job, "source_offset": self.source_offset, "seq": self.seq,
            "records_in": self.records_in, "sinks": self.sinks, "states": self.states,
            "plan": [list(p) for p in self.plan], "created": self.created or time.time(),
        }, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "Manifest":
        try:
            d = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{where}: manifest is not valid JSON: {exc}") from None
        if not isinstance(d, dict) or d.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{where}: not a streamctx checkpoint manifest")
        if d.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(f"{where}: checkpoint format version {d.get('version')!r}; "
                                  f"this streamctx reads version {CHECKPOINT_VERSION}")
        try:
            return cls(int(d["checkpoint_id"]), str(d["job"]), int(d["source_offset"]), int(d["seq"]),
                       int(d["records_in"]), dict(d["sinks"]), [list(s) for s in d["states"]],
                       [(str(n), int(r)) for n, r in d["plan"]], float(d.get("created", 0.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: manifest field missing or malformed: {exc!r}") from None


class _LocalFS:
    """Plain files: 0700 folders, 0600 files, fsync before rename."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def makedirs(self, rel: str) -> None:
        for p in (self.root, self.root / rel):  # the root too: mkdir(parents=True) ignores mode for parents
            if not p.is_dir():
                p.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(p, 0o700)

    def write_atomic(self, rel: str, data: bytes) -> None:
        final = self.root / rel
        tmp = final.with_name(f".{final.name}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def exists(self, rel: str) -> bool:
        return (self.root / rel).exists()

    def listdir(self) -> list[str]:
        return [p.name for p in self.root.iterdir()] if self.root.is_dir() else []

    def rmtree(self, rel: str) -> None:
        import shutil

        shutil.rmtree(self.root / rel, ignore_errors=True)


class _ArrowFS:
    """Any `pyarrow.fs.FileSystem` (object stores have atomic puts; temp + move elsewhere)."""

    def __init__(self, fs: Any, root: str) -> None:
        self.fs, self.root = fs, root.rstrip("/")

    def _p(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def makedirs(self, rel: str) -> None:
        self.fs.create_dir(self._p(rel), recursive=True)

    def write_atomic(self, rel: str, data: bytes) -> None:
        final = self._p(rel)
        head, _, name = final.rpartition("/")
        tmp = f"{head}/.{name}.tmp"
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, final)
        except BaseException:
            try:
                self.fs.delete_file(tmp)
            except Exception:  # nothing to clean, or the store is unreachable
                pass
            raise

    def read(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self._p(rel)) as f:
            return f.read()

    def exists(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self._p(rel)).type != pafs.FileType.NotFound

    def listdir(self) -> list[str]:
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self.root, allow_not_found=True)
        return [i.base_name for i in self.fs.get_file_info(sel)]

    def rmtree(self, rel: str) -> None:
        try:
            self.fs.delete_dir(self._p(rel))
        except (FileNotFoundError, OSError):
            pass


class CheckpointStore:
    """Checkpoints of one job under `root`: a local folder or a filesystem URI (`s3://...`,
    `file:///...`), or `filesystem` (a `pyarrow.fs.FileSystem`) with `root` a path inside it.

    Plain data (picklable): stage actors receive it and write their own state files.
    """

    def __init__(self, root: str, filesystem: Any = None) -> None:
        self.root = str(root)
        self.filesystem = filesystem
        self._fs: Any = None

    @property
    def fs(self) -> Any:
        if self._fs is None:
            if self.filesystem is not None:
                self._fs = _ArrowFS(self.filesystem, self.root)
            elif "://" in self.root and not self.root.startswith("file://"):
                import pyarrow.fs as pafs

                fs, path = pafs.FileSystem.from_uri(self.root)
                self._fs = _ArrowFS(fs, path)
            else:
                self._fs = _LocalFS(Path(self.root.removeprefix("file://")))
        return self._fs

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "filesystem": self.filesystem, "_fs": None}

    def _wrap(self, what: str, rel: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except CheckpointError:
            raise
        except OSError as exc:
            raise CheckpointError(f"{what} {self.root}/{rel}: {exc.strerror or exc} "
                                  f"(errno {exc.errno}); the last complete checkpoint is kept") from exc

    # --- writing -----------------------------------------------------------------------------------

    def write_state(self, ckpt_id: int, stage_index: int, replica: int, data: bytes) -> dict[str, Any]:
        """Write one replica's state file (atomically); returns its manifest entry."""
        rel = f"{chk_dir(ckpt_id)}/{state_file(stage_index, replica)}"
        self._wrap("cannot create checkpoint folder", chk_dir(ckpt_id), self.fs.makedirs, chk_dir(ckpt_id))
        self._wrap("cannot write checkpoint state", rel, self.fs.write_atomic, rel, data)
        return {"file": state_file(stage_index, replica), "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest()}

    def commit(self, manifest: Manifest, *, keep: int = 2) -> None:
        """Write the manifest (the checkpoint is complete from here on), then drop old checkpoints."""
        rel = f"{chk_dir(manifest.ckpt_id)}/{MANIFEST}"
        self._wrap("cannot create checkpoint folder", chk_dir(manifest.ckpt_id), self.fs.makedirs,
                   chk_dir(manifest.ckpt_id))
        self._wrap("cannot commit checkpoint manifest", rel, self.fs.write_atomic, rel, manifest.to_json())
        self._prune(manifest.ckpt_id, keep)

    def _prune(self, latest: int, keep: int) -> None:
        """Keep the `keep` newest complete checkpoints; drop older ones and older partial folders."""
        complete = self.complete_ids()
        kept = set(complete[-keep:])
        for cid in self.all_ids():
            if cid not in kept and cid < latest:
                self.fs.rmtree(chk_dir(cid))

    # --- reading -----------------------------------------------------------------------------------

    def all_ids(self) -> list[int]:
        ids = []
        for name in self._wrap("cannot list checkpoints in", "", self.fs.listdir):
            m = _CHK_RE.match(name)
            if m:
                ids.append(int(m.group(1)))
        return sorted(ids)

    def complete_ids(self) -> list[int]:
        return [c for c in self.all_ids() if self.fs.exists(f"{chk_dir(c)}/{MANIFEST}")]

    def latest(self) -> Optional[Manifest]:
        """The newest complete checkpoint's manifest (None when there is none)."""
        ids = self.complete_ids()
        if not ids:
            return None
        rel = f"{chk_dir(ids[-1])}/{MANIFEST}"
        return Manifest.from_json(self._wrap("cannot read", rel, self.fs.read, rel), f"{self.root}/{rel}")

    def next_id(self) -> int:
        """An id no earlier (possibly partial) checkpoint used."""
        ids = self.all_ids()
        return ids[-1] + 1 if ids else 1

    def read_state(self, ckpt_id: int, entry: dict[str, Any]) -> bytes:
        """A state file's bytes, checked against its manifest hash."""
        name = str(entry["file"])
        if "/" in name or name.startswith("."):
            raise CheckpointError(f"checkpoint {ckpt_id}: bad state file name {name!r}")
        rel = f"{chk_dir(ckpt_id)}/{name}"
        data = self._wrap("cannot read", rel, self.fs.read, rel)
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CheckpointError(f"{self.root}/{rel}: content does not match its manifest hash (corrupt)")
        return data
