"""One session's paged KV cache: a block table per layer over a shared `BlockPool`.

RoPE trade-off (DESIGN.md contract 5). Keys are stored *already rotated* at their RoPE position.
The alternative, storing raw keys and rotating every kept key at every step, costs a full pass
over the cache per decoded token, which is the one thing a bandwidth-bound decode cannot afford;
the `full` policy never changes positions, so it pays nothing. A policy that re-assigns positions
(StreamingLLM) pays one rotation of the kept keys by the position delta when it decides
(`R(p + d) = R(d) R(p)`), at the cost of one extra rounding per re-assignment.

Logical order: slot `i` of a layer is the i-th kept token; it lives in block `table[i // bs]` at
offset `i % bs`. Each layer has its own table so policies may keep different tokens per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from streamctx.kv.pool import BlockPool


@dataclass
class LayerTable:
    """Block ids and token count of one layer; `next_rope` is the RoPE position of the next token."""

    blocks: list[int] = field(default_factory=list)
    length: int = 0
    next_rope: int = 0
    contiguous: bool = True  # blocks are a consecutive run of ids
    _slots: torch.Tensor | None = None  # cached gather index when not contiguous

    def slot(self, i: int, block_size: int) -> int:
        return self.blocks[i // block_size] * block_size + i % block_size


class SessionKV:
    """The KV cache of one session.

    n_fed: tokens ever appended (the absolute position of the next token).
    """

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.layers = [LayerTable() for _ in range(pool.num_layers)]
        self.n_fed = 0
        self.key_mass: list[torch.Tensor | None] = [None] * pool.num_layers
        self.n_new = [0] * pool.num_layers
        self.closed = False
        # The session's policy, bound by `apply_policy`; the model asks it for attention hooks
        # (`observe`, `extend`: keys held outside the cache). None until the first decision.
        self.policy: Any = None

    # -- accounting -------------------------------------------------------------------------------
    def blocks_used(self) -> int:
        return sum(len(t.blocks) for t in self.layers)

    def nbytes(self) -> int:
        """Bytes of the blocks this session holds (K, V and position tables)."""
        return self.blocks_used() * self.pool.block_nbytes()

    def length(self, layer: int = 0) -> int:
        return self.layers[layer].length

    def free(self) -> None:
        """Return every block to the pool; the session cannot be used afterwards."""
        for layer, t in enumerate(self.layers):
            self.pool.release(layer, t.blocks)
            self.layers[layer] = LayerTable()
        self.closed = True

    # -- append -----------------------------------------------------------------------------------
    def _reserve(self, layer: int, n: int) -> None:
        t, bs = self.layers[layer], self.pool.block_size
        need = -(-(t.length + n) // bs) - len(t.blocks)
        if need <= 0:
            return
        new = self.pool.allocate(layer, need)
        last = t.blocks[-1] if t.blocks else new[0] - 1
        if t.contiguous and any(b != last + 1 + i for i, b in enumerate(new)):
            t.contiguous = False
        t.blocks.extend(new)
        t._slots = None

    def slots(self, layer: int, start: int, stop: int) -> torch.Tensor:
        """Flat pool slots `[stop - start]` of logical tokens start..stop-1 of `layer`."""
        t, bs = self.layers[layer], self.pool.block_size
        idx = torch.arange(start, stop, device=self.pool.device)
        table = torch.tensor(t.blocks, dtype=torch.int64, device=self.pool.device)
        return table[idx // bs] * bs + idx % bs

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               rope_positions: torch.Tensor) -> None:
        """Write n new tokens: `k, v [Hkv, n, D]` (k rotated), `positions, rope_positions [n]`."""
        n = k.shape[1]
        t, pool = self.layers[layer], self.pool
        self._reserve(layer, n)
        bs = pool.block_size
        fk, fv = pool.flat_k(layer), pool.flat_v(layer)
        fp, fr = pool.pos[layer].view(-1), pool.rope_pos[layer].view(-1)
        if t.contiguous:
            a = t.blocks[0] * bs + t.length
            fk[:, a:a + n].copy_(k)
            fv[:, a:a + n].copy_(v)
            fp[a:a + n].copy_(positions)
            fr[a:a + n].copy_(rope_positions)
        else:
            s = self.slots(layer, t.length, t.length + n)
            fk.index_copy_(1, s, k)
            fv.index_copy_(1, s, v)
            fp.index_copy_(0, s, positions)
            fr.index_copy_(0, s, rope_positions)
            t._slots = None
        t.length += n
        t.next_rope = int(rope_positions[-1]) + 1 if n else t.next_rope
        self.n_new[layer] += n

    # -- read -------------------------------------------------------------------------------------
    def _gather_index(self, layer: int) -> torch.Tensor:
        t = self.layers[layer]
        if t._slots is None or t._slots.shape[0] != t.length:
            t._slots = self.slots(layer, 0, t.length)
        return t._slots

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `[Hkv, T, D]` of `layer` in logical order (a view when contiguous)."""
        t, pool = self.layers[layer], self.pool
        fk, fv = pool.flat_k(layer), pool.flat_v(layer)
        if t.contiguous:
            a = t.blocks[0] * pool.block_size if t.blocks else 0
            return fk[:, a:a + t.length], fv[:, a:a + t.length]
        s = self._gather_index(layer)
        return fk.index_select(1, s), fv.index_select(1, s)

    def positions(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(absolute positions, RoPE positions), each `[T]` int64, of `layer`'s kept tokens."""
        t, pool = self.layers[layer], self.pool
        fp, fr = pool.pos[layer].view(-1), pool.rope_pos[layer].view(-1)
        if t.contiguous:
            a = t.blocks[0] * pool.block_size if t.blocks else 0
            return fp[a:a + t.length], fr[a:a + t.length]
        s = self._gather_index(layer)
        return fp.index_select(0, s), fr.index_select(0, s)

    # -- policies ---------------------------------------------------------------------------------
    def add_key_mass(self, layer: int, mass: torch.Tensor) -> None:
        """Accumulate attention mass `[Hkv, T]` (T = current length; older entries are padded)."""
        acc = self.key_mass[layer]
        if acc is None:
            self.key_mass[layer] = mass.float().clone()
            return
        if acc.shape[-1] < mass.shape[-1]:
            acc = torch.nn.functional.pad(acc, (0, mass.shape[-1] - acc.shape[-1]))
        self.key_mass[layer] = acc + mass.float()

    def rewrite(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                rope_positions: torch.Tensor, next_rope: int) -> None:
        """Replace `layer`'s contents with `k, v [Hkv, T', D]` (compaction into fresh blocks)."""
        self.pool.release(layer, self.layers[layer].blocks)
        self.layers[layer] = LayerTable(next_rope=next_rope)
        n_new = self.n_new[layer]
        if k.shape[1]:
            self.append(layer, k, v, positions, rope_positions)
        self.layers[layer].next_rope = next_rope
        self.n_new[layer] = n_new
