"""Decode and prefill through the native CPU kernels (`streamctx.operators.cpu`) equal them through
the torch paths, and batched decode equals one session at a time bit for bit.

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
from tests.fixtures.decode import decode_logits
from tests.fixtures.tiny_models import make_tiny_llama
from tests.tolerances import assert_close

VOCAB = 173

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not cpu.available(), reason=f"native kernels unavailable: {cpu.why_unavailable()}")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("native") / "m", hidden=48, heads=6, kv_heads=2, head_dim=16,
                           layers=2, vocab_size=VOCAB, tie=False, tokenizer="bytes")


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (1, 5, 17, 30, 9)]


@pytest.mark.parametrize("fused", [True, False])
def test_native_decode_equals_torch_paths(folder: Path, prompts: list[list[int]], fused: bool,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Both native decode paths (one call a layer, or a call a step of the layer) against torch's."""
    calls: list[int] = []
    monkeypatch.setattr(llama.LlamaModel, "fused_decode", fused)
    if fused:
        real_layer = cpu.decode_layer_unchecked

        def spy_layer(weights, cache, x, scratch):  # type: ignore[no-untyped-def]
            calls.append(x.shape[0])
            return real_layer(weights, cache, x, scratch)

        monkeypatch.setattr(cpu, "decode_layer_unchecked", spy_layer)
    else:
        real = llama._native_decode_attention

        def spy(caches, layer, q, scale):  # type: ignore[no-untyped-def]
            calls.append(len(caches))
            return real(caches, layer, q, scale)

        monkeypatch.setattr(llama, "_native_decode_attention", spy)
    with native_kernels(False):
        want = decode_logits(folder, prompts, 6, VOCAB)
    assert not calls
    got = decode_logits(folder, prompts, 6, VOCAB)
    assert calls and max(calls) == len(prompts)  # the kernels ran over the whole decode group
    for i in range(len(prompts)):
        for r in range(6):
            assert_close(got[i][r], want[i][r], scale=10.0, msg=f"session {i} step {r}")


@pytest.mark.parametrize("attention_bias", [False, True])
def test_one_call_a_layer_equals_the_separate_native_calls_bit_for_bit(
        tmp_path: Path, attention_bias: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """`decode_layer` runs the same kernels in the same order as the separate calls: the same bits,
    with QKV biases (Qwen2) and with a session past one 512-key span (its spans merged by lse)."""
    folder = make_tiny_llama(tmp_path / "m", hidden=40, heads=4, kv_heads=1, head_dim=16, layers=2,
                             intermediate=72, vocab_size=VOCAB, tie=True, attention_bias=attention_bias,
                             architecture="qwen2" if attention_bias else "llama", tokenizer="bytes")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (3, 530, 40)]
    monkeypatch.setattr(llama.LlamaModel, "fused_decode", False)
    want = decode_logits(folder, prompts, 3, VOCAB)
    monkeypatch.setattr(llama.LlamaModel, "fused_decode", True)
    calls: list[int] = []
    real_layer = cpu.decode_layer_unchecked
    monkeypatch.setattr(cpu, "decode_layer_unchecked", lambda *a: calls.append(a[2].shape[0]) or real_layer(*a))
    got = decode_logits(folder, prompts, 3, VOCAB)
    assert max(calls) == len(prompts)
    for i in range(len(prompts)):
        for r in range(3):
            assert torch.equal(got[i][r], want[i][r]), f"session {i} step {r}"


def test_batched_decode_equals_one_at_a_time_bit_for_bit(folder: Path, prompts: list[list[int]]) -> None:
    together = decode_logits(folder, prompts, 4, VOCAB)
    alone = decode_logits(folder, prompts, 4, VOCAB, together=False)
    for i in range(len(prompts)):
        for r in range(4):
            assert torch.equal(together[i][r], alone[i][r]), f"session {i} step {r}"


def test_native_prefill_equals_torch_paths(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill chunks attend through `causal_attention` (over the cache they were appended to), and
    run their dense steps through the fused GEMM over the packed weights (`gemm_packed`): every
    position's logits as torch's paths give them, in chunks of 16 and whole."""
    attention_rows: list[int] = []
    gemm_rows: list[int] = []
    real_attention, real_gemm = cpu.causal_attention_unchecked, cpu.gemm_packed_unchecked
    monkeypatch.setattr(cpu, "causal_attention_unchecked",
                        lambda q, *a: attention_rows.append(q.shape[1]) or real_attention(q, *a))
    monkeypatch.setattr(cpu, "gemm_packed_unchecked", lambda x, *a, **kw: gemm_rows.append(x.shape[0])
                        or real_gemm(x, *a, **kw))
    ids = torch.randint(3, VOCAB, (150,), generator=torch.Generator().manual_seed(2)).tolist()

    def logits(chunk: int) -> torch.Tensor:
        engine = Engine.load(folder, block_size=4, prefill_chunk=chunk)
        return engine.session("p").feed(ids, return_logits=True).logits

    with native_kernels(False):
        want = logits(16)
    assert not attention_rows and not gemm_rows
    got = logits(16)
    assert_close(got, want, scale=10.0, msg="chunks of 16")
    assert sorted(set(attention_rows)) == [6, 16] and sorted(set(gemm_rows)) == [6, 16]
    got = logits(256)
    assert_close(got, want, scale=10.0, msg="whole")
    assert sorted(set(attention_rows)) == [6, 16, 150] and sorted(set(gemm_rows)) == [6, 16, 150]


@pytest.mark.parametrize("rows", [(64, 32, 32), (40, 8, 8)])
def test_qkv_packed_from_its_parts_equals_packing_the_stacked_matrix(rows: tuple[int, int, int]) -> None:
    """q, k and v are packed straight from the checkpoint's matrices (whole strips of 32 rows), or
    through a stacked copy where they are not: the same packed bytes either way."""
    g = torch.Generator().manual_seed(4)
    parts = [torch.randn(n, 24, generator=g) for n in rows]
    out = cpu.huge_page_floats(cpu.packed_floats(sum(rows), 24))
    packed = llama._pack_stacked(parts, out)
    want = cpu.pack_weights(torch.cat(parts))
    assert (packed.n, packed.k) == (want.n, want.k) and torch.equal(packed.strips, want.strips)
    assert torch.equal(packed.unpack(), torch.cat(parts))
