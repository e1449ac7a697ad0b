"""The device tier on a real GPU: budget on live CUDA storages, pinned host copies, exact moves."""

from __future__ import annotations

import pytest
import torch

from streamctx.schedulers.memory_budget import MemoryBudgetScheduler
from streamctx.schedulers.placement import LRU, Lookahead
from streamctx.storage import DiskTier, MemoryTier
from tests.storage.blobs import kv_blob


@pytest.mark.gpu
def test_cuda_device_tier_budget_and_exact_moves(tmp_path) -> None:
    unit = kv_blob(0, 64).nbytes()
    device = 3 * unit
    tiers = [MemoryTier("device", "cuda", device), MemoryTier("host", "cpu", 2 * unit, pin_memory=True),
             DiskTier(tmp_path)]
    sched = MemoryBudgetScheduler(tiers, Lookahead(LRU()))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    truth = {f"s{i}": kv_blob(i, 64) for i in range(40)}  # CPU originals; admit copies to the GPU
    for sid, blob in truth.items():
        sched.admit(sid, blob)
        assert sched.live_device_bytes() <= device
    for step in range(120):
        sid = f"s{(step * 7) % 40}"
        sched.hint_upcoming([f"s{((step + k) * 7) % 40}" for k in range(1, 4)])
        got = sched.get(sid)
        assert all(t.is_cuda for t in got.tensors.values())
        assert got.equal(truth[sid])
        sched.prefetch()
        assert sched.live_device_bytes() <= device
        host = tiers[1]
        assert all(t.is_pinned() for s in host.keys() for t in host.get(s).tensors.values())
    del got
    torch.cuda.synchronize()
    # The allocator holds no more than the budget (plus block rounding) beyond what it held before.
    assert torch.cuda.memory_allocated() - base <= device + 512 * 3 * len(tiers[0].keys())
    tiers[2].close()
