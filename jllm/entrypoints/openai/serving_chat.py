"""`POST /v1/chat/completions` (vLLM's OpenAIServingChat): messages through the chat
template, n choices, logprobs / top_logprobs, echo, and SSE streaming."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from concurrent.futures import Executor

from fastapi import Request
from fastapi.responses import JSONResponse

from jllm.engine.async_llm_engine import AsyncLLMEngine
from jllm.entrypoints.openai.chat_utils import apply_chat_template, parse_chat_messages
from jllm.entrypoints.openai.errors import OpenAIServingError
from jllm.entrypoints.openai.protocol import (
    ChatCompletionLogProb,
    ChatCompletionLogProbs,
    ChatCompletionLogProbsContent,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    ChatTemplateFields,
    DeltaMessage,
    UsageInfo,
)
from jllm.entrypoints.openai.request_logger import RequestLogger
from jllm.entrypoints.openai.serving_completion import prompt_logprobs_json
from jllm.entrypoints.openai.serving_engine import (
    EngineStreamingResponse,
    OpenAIServing,
    ResponseOptions,
    sse_error,
    sse_event,
)
from jllm.entrypoints.openai.serving_models import OpenAIServingModels
from jllm.outputs import Logprob, RequestOutput


class OpenAIServingChat(OpenAIServing):
    def __init__(
        self,
        engine: AsyncLLMEngine,
        models: OpenAIServingModels,
        request_logger: RequestLogger | None,
        tokenizer_executor: Executor,
        chat_template: str | None,
        response_role: str = "assistant",
        trust_request_chat_template: bool = False,
        options: ResponseOptions = ResponseOptions(),
    ) -> None:
        super().__init__(engine, models, request_logger, tokenizer_executor, options)
        self.chat_template = chat_template
        self.response_role = response_role
        self.trust_request_chat_template = trust_request_chat_template

    async def render_prompt(self, request: ChatTemplateFields) -> tuple[list[dict], str, list[int]]:
        """(conversation, prompt text, prompt token ids); shared with /tokenize."""
        if request.chat_template is not None and not self.trust_request_chat_template:
            raise OpenAIServingError(
                "Chat template is passed with request, but --trust-request-chat-template is not set. "
                "Refused request with untrusted chat template.",
                param="chat_template",
            )
        tokenizer = self.require_tokenizer("A chat request")
        try:
            conversation = parse_chat_messages(request.messages)
            template = request.chat_template or self.chat_template

            def render() -> tuple[str, list[int]]:
                text = apply_chat_template(tokenizer, request, conversation, template)
                return text, list(tokenizer.encode(text, add_special_tokens=request.add_special_tokens))

            text, token_ids = await self.run_in_tokenizer_thread(render)
        except ValueError as e:
            raise OpenAIServingError(str(e)) from e
        return conversation, text, token_ids

    async def create_chat_completion(self, request: ChatCompletionRequest, raw_request: Request | None = None):
        self.check_model(request)
        self.check_sampling_support(request)
        self._check_tool_choice(request)
        request_id = f"chatcmpl-{self.base_request_id(raw_request, request.request_id)}"
        created = int(time.time())
        conversation, text, token_ids = await self.render_prompt(request)
        token_ids = self.truncate(token_ids, request.truncate_prompt_tokens)
        requested = request.max_completion_tokens or request.max_tokens
        self.validate_input_length(len(token_ids), requested)
        params = self.sampling_params(request, self.max_tokens(len(token_ids), requested))
        engine_prompt = {"prompt_token_ids": token_ids, "prompt": text}
        if request.cache_salt is not None:
            engine_prompt["cache_salt"] = request.cache_salt
        self.log_inputs(request_id, text, token_ids, params, request.user)
        streams = await self.add_requests([(request_id, engine_prompt, params)])
        outputs = self.engine.stream_outputs(streams)
        role = self.response_role if request.add_generation_prompt else conversation[-1]["role"]
        echo_text = self._echo_text(request, conversation, role)
        model_name = self.models.model_name
        if request.stream:
            return EngineStreamingResponse(
                self._stream(request, request_id, created, model_name, role, echo_text, outputs), self.engine, streams
            )
        final = None
        async for _, output in outputs:
            final = output
        return JSONResponse(
            self._response(request, request_id, created, model_name, role, echo_text, final).model_dump()
        )

    @staticmethod
    def _check_tool_choice(request: ChatCompletionRequest) -> None:
        choice = request.tool_choice
        if choice is None or choice == "none":
            return
        if choice == "auto":
            raise OpenAIServingError(
                '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
                param="tool_choice",
            )
        raise OpenAIServingError(
            "Forced tool choice needs structured outputs, which jllm does not support.", param="tool_choice"
        )

    @staticmethod
    def _echo_text(request: ChatCompletionRequest, conversation: list[dict], role: str) -> str:
        """With echo, the last message's content when it is the reply's own role."""
        if request.echo and conversation and conversation[-1].get("role") == role:
            return conversation[-1].get("content") or ""
        return ""

    # ----- responses ------------------------------------------------------------------

    def _response(
        self,
        request: ChatCompletionRequest,
        request_id: str,
        created: int,
        model_name: str,
        role: str,
        echo_text: str,
        final: RequestOutput,
    ) -> ChatCompletionResponse:
        choices = []
        for output in final.outputs:
            logprobs = self._logprobs(list(output.token_ids), output.logprobs, request) if request.logprobs else None
            choices.append(
                ChatCompletionResponseChoice(
                    index=output.index,
                    message=ChatMessage(role=role, content=echo_text + output.text),
                    logprobs=logprobs,
                    finish_reason=output.finish_reason,
                    stop_reason=output.stop_reason,
                    token_ids=list(output.token_ids) if request.return_token_ids else None,
                )
            )
        num_prompt_tokens = len(final.prompt_token_ids or ())
        num_generated_tokens = sum(len(o.token_ids) for o in final.outputs)
        usage = self.usage(num_prompt_tokens, num_generated_tokens, final.num_cached_tokens or 0)
        return ChatCompletionResponse(
            id=request_id,
            created=created,
            model=model_name,
            choices=choices,
            usage=usage,
            prompt_logprobs=prompt_logprobs_json(final.prompt_logprobs),
            prompt_token_ids=list(final.prompt_token_ids or ()) if request.return_token_ids else None,
        )

    def _logprobs(
        self, token_ids: list[int], top_logprobs: list[dict[int, Logprob]] | None, request: ChatCompletionRequest
    ) -> ChatCompletionLogProbs:
        as_ids = self.tokens_as_token_ids(request)
        num_top = request.top_logprobs or 0
        content = []
        for i, token_id in enumerate(token_ids):
            step = top_logprobs[i] if top_logprobs is not None and i < len(top_logprobs) else None
            if step is None or token_id not in step:
                token = self.decoded_token(None, token_id, as_ids)
                content.append(ChatCompletionLogProbsContent(token=token, bytes=_utf8(token)))
                continue
            chosen = step[token_id]
            token = self.decoded_token(chosen, token_id, as_ids)
            # The chosen token's own bytes, even when it is shown as token_id:N (vLLM's).
            chosen_text = self.decoded_token(chosen, token_id, False)
            # The engine puts the chosen token first, so it leads and the k-th best
            # drops out when it is not among the top k (vLLM's order and count).
            top = [
                ChatCompletionLogProb(
                    token=(t := self.decoded_token(lp, tid, as_ids)), logprob=max(lp.logprob, -9999.0), bytes=_utf8(t)
                )
                for rank, (tid, lp) in enumerate(step.items())
                if rank < num_top or num_top == -1
            ]
            content.append(
                ChatCompletionLogProbsContent(
                    token=token, logprob=max(chosen.logprob, -9999.0), bytes=_utf8(chosen_text), top_logprobs=top
                )
            )
        return ChatCompletionLogProbs(content=content)

    async def _stream(
        self,
        request: ChatCompletionRequest,
        request_id: str,
        created: int,
        model_name: str,
        role: str,
        echo_text: str,
        outputs,
    ) -> AsyncGenerator[str, None]:
        n = request.n or 1
        num_prompt_tokens = num_cached_tokens = 0
        num_tokens = [0] * n
        finish_sent = [False] * n
        include_usage, continuous_usage = self.stream_usage(request)

        def chunk(choice: ChatCompletionResponseStreamChoice, **fields) -> str:
            # Chat chunks leave out unset fields (as vLLM's do), so the header fields are set.
            response = ChatCompletionStreamResponse(
                id=request_id,
                object="chat.completion.chunk",
                created=created,
                model=model_name,
                choices=[choice],
                **fields,
            )
            if continuous_usage:
                completion_tokens = sum(num_tokens)
                response.usage = UsageInfo(
                    prompt_tokens=num_prompt_tokens,
                    completion_tokens=completion_tokens,
                    total_tokens=num_prompt_tokens + completion_tokens,
                )
            return sse_event(response, exclude_unset=True)

        try:
            first = True
            async for _, result in outputs:
                if first:
                    num_prompt_tokens = len(result.prompt_token_ids or ())
                    num_cached_tokens = result.num_cached_tokens or 0
                    prompt_token_ids = list(result.prompt_token_ids or ()) if request.return_token_ids else None
                    for i in range(n):
                        # The role chunk carries prompt_token_ids (null when not asked for), as vLLM's.
                        yield chunk(
                            ChatCompletionResponseStreamChoice(
                                index=i, delta=DeltaMessage(role=role, content=""), logprobs=None, finish_reason=None
                            ),
                            prompt_token_ids=prompt_token_ids,
                        )
                        if echo_text:
                            yield chunk(
                                ChatCompletionResponseStreamChoice(
                                    index=i, delta=DeltaMessage(content=echo_text), logprobs=None, finish_reason=None
                                )
                            )
                    first = False
                for output in result.outputs:
                    i = output.index
                    if finish_sent[i] or (not output.text and not output.token_ids and output.finish_reason is None):
                        continue
                    num_tokens[i] += len(output.token_ids)
                    choice = ChatCompletionResponseStreamChoice(
                        index=i,
                        delta=DeltaMessage(content=output.text),
                        logprobs=(
                            self._logprobs(list(output.token_ids), output.logprobs, request)
                            if request.logprobs
                            else None
                        ),
                        finish_reason=output.finish_reason,
                    )
                    if output.finish_reason is not None:
                        choice.stop_reason = output.stop_reason
                        finish_sent[i] = True
                    choice.token_ids = list(output.token_ids) if request.return_token_ids else None
                    yield chunk(choice)
            if include_usage:
                usage = self.usage(num_prompt_tokens, sum(num_tokens), num_cached_tokens)
                yield sse_event(
                    ChatCompletionStreamResponse(
                        id=request_id,
                        object="chat.completion.chunk",
                        created=created,
                        model=model_name,
                        choices=[],
                        usage=usage,
                    ),
                    exclude_unset=True,
                    exclude_none=True,
                )
        except Exception as e:  # noqa: BLE001 - the status line is gone; the error goes in the stream
            yield sse_error(e)
        finally:
            await outputs.aclose()
        yield "data: [DONE]\n\n"


def _utf8(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))
