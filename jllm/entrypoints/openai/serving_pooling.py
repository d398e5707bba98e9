"""`POST /pooling` (vLLM's OpenAIServingPooling): the raw pooled output of each input for a
pooling task the model serves; without `task`, its token-level one (one vector per token)."""

from __future__ import annotations

import time

from fastapi import Request

from jllm.entrypoints.openai.errors import OpenAIServingError
from jllm.entrypoints.openai.protocol_pooling import (
    PoolingChatRequest,
    PoolingRequest,
    PoolingResponse,
    PoolingResponseData,
)
from jllm.entrypoints.openai.serving_pooling_base import PoolingServing, encode_floats

# The task /pooling runs when a request names none, in vLLM's order of preference.
_DEFAULT_TASKS = ("token_embed", "token_classify")


class OpenAIServingPooling(PoolingServing):
    async def create_pooling(self, request: PoolingRequest, raw_request: Request | None = None) -> PoolingResponse:
        self.check_request(request)
        request_id = self.request_id("pool", request, raw_request)
        created = int(time.time())
        try:
            params = request.to_pooling_params(self._task(request.task))
        except ValueError as e:
            raise OpenAIServingError(str(e), param="task") from e
        operation = "embedding generation"
        if isinstance(request, PoolingChatRequest):
            prompts = [await self.chat_prompt(request, operation)]
        else:
            prompts = await self.text_prompts(
                request.input, request.truncate_prompt_tokens, request.add_special_tokens, operation
            )
        outputs = await self.encode(request_id, prompts, params, request.user)
        data = [
            PoolingResponseData(index=i, data=encode_floats(output.outputs.data, request.encoding_format))
            for i, output in enumerate(outputs)
        ]
        return PoolingResponse(
            id=request_id, created=created, model=self.models.model_name, data=data, usage=self.pooling_usage(outputs)
        )

    def _task(self, task: str | None) -> str:
        supported = self.model_config.supported_tasks
        if task is None:
            task = next((t for t in _DEFAULT_TASKS if t in supported), None)
            if task is None:
                raise OpenAIServingError(f"pooling_task must be one of {supported}.", param="task")
        return task
