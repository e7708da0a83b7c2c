"""Prompts to token ids: plain text, and chat messages through the tokenizer's chat template
(or `DEFAULT_CHAT_TEMPLATE` where the tokenizer has none)."""

from __future__ import annotations

from server.api.errors import APIError
from server.api.schemas import ChatMessage

# "User: hi\nAssistant:" — plain role-prefixed turns, what small base models were trained on.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Prompt ids with the tokenizer's own special-token convention (BOS where it uses one).
    `epispec generate` encodes its prompt with this too."""
    ids = tokenizer(text)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos) and getattr(tokenizer, "add_bos_token", True):
        ids = [bos, *ids]
    return ids


def check_unicode(text: str, param: str) -> None:
    """A 400 for text that is not valid Unicode (a lone surrogate, which JSON's \\ud800 escapes
    can carry): tokenizers cannot encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(
            f"'{param}' is not valid Unicode: it holds a lone surrogate "
            f"(U+{ord(text[exc.start]):04X}) at position {exc.start}.",
            param=param,
            code="invalid_unicode",
        ) from None


def text_prompt_ids(tokenizer, text: str, param: str = "prompt") -> list[int]:
    if not text:
        raise APIError(f"'{param}' must not be empty.", param=param, code="empty_prompt")
    check_unicode(text, param)
    return encode_prompt(tokenizer, text)


def chat_prompt_ids(tokenizer, messages: list[ChatMessage]) -> list[int]:
    for i, m in enumerate(messages):
        check_unicode(m.text(), f"messages[{i}].content")
        check_unicode(m.name or "", f"messages[{i}].name")
    turns = [{"role": m.role, "content": m.text()} for m in messages]
    if not any(t["content"] for t in turns):
        raise APIError("'messages' must hold some text.", param="messages", code="empty_prompt")
    template = None if getattr(tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE
    try:
        text = tokenizer.apply_chat_template(
            turns, chat_template=template, add_generation_prompt=True, tokenize=False
        )
    except Exception as exc:  # a template may refuse an order of roles (jinja raise_exception)
        raise APIError(
            f"The chat template refused these messages: {exc}", param="messages", code="invalid_messages"
        ) from exc
    return encode_prompt(tokenizer, text)
