"""The block pool: fixed-size KV blocks for every layer, shared by all sessions of an engine.

Logically each layer holds K and V blocks `[num_blocks, Hkv, block_size, D]` (DESIGN.md contract
5); physically a layer stores `[Hkv, num_blocks, block_size, D]`. The block-major view is
`keys_blocks(layer)`, a permuted view of the same storage. The head-major storage is chosen so
that a session whose blocks are a consecutive run of ids (the allocator hands out the lowest free
ids, so a lone session always gets one) reads its keys as a zero-copy strided view
`[Hkv, T, D]`; only fragmented tables pay a gather. Per token, the pool also stores the original
absolute position and the RoPE position in `[num_blocks, block_size]` int64 tables.

Blocks are allocated per layer (policies may keep different tokens in different layers). The
pool grows by doubling, one layer at a time, so a growth step never holds two copies of every
layer at once.
"""

from __future__ import annotations

import heapq

import torch

from streamctx.operators.cpu.memory import huge_page_empty

HUGE_PAGE_HEAD_BYTES = 2 << 20  # a head's K (or V) storage at least this large: huge pages (CPU)


class BlockPool:
    """Per-layer K/V/position block storage with a free list per layer (lowest id first)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, block_size: int = 64,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 initial_blocks: int = 16) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        n = max(1, initial_blocks)
        self.k = [self._empty_kv(n) for _ in range(num_layers)]
        self.v = [self._empty_kv(n) for _ in range(num_layers)]
        self.pos = [torch.zeros(n, block_size, dtype=torch.int64, device=self.device) for _ in range(num_layers)]
        self.rope_pos = [torch.zeros(n, block_size, dtype=torch.int64, device=self.device) for _ in range(num_layers)]
        # Free ids per layer: the set is the truth; the heap gives the lowest and may hold ids taken
        # since (skipped when popped), so taking a run costs its length, not the pool's size.
        self._free: list[set[int]] = [set(range(n)) for _ in range(num_layers)]
        self._free_heap: list[list[int]] = [list(range(n)) for _ in range(num_layers)]
        self._used = [0] * num_layers

    def _empty_kv(self, n: int) -> torch.Tensor:
        """K or V storage of one layer for n blocks `[Hkv, n, block_size, D]`. On the CPU, once each
        head's run of blocks reaches `HUGE_PAGE_HEAD_BYTES`, on transparent huge pages: decode
        attention streams every session's blocks each step, and with 4 KB pages a TLB miss comes
        every 16 keys (16 sessions x 528 keys of SmolLM2, 30 layers: 12.4 -> 10.8 ms). Not below:
        a head's unused blocks after a doubling share 2 MB pages with its used ones, so a small pool
        would hold its whole capacity resident (one session at 2K: +113 MB)."""
        shape = (self.num_kv_heads, n, self.block_size, self.head_dim)
        head_bytes = n * self.block_size * self.head_dim * torch.empty((), dtype=self.dtype).element_size()
        if self.device.type == "cpu" and head_bytes >= HUGE_PAGE_HEAD_BYTES:
            return huge_page_empty(shape, self.dtype, min_bytes=0)
        return torch.empty(shape, dtype=self.dtype, device=self.device)

    # -- capacity ---------------------------------------------------------------------------------
    def num_blocks(self, layer: int) -> int:
        return self.k[layer].shape[1]

    def blocks_used(self) -> int:
        return sum(self._used)

    def blocks_total(self) -> int:
        return sum(self.num_blocks(layer) for layer in range(self.num_layers))

    def block_nbytes(self) -> int:
        """Bytes of one block of one layer: K and V plus the two int64 position tables."""
        kv = 2 * self.num_kv_heads * self.block_size * self.head_dim * torch.empty((), dtype=self.dtype).element_size()
        return kv + 2 * self.block_size * 8

    def nbytes_used(self) -> int:
        return self.blocks_used() * self.block_nbytes()

    def nbytes_reserved(self) -> int:
        return self.blocks_total() * self.block_nbytes()

    def _grow(self, layer: int, min_blocks: int) -> None:
        old = self.num_blocks(layer)
        new = max(min_blocks, 2 * old)
        for store in (self.k, self.v):
            t = self._empty_kv(new)
            t[:, :old].copy_(store[layer])
            store[layer] = t
        for table in (self.pos, self.rope_pos):
            t = torch.zeros(new, self.block_size, dtype=torch.int64, device=self.device)
            t[:old].copy_(table[layer])
            table[layer] = t
        self._free[layer].update(range(old, new))
        heap = self._free_heap[layer]
        for b in range(old, new):
            heapq.heappush(heap, b)

    # -- allocation -------------------------------------------------------------------------------
    def allocate(self, layer: int, n: int = 1) -> list[int]:
        """n free block ids of `layer`, lowest first (consecutive when the pool is unfragmented)."""
        free, heap = self._free[layer], self._free_heap[layer]
        if len(free) < n:
            self._grow(layer, self.num_blocks(layer) + n - len(free))
        self._used[layer] += n
        out = []
        while len(out) < n:
            b = heapq.heappop(heap)
            if b in free:  # else taken as part of a run since it was pushed
                free.discard(b)
                out.append(b)
        return out

    def allocate_run(self, layer: int, n: int, *, after: int | None = None) -> list[int]:
        """n consecutive free block ids of `layer`: right after block `after` when those are free
        (extending a run in place), else the lowest free run, else a run at the end of a grown pool."""
        if n < 1:
            return []
        free = self._free[layer]
        if after is not None and all(after + 1 + i in free for i in range(n)) and after + n < self.num_blocks(layer):
            return self._take(layer, range(after + 1, after + 1 + n))
        start = prev = -2
        for b in sorted(free):  # the lowest run of n consecutive free ids
            if b != prev + 1:
                start = b
            prev = b
            if b - start + 1 == n:
                return self._take(layer, range(start, b + 1))
        total = self.num_blocks(layer)
        tail = 0  # free ids at the very end join the run; the pool grows by the rest
        while tail < total and total - 1 - tail in free:
            tail += 1
        self._grow(layer, total + n - tail)
        return self._take(layer, range(total - tail, total - tail + n))

    def _take(self, layer: int, ids: range) -> list[int]:
        self._free[layer].difference_update(ids)  # their heap entries go stale
        self._used[layer] += len(ids)
        if len(self._free_heap[layer]) > 4 * len(self._free[layer]) + 64:  # mostly stale: rebuild
            self._free_heap[layer] = sorted(self._free[layer])
        return list(ids)

    def release(self, layer: int, blocks: list[int]) -> None:
        free, heap = self._free[layer], self._free_heap[layer]
        for b in blocks:
            free.add(b)
            heapq.heappush(heap, b)
        self._used[layer] -= len(blocks)

    # -- views ------------------------------------------------------------------------------------
    def flat_k(self, layer: int) -> torch.Tensor:
        """K of `layer` as `[Hkv, num_blocks * block_size, D]` (a view; slot = block * bs + offset)."""
        k = self.k[layer]
        return k.view(k.shape[0], -1, k.shape[-1])

    def flat_v(self, layer: int) -> torch.Tensor:
        v = self.v[layer]
        return v.view(v.shape[0], -1, v.shape[-1])

    def keys_blocks(self, layer: int) -> torch.Tensor:
        """The block-major view `[num_blocks, Hkv, block_size, D]` of K (no copy)."""
        return self.k[layer].permute(1, 0, 2, 3)

    def values_blocks(self, layer: int) -> torch.Tensor:
        return self.v[layer].permute(1, 0, 2, 3)
