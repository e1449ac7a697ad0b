"""Chat templates: render a list of messages to the prompt text a chat model expects.

Templates are Jinja (as in `tokenizer_config.json` / GGUF `tokenizer.chat_template`) and are
rendered in jinja2's `ImmutableSandboxedEnvironment`, the way transformers renders them, so a
template cannot reach Python objects. Without jinja2, ChatML templates (SmolLM2, Qwen2) are
rendered directly; anything else is a clear error.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Mapping, Sequence

Message = Mapping[str, str]

CHATML_START = "<|im_start|>"
CHATML_END = "<|im_end|>"

# A ChatML template that inserts a default system turn when the first message is not one
# (SmolLM2 does this); group 1 is that system prompt.
_DEFAULT_SYSTEM = re.compile(
    r"messages\[0\]\['role'\]\s*!=\s*'system'\s*%\}\s*\{\{\s*'<\|im_start\|>system\n(.*?)<\|im_end\|>\n'\s*\}\}",
    re.DOTALL,
)


class ChatTemplateError(ValueError):
    """A chat template is missing, malformed, or cannot be rendered for these messages."""


def is_chatml(template: str | None) -> bool:
    """Whether a template writes ChatML turns (`<|im_start|>role\\ncontent<|im_end|>\\n`)."""
    return template is not None and CHATML_START in template and CHATML_END in template


def _check_messages(messages: Sequence[Message]) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(
            f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"messages[{i}] must be a dict with a string 'role', got {message!r}")
        if not isinstance(message.get("content"), str):
            raise ChatTemplateError(f"messages[{i}]['content'] must be a string, got {message.get('content')!r}")


def render_chatml(
    messages: Sequence[Message], *, add_generation_prompt: bool = True, default_system: str | None = None
) -> str:
    """ChatML without Jinja: `<|im_start|>role\\ncontent<|im_end|>\\n` per message.

    default_system: inserted as a first system turn when the first message is not a system one.
    """
    _check_messages(messages)
    parts: list[str] = []
    if default_system is not None and messages and messages[0]["role"] != "system":
        parts.append(f"{CHATML_START}system\n{default_system}{CHATML_END}\n")
    parts += [f"{CHATML_START}{m['role']}\n{m['content']}{CHATML_END}\n" for m in messages]
    if add_generation_prompt:
        parts.append(f"{CHATML_START}assistant\n")
    return "".join(parts)


@lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ChatTemplateError(f"chat template raised: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template does not parse: {exc}") from exc


def _have_jinja2() -> bool:
    try:
        import jinja2  # noqa: F401
    except ImportError:
        return False
    return True


def render_chat(
    template: str | None,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str | None] | None = None,
) -> str:
    """Render `messages` with a Jinja chat `template`.

    special_tokens: values such as `bos_token`/`eos_token` that templates may reference.
    A template of None is an error: the model did not ship one and guessing a format silently
    would change its outputs.
    """
    if template is None:
        raise ChatTemplateError("this tokenizer has no chat template (no tokenizer.chat_template / chat_template)")
    _check_messages(messages)
    if not _have_jinja2():
        if is_chatml(template):
            match = _DEFAULT_SYSTEM.search(template)
            return render_chatml(
                messages, add_generation_prompt=add_generation_prompt, default_system=match.group(1) if match else None
            )
        raise ChatTemplateError("rendering this (non-ChatML) chat template needs jinja2: pip install jinja2")
    import jinja2

    compiled = _compile(template)
    try:
        return compiled.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            **{k: v for k, v in (special_tokens or {}).items()},
        )
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template failed to render: {exc}") from exc
