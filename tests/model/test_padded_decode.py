"""The decode group's padded attention (one call over all sessions, used on CUDA) equals the
per-session calls. Forced on the CPU here so the default suite checks it without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import streamctx.model.llama as llama
from tests.fixtures.decode import decode_logits
from tests.fixtures.tiny_models import make_tiny_llama
from tests.tolerances import assert_close

VOCAB = 173

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("padded") / "m", hidden=36, heads=6, kv_heads=2, head_dim=6,
                           layers=2, vocab_size=VOCAB, tie=False, tokenizer="bytes")


def test_padded_group_attention_equals_per_session_calls(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (1, 5, 17, 30, 9)]
    calls: list[int] = []
    real = llama._padded_decode_attention

    def spy(caches, layer, q, scale):  # type: ignore[no-untyped-def]
        calls.append(len(caches))
        return real(caches, layer, q, scale)

    want = decode_logits(folder, prompts, 6, VOCAB)
    monkeypatch.setattr(llama, "PADDED_DECODE_DEVICES", frozenset({"cpu"}))
    monkeypatch.setattr(llama, "_padded_decode_attention", spy)
    got = decode_logits(folder, prompts, 6, VOCAB)
    assert calls and max(calls) == len(prompts)  # the padded path really ran, over all five sessions
    for i in range(len(prompts)):
        for r in range(6):
            assert_close(got[i][r], want[i][r], scale=10.0, msg=f"session {i} step {r}")
