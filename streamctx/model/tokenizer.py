"""Tokenizer: a thin, typed wrapper over `tokenizers.Tokenizer` plus the model's chat template.

Built from a Hugging Face `tokenizer.json` (+ `tokenizer_config.json` beside it) or from the
vocabulary inside a GGUF file (`from_gguf_vocab`: byte-level BPE as llama.cpp's "gpt2" model).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

from streamctx.model.chat import Message, render_chat
from streamctx.model.config import ModelLoadError

# llama.cpp token types (gguf.TokenType)
_CONTROL = 3
_USER_DEFINED = 4


@dataclass(frozen=True)
class TokenizerSettings:
    """What `tokenizer.json` does not hold: BOS/EOS handling and the chat template."""

    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    add_bos_token: bool = False
    chat_template: str | None = None


class Tokenizer:
    """Text <-> token ids for one model.

    encode(text) -> ids (BOS prepended only when the model asks for it: `add_bos_token`),
    decode(ids) -> text, and `apply_chat_template(messages)` -> prompt text.
    """

    def __init__(self, backend: tokenizers.Tokenizer, settings: TokenizerSettings) -> None:
        self._tok = backend
        self.settings = settings

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> "Tokenizer":
        """Load `tokenizer.json`; reads `tokenizer_config.json` beside it when present."""
        path = Path(path)
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise ModelLoadError(f"{path}: not a valid tokenizer.json ({exc})") from exc
        config_path = path.with_name("tokenizer_config.json")
        config: dict[str, Any] = {}
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"{config_path}: not valid JSON ({exc})") from exc
        return cls(backend, _settings_from_hf(backend, config))

    @classmethod
    def from_json_str(cls, tokenizer_json: str, settings: TokenizerSettings) -> "Tokenizer":
        """Rebuild from `to_json_str()` output and saved settings (used by the GGUF cache)."""
        return cls(tokenizers.Tokenizer.from_str(tokenizer_json), settings)

    @classmethod
    def from_gguf_vocab(
        cls,
        tokens: Sequence[str],
        merges: Sequence[str],
        token_types: Sequence[int],
        *,
        pre: str | None,
        settings: TokenizerSettings,
    ) -> "Tokenizer":
        """Byte-level BPE from GGUF `tokenizer.ggml.{tokens,merges,token_type}`.

        Tokens marked CONTROL become special added tokens (matched whole, skipped by
        `decode(..., skip_special_tokens=True)`); USER_DEFINED ones are added as plain tokens.
        `pre` is `tokenizer.ggml.pre`; "smollm"/"starcoder"-style vocabularies split digits
        one by one before the GPT-2 byte-level split, as their Hugging Face tokenizer does.
        """
        vocab = {token: i for i, token in enumerate(tokens)}
        if len(vocab) != len(tokens):
            raise ModelLoadError("GGUF tokenizer.ggml.tokens has duplicate tokens")
        pairs = []
        for merge in merges:
            left, sep, right = merge.partition(" ")
            if not sep:
                raise ModelLoadError(f"GGUF tokenizer.ggml.merges: malformed merge {merge!r}")
            pairs.append((left, right))
        try:
            bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False)
        except Exception as exc:  # the tokenizers library raises a bare Exception (e.g. a merge of unknown tokens)
            raise ModelLoadError(f"GGUF tokenizer.ggml.merges do not fit tokenizer.ggml.tokens: {exc}") from None
        backend = tokenizers.Tokenizer(bpe)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
        if pre in _DIGIT_SPLIT_PRE:
            backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        elif pre in (None, "default", "gpt-2", "gpt2"):
            backend.pre_tokenizer = byte_level
        else:
            raise ModelLoadError(f"GGUF tokenizer.ggml.pre={pre!r} is not supported (supported: {_SUPPORTED_PRE})")
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        special = [t for t, kind in zip(tokens, token_types) if kind == _CONTROL]
        user = [t for t, kind in zip(tokens, token_types) if kind == _USER_DEFINED]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        if user:
            backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
        return cls(backend, settings)

    # -- use ----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self.settings.bos_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.settings.eos_token_ids

    @property
    def chat_template(self) -> str | None:
        return self.settings.chat_template

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer` (for batch APIs, offsets, ...)."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token text such as `<|im_start|>` maps to its single id."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self.settings.add_bos_token and self.settings.bos_token_id is not None:
            return [self.settings.bos_token_id, *ids]
        return ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """`encode` of each text (parallel inside `tokenizers`)."""
        batch = list(texts)
        out = [e.ids for e in self._tok.encode_batch(batch, add_special_tokens=False)]
        if self.settings.add_bos_token and self.settings.bos_token_id is not None:
            return [[self.settings.bos_token_id, *ids] for ids in out]
        return out

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; byte sequences that are not valid UTF-8 on their own decode to U+FFFD.

        `decode(encode(text)) == text` except for characters whose bytes have no symbol in the
        vocabulary (SmolLM2: six control characters and code points U+40000..U+BFFFF): `encode`
        drops them, as the model's reference tokenizer does."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """Prompt text for a conversation, e.g. ChatML for SmolLM2:
        `<|im_start|>role\\ncontent<|im_end|>\\n` per message, then `<|im_start|>assistant\\n`."""
        bos = self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else None
        eos = self.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else None
        return render_chat(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens={"bos_token": bos, "eos_token": eos},
        )

    # -- saving -------------------------------------------------------------------------------

    def to_json_str(self) -> str:
        return self._tok.to_str()

    def save(self, folder: str | os.PathLike[str]) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` (bos/eos, add_bos_token, chat template)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(folder / "tokenizer.json"))
        config: dict[str, Any] = {"add_bos_token": self.settings.add_bos_token}
        if self.bos_token_id is not None:
            config["bos_token"] = self.id_to_token(self.bos_token_id)
        if self.eos_token_ids:
            config["eos_token"] = self.id_to_token(self.eos_token_ids[0])
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id}, eos={self.eos_token_ids})"


# llama.cpp pre-tokenizer names whose HF tokenizers split digits individually before byte-level BPE.
_DIGIT_SPLIT_PRE = frozenset({"smollm", "starcoder", "refact", "codeshell"})
_SUPPORTED_PRE = ", ".join(sorted(_DIGIT_SPLIT_PRE | {"default", "gpt-2"}))


def _token_content(value: Any) -> str | None:
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _settings_from_hf(backend: tokenizers.Tokenizer, config: Mapping[str, Any]) -> TokenizerSettings:
    bos = _token_content(config.get("bos_token"))
    eos = _token_content(config.get("eos_token"))
    bos_id = backend.token_to_id(bos) if bos is not None else None
    eos_id = backend.token_to_id(eos) if eos is not None else None
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    add_bos = config.get("add_bos_token")
    if add_bos is None:
        # No flag: follow what the tokenizer.json post-processor does (Llama 3 prepends BOS there).
        probe = backend.encode("a", add_special_tokens=True).ids
        add_bos = bos_id is not None and len(probe) > 1 and probe[0] == bos_id
    return TokenizerSettings(
        bos_token_id=bos_id,
        eos_token_ids=(eos_id,) if eos_id is not None else (),
        add_bos_token=bool(add_bos),
        chat_template=template if isinstance(template, str) else None,
    )
