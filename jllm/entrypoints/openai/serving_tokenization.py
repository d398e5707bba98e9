"""`POST /tokenize` and `POST /detokenize` (vLLM's OpenAIServingTokenization): a prompt or
a conversation (through the same chat template as chat completions) to token ids, and back;
and `GET /tokenizer_info`, the tokenizer's configuration."""

from __future__ import annotations

import json
from typing import Any

from jllm.entrypoints.openai.errors import OpenAIServingError
from jllm.entrypoints.openai.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from jllm.entrypoints.openai.serving_chat import OpenAIServingChat
from jllm.entrypoints.openai.serving_engine import OpenAIServing


class OpenAIServingTokenization(OpenAIServing):
    def __init__(self, serving_chat: OpenAIServingChat) -> None:
        super().__init__(
            serving_chat.engine, serving_chat.models, serving_chat.request_logger, serving_chat.tokenizer_executor
        )
        self.serving_chat = serving_chat

    async def create_tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        self.check_model(request)
        tokenizer = self.require_tokenizer("Tokenization")
        if isinstance(request, TokenizeChatRequest):
            _, _, token_ids = await self.serving_chat.render_prompt(request)
        else:
            token_ids = await self.tokenize(request.prompt, request.add_special_tokens)
        token_strs = None
        if request.return_token_strs:
            token_strs = await self.run_in_tokenizer_thread(tokenizer.convert_ids_to_tokens, token_ids)
        return TokenizeResponse(
            count=len(token_ids), max_model_len=self.max_model_len, tokens=token_ids, token_strs=token_strs
        )

    async def create_detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(request)
        tokenizer = self.require_tokenizer("Detokenization")
        # The tokenizer may know more ids than the model (added tokens) or fewer (padded vocab).
        limit = max(len(tokenizer), self.vocab_size)
        bad = [t for t in request.tokens if not 0 <= t < limit]
        if bad:
            raise OpenAIServingError(f"Token id {bad[0]} is out of vocabulary", param="tokens")
        text = await self.run_in_tokenizer_thread(tokenizer.decode, request.tokens)
        return DetokenizeResponse(prompt=text)

    def get_tokenizer_info(self) -> dict[str, Any]:
        """vLLM's TokenizerInfo: the tokenizer's init kwargs (its tokenizer_config.json)
        less the vocabulary file paths, added tokens as their text, its class name, and
        the server's --chat-template when there is one."""
        tokenizer = self.require_tokenizer("Tokenizer info")
        config = dict(getattr(tokenizer, "init_kwargs", None) or {})
        config.pop("vocab_file", None)
        config.pop("merges_file", None)
        config = _json_value(config)
        config["tokenizer_class"] = type(tokenizer).__name__
        if self.serving_chat.chat_template:
            config["chat_template"] = self.serving_chat.chat_template
        return config


def _json_value(value):
    """AddedToken (anything with .content) as its text, containers recursively; any
    other value JSON cannot hold as its str, so the answer never fails to encode."""
    if hasattr(value, "content"):
        return value.content
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return str(value)
    return value
