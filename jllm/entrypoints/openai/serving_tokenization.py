"""`POST /tokenize` and `POST /detokenize` (vLLM's OpenAIServingTokenization): a prompt or
a conversation (through the same chat template as chat completions) to token ids, and back."""
from __future__ import annotations

from jllm.entrypoints.openai.errors import OpenAIServingError
from jllm.entrypoints.openai.protocol import (DetokenizeRequest, DetokenizeResponse, TokenizeChatRequest,
                                              TokenizeRequest, TokenizeResponse)
from jllm.entrypoints.openai.serving_chat import OpenAIServingChat
from jllm.entrypoints.openai.serving_engine import OpenAIServing


class OpenAIServingTokenization(OpenAIServing):
    def __init__(self, serving_chat: OpenAIServingChat) -> None:
        super().__init__(serving_chat.engine, serving_chat.models, serving_chat.request_logger,
                         serving_chat.tokenizer_executor)
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
        return TokenizeResponse(count=len(token_ids), max_model_len=self.max_model_len, tokens=token_ids,
                                token_strs=token_strs)

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
