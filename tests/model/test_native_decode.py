"""Decode through the native CPU kernels (`streamctx.operators.cpu`) equals decode through the
torch paths, and batched decode equals one session at a time bit for bit.

The tiny model has head_dim 16, so its decode attention takes the native kernel (head_dim a
multiple of 16), as SmolLM2's does; most other tiny models here have odd head sizes and keep
the torch attention.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import streamctx.model.llama as llama
from streamctx import Engine
from streamctx.operators import cpu
from streamctx.operators.cpu import native_kernels
from tests.fixtures.tiny_models import make_tiny_llama
from tests.tolerances import assert_close

VOCAB = 173

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not cpu.available(), reason=f"native kernels unavailable: {cpu.why_unavailable()}")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("native") / "m", hidden=48, heads=6, kv_heads=2, head_dim=16,
                           layers=2, vocab_size=VOCAB, tie=False, tokenizer="bytes")


def _decode_logits(folder: Path, prompts: list[list[int]], steps: int, *, together: bool) -> list[list[torch.Tensor]]:
    """Prefill each session, then `steps` rounds of one token each: all sessions in one batched
    step (`together`, the decode group) or each session alone."""
    engine = Engine.load(folder, block_size=4, prefill_chunk=16)
    for i, ids in enumerate(prompts):
        engine.submit(f"s{i}", ids)
    engine.run_until_idle()
    out: list[list[torch.Tensor]] = [[] for _ in prompts]
    for r in range(steps):
        for i in range(len(prompts)):
            t = engine.submit(f"s{i}", [3 + (7 * r + i) % (VOCAB - 3)], return_logits=True)
            if not together:
                engine.run_until_idle()
            out[i].append(t)
        engine.run_until_idle()
    return [[t.feed.logits for t in row] for row in out]


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (1, 5, 17, 30, 9)]


def test_native_decode_equals_torch_paths(folder: Path, prompts: list[list[int]],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = llama._native_decode_attention

    def spy(caches, layer, q, scale):  # type: ignore[no-untyped-def]
        calls.append(len(caches))
        return real(caches, layer, q, scale)

    monkeypatch.setattr(llama, "_native_decode_attention", spy)
    with native_kernels(False):
        want = _decode_logits(folder, prompts, steps=6, together=True)
    assert not calls
    got = _decode_logits(folder, prompts, steps=6, together=True)
    assert calls and max(calls) == len(prompts)  # the kernel ran over the whole decode group
    for i in range(len(prompts)):
        for r in range(6):
            assert_close(got[i][r], want[i][r], scale=10.0, msg=f"session {i} step {r}")


def test_batched_decode_equals_one_at_a_time_bit_for_bit(folder: Path, prompts: list[list[int]]) -> None:
    together = _decode_logits(folder, prompts, steps=4, together=True)
    alone = _decode_logits(folder, prompts, steps=4, together=False)
    for i in range(len(prompts)):
        for r in range(4):
            assert torch.equal(together[i][r], alone[i][r]), f"session {i} step {r}"
