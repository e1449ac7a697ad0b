"""Stable routing of sessions onto key groups and replicas (DESIGN.md contract 9).

A session id hashes (blake2b of its UTF-8 bytes; never Python's salted `hash()`) onto one of a
fixed number of key groups. Replicas own contiguous ranges of groups, so changing the replica
count moves whole groups (and the state of every session in them) from one replica to another.
"""

from __future__ import annotations

from hashlib import blake2b

import numpy as np
import pyarrow as pa


def key_group(session_id: str, key_groups: int = 128) -> int:
    """The key group of `session_id`: the same in every process, on every machine."""
    digest = blake2b(session_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % key_groups


def replica_of(group: int | np.ndarray, key_groups: int, replicas: int) -> int | np.ndarray:
    """The replica owning `group` (an int or an int array): contiguous ranges of groups."""
    return group * replicas // key_groups


def key_groups_of(session_ids: pa.Array | list[str], key_groups: int) -> np.ndarray:
    """Key group of each id, `[N]` int64 (one hash per distinct id)."""
    ids = session_ids.to_pylist() if isinstance(session_ids, (pa.Array, pa.ChunkedArray)) else session_ids
    cache: dict[str, int] = {}
    out = np.empty(len(ids), dtype=np.int64)
    for i, sid in enumerate(ids):
        g = cache.get(sid)
        if g is None:
            g = cache[sid] = key_group(sid, key_groups)
        out[i] = g
    return out
