"""From OpenAI chat messages to a prompt string: content parts, the chat template
(--chat-template, the tokenizer's own, or a request's), and its keyword arguments."""

from __future__ import annotations

import codecs
import inspect
import os
from typing import Any

from jllm.entrypoints.openai.protocol import ChatCompletionMessageParam, ChatTemplateFields

# A literal template has one of these; a string without any is taken for a file path.
_JINJA_CHARS = "{}\n"


def load_chat_template(chat_template: str | None) -> str | None:
    """--chat-template as vLLM reads it: a file path, or the template itself."""
    if chat_template is None:
        return None
    if os.path.isfile(chat_template):
        with open(chat_template, encoding="utf-8") as f:
            return f.read()
    if not any(c in chat_template for c in _JINJA_CHARS):
        raise ValueError(f"The supplied chat template string ({chat_template}) appears path-like, but doesn't exist!")
    # Given on the command line, "\n" arrives as two characters.
    return codecs.decode(chat_template, "unicode_escape")


def parse_chat_messages(messages: list[ChatCompletionMessageParam]) -> list[dict[str, Any]]:
    """Messages as the template sees them: text parts joined by newlines (vLLM's
    "string" content format); any other part type is refused."""
    conversation = []
    for message in messages:
        content = message.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise ValueError(
                        f"Content part type '{part.type}' is not supported: this model "
                        "accepts only text parts ({'type': 'text', 'text': ...})."
                    )
                texts.append(part.text)
            content = "\n".join(texts)
        entry: dict[str, Any] = {"role": message.role, "content": content if content is not None else ""}
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(message, key) is not None:
                entry[key] = getattr(message, key)
        conversation.append(entry)
    return conversation


def _reserved_template_kwargs(tokenizer) -> set[str]:
    """apply_chat_template's own parameters: request kwargs may not set these."""
    params = inspect.signature(tokenizer.apply_chat_template).parameters
    return {name for name, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}


def apply_chat_template(
    tokenizer, request: ChatTemplateFields, conversation: list[dict[str, Any]], chat_template: str | None
) -> str:
    """The rendered prompt text. Raises ValueError (a 400) for a missing template or a
    template that fails on this conversation."""
    if tokenizer is None:
        raise ValueError("Chat templates need a tokenizer; this server runs with --skip-tokenizer-init.")
    if chat_template is None and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "As of transformers v4.44, default chat template is no longer allowed, so you must provide "
            "a chat template if the tokenizer does not define one."
        )
    reserved = _reserved_template_kwargs(tokenizer)
    extra = {k: v for k, v in (request.chat_template_kwargs or {}).items() if k not in reserved}
    try:
        text = tokenizer.apply_chat_template(
            conversation,
            tools=request.tools,
            documents=request.documents,
            chat_template=chat_template,
            add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
            tokenize=False,
            **extra,
        )
    except Exception as e:  # noqa: BLE001 - jinja and template errors are the request's fault
        raise ValueError(f"Chat template failed to render the conversation: {e}") from e
    if not isinstance(text, str):
        raise ValueError("The chat template did not render to a string.")
    return text
