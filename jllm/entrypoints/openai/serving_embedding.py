"""`POST /v1/embeddings` (vLLM's OpenAIServingEmbedding): OpenAI's body (texts or token ids,
one or many) or vLLM's chat-style one (`messages`), one embedding per input in input order,
as floats or base64."""

from __future__ import annotations

import time

from fastapi import Request

from jllm.entrypoints.openai.protocol_pooling import (
    EmbeddingChatRequest,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingResponseData,
)
from jllm.entrypoints.openai.serving_pooling_base import PoolingServing, encode_floats


class OpenAIServingEmbedding(PoolingServing):
    async def create_embedding(
        self, request: EmbeddingRequest, raw_request: Request | None = None
    ) -> EmbeddingResponse:
        self.check_request(request)
        request_id = self.request_id("embd", request, raw_request)
        created = int(time.time())
        operation = "embedding generation"
        if isinstance(request, EmbeddingChatRequest):
            prompts = [await self.chat_prompt(request, operation)]
        else:
            prompts = await self.text_prompts(
                request.input, request.truncate_prompt_tokens, request.add_special_tokens, operation
            )
        outputs = await self.encode(request_id, prompts, request.to_pooling_params(), request.user)
        data = [
            EmbeddingResponseData(index=i, embedding=encode_floats(output.outputs.data, request.encoding_format))
            for i, output in enumerate(outputs)
        ]
        return EmbeddingResponse(
            id=request_id, created=created, model=self.models.model_name, data=data, usage=self.pooling_usage(outputs)
        )
