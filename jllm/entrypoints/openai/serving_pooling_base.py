"""What the pooling routes share (vLLM's pooling serving base): the request checks, `input`
or a conversation to token prompts with vLLM's truncation and context-length rule, one
engine request per prompt handed over together (so they share engine steps), and the
outputs back in input order. A client that leaves aborts the requests still running."""

from __future__ import annotations

import base64
from concurrent.futures import Executor

import numpy as np

from jllm.engine.async_llm_engine import AsyncLLMEngine
from jllm.entrypoints.openai.errors import OpenAIServingError
from jllm.entrypoints.openai.protocol import UsageInfo
from jllm.entrypoints.openai.protocol_pooling import PoolingBaseRequest
from jllm.entrypoints.openai.request_logger import RequestLogger
from jllm.entrypoints.openai.serving_chat import OpenAIServingChat
from jllm.entrypoints.openai.serving_engine import OpenAIServing
from jllm.entrypoints.openai.serving_models import OpenAIServingModels
from jllm.outputs import PoolingRequestOutput
from jllm.pooling_params import PoolingParams


def encode_floats(data: np.ndarray, encoding_format: str) -> list | str:
    """A pooled output as JSON floats, or (encoding_format="base64") its float32 bytes,
    little-endian, in base64: what the OpenAI client decodes with np.frombuffer."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(data, dtype="<f4").tobytes()).decode("ascii")
    return np.asarray(data, dtype=np.float32).tolist()


def batch_inputs(prompt_input) -> list[str | list[int]]:
    """OpenAI's `input` as one item per prompt: a text, or a list of token ids (vLLM's
    parse_and_batch_prompt)."""
    if isinstance(prompt_input, str):
        return [prompt_input]
    if not prompt_input or (isinstance(prompt_input[0], list) and not prompt_input[0]):
        raise OpenAIServingError("please provide at least one prompt", param="input")
    if isinstance(prompt_input[0], int):
        return [list(prompt_input)]
    return list(prompt_input)


class PoolingServing(OpenAIServing):
    def __init__(
        self,
        engine: AsyncLLMEngine,
        models: OpenAIServingModels,
        request_logger: RequestLogger | None,
        tokenizer_executor: Executor,
        serving_chat: OpenAIServingChat,
    ) -> None:
        super().__init__(engine, models, request_logger, tokenizer_executor)
        self.model_config = engine.model_config
        # Renders a conversation as chat completions do (the chat-style bodies).
        self.serving_chat = serving_chat

    def check_request(self, request: PoolingBaseRequest) -> None:
        self.check_model(request)
        if request.priority != 0:
            # vLLM's words; jllm schedules first come, first served only.
            raise OpenAIServingError(
                f"Got priority {request.priority} but Priority scheduling is not enabled.", param="priority"
            )
        truncate = request.truncate_prompt_tokens
        if truncate is not None and truncate > self.max_model_len:
            raise OpenAIServingError(
                "truncate_prompt_tokens value is greater than max_model_len. Please, select a smaller truncation size.",
                param="truncate_prompt_tokens",
            )

    def request_id(self, prefix: str, request: PoolingBaseRequest, raw_request) -> str:
        return f"{prefix}-{self.base_request_id(raw_request, request.request_id)}"

    # ----- prompts --------------------------------------------------------------------

    def _keep(self, truncate_prompt_tokens: int | None) -> int | None:
        if truncate_prompt_tokens is None:
            return None
        return self.max_model_len if truncate_prompt_tokens == -1 else truncate_prompt_tokens

    async def text_prompts(
        self, prompt_input, truncate_prompt_tokens: int | None, add_special_tokens: bool, operation: str
    ) -> list[dict]:
        """Engine prompts ({"prompt_token_ids", "prompt"}) for OpenAI's `input`. A text is cut
        by the tokenizer, as LLM.embed cuts it; token ids keep their last tokens."""
        keep = self._keep(truncate_prompt_tokens)
        prompts = []
        for item in batch_inputs(prompt_input):
            if isinstance(item, str):
                tokenizer = self.require_tokenizer("A text input")
                encoded = await self.run_in_tokenizer_thread(
                    lambda text=item: tokenizer(
                        text, add_special_tokens=add_special_tokens, truncation=keep is not None, max_length=keep
                    )
                )
                prompt = {"prompt_token_ids": list(encoded["input_ids"]), "prompt": item}
            else:
                prompt = {"prompt_token_ids": item[-keep:] if keep is not None else item}
            self.validate_pooling_length(len(prompt["prompt_token_ids"]), operation)
            prompts.append(prompt)
        return prompts

    async def chat_prompt(self, request, operation: str) -> dict:
        _, text, token_ids = await self.serving_chat.render_prompt(request)
        token_ids = self.truncate(token_ids, request.truncate_prompt_tokens)
        self.validate_pooling_length(len(token_ids), operation)
        return {"prompt_token_ids": token_ids, "prompt": text}

    def validate_pooling_length(self, num_tokens: int, operation: str) -> None:
        """vLLM's rule for inputs that generate nothing: the whole input must fit."""
        if num_tokens > self.max_model_len:
            raise OpenAIServingError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{num_tokens} tokens in the input for {operation}. Please reduce the length of the input.",
                param="input_tokens",
            )

    # ----- the engine -----------------------------------------------------------------

    async def encode(
        self, request_id: str, prompts: list[dict], params: PoolingParams, user: str | None = None
    ) -> list[PoolingRequestOutput]:
        """Runs every prompt as its own engine request, `{request_id}-{i}` as vLLM names
        them, all handed to the engine at once; the outputs in prompt order."""
        requests = []
        for i, prompt in enumerate(prompts):
            sub_id = f"{request_id}-{i}"
            self.log_inputs(sub_id, prompt.get("prompt"), prompt["prompt_token_ids"], params, user)
            requests.append((sub_id, prompt, params))
        try:
            streams = await self.engine.add_requests(requests)
        except (ValueError, TypeError) as e:
            raise OpenAIServingError(str(e)) from e
        finals: list[PoolingRequestOutput | None] = [None] * len(prompts)
        async for index, output in self.engine.stream_outputs(streams):
            finals[index] = output
        return finals

    @staticmethod
    def pooling_usage(outputs: list[PoolingRequestOutput]) -> UsageInfo:
        num_prompt_tokens = sum(len(o.prompt_token_ids or ()) for o in outputs)
        return UsageInfo(prompt_tokens=num_prompt_tokens, total_tokens=num_prompt_tokens)
