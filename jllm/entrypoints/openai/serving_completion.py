"""`POST /v1/completions` (vLLM's OpenAIServingCompletion): text or token-id prompts,
one or many, n samples each, echo, logprobs, and SSE streaming."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator

from fastapi import Request
from fastapi.responses import JSONResponse

from jllm.entrypoints.openai.errors import OpenAIServingError
from jllm.entrypoints.openai.protocol import (
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
    LogprobEntry,
    UsageInfo,
)
from jllm.entrypoints.openai.serving_engine import EngineStreamingResponse, OpenAIServing, sse_error, sse_event
from jllm.outputs import Logprob, RequestOutput


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest, raw_request: Request | None = None):
        self.check_model(request)
        self.check_sampling_support(request)
        if request.suffix is not None:
            raise OpenAIServingError("suffix is not currently supported", param="suffix")
        request_id = f"cmpl-{self.base_request_id(raw_request, request.request_id)}"
        created = int(time.time())

        prompts = await self._resolve_prompts(request)
        engine_requests = []
        for i, (text, token_ids) in enumerate(prompts):
            self.validate_input_length(len(token_ids), request.max_tokens)
            # echo with max_tokens=0 returns the prompt alone; one token is generated and dropped.
            requested = 1 if request.echo and request.max_tokens == 0 else request.max_tokens
            params = self.sampling_params(request, self.max_tokens(len(token_ids), requested))
            engine_prompt = {"prompt_token_ids": token_ids, "prompt": text}
            if request.cache_salt is not None:
                engine_prompt["cache_salt"] = request.cache_salt
            sub_id = request_id if len(prompts) == 1 else f"{request_id}-{i}"
            self.log_inputs(sub_id, text, token_ids, params, request.user)
            engine_requests.append((sub_id, engine_prompt, params))
        streams = await self.add_requests(engine_requests)
        outputs = self.engine.stream_outputs(streams)
        model_name = self.models.model_name
        if request.stream:
            return EngineStreamingResponse(
                self._stream(request, request_id, created, model_name, len(prompts), outputs), self.engine, streams
            )
        finals: list[RequestOutput | None] = [None] * len(prompts)
        async for index, output in outputs:
            finals[index] = output
        return JSONResponse(self._response(request, request_id, created, model_name, finals).model_dump())

    async def _resolve_prompts(self, request: CompletionRequest) -> list[tuple[str | None, list[int]]]:
        """(text or None, token ids) per prompt, truncated as the request asks."""
        prompt = request.prompt
        if isinstance(prompt, str):
            items: list = [prompt]
        elif prompt and isinstance(prompt[0], (str, list)):
            items = list(prompt)
        else:
            items = [prompt]  # one prompt of token ids (possibly empty: the engine refuses it)
        resolved = []
        for item in items:
            if isinstance(item, str):
                token_ids = await self.tokenize(item, request.add_special_tokens)
                resolved.append((item, self.truncate(token_ids, request.truncate_prompt_tokens)))
            else:
                resolved.append((None, self.truncate(list(item), request.truncate_prompt_tokens)))
        return resolved

    # ----- the non-streaming response -------------------------------------------------

    def _response(
        self, request: CompletionRequest, request_id: str, created: int, model_name: str, finals: list[RequestOutput]
    ) -> CompletionResponse:
        choices = []
        num_prompt_tokens = num_generated_tokens = num_cached_tokens = 0
        for final in finals:
            prompt_ids = list(final.prompt_token_ids or [])
            prompt_logprobs = final.prompt_logprobs
            num_prompt_tokens += len(prompt_ids)
            num_cached_tokens += final.num_cached_tokens or 0
            for output in final.outputs:
                token_ids, logprobs, text = list(output.token_ids), output.logprobs, output.text
                if request.echo:
                    prompt_text = self.decode_prompt(final.prompt, prompt_ids)
                    if request.max_tokens == 0:
                        token_ids, logprobs, text = prompt_ids, prompt_logprobs, prompt_text
                    else:
                        token_ids = prompt_ids + token_ids
                        logprobs = None if logprobs is None else [*(prompt_logprobs or []), *logprobs]
                        text = prompt_text + text
                choices.append(
                    CompletionResponseChoice(
                        index=len(choices),
                        text=text,
                        logprobs=(
                            self._logprobs(token_ids, logprobs, request) if request.logprobs is not None else None
                        ),
                        finish_reason=output.finish_reason,
                        stop_reason=output.stop_reason,
                        prompt_logprobs=prompt_logprobs_json(prompt_logprobs),
                        prompt_token_ids=prompt_ids if request.return_token_ids else None,
                        token_ids=list(output.token_ids) if request.return_token_ids else None,
                    )
                )
                num_generated_tokens += len(output.token_ids)
        usage = self.usage(num_prompt_tokens, num_generated_tokens, num_cached_tokens)
        return CompletionResponse(id=request_id, created=created, model=model_name, choices=choices, usage=usage)

    def _logprobs(
        self,
        token_ids: list[int],
        top_logprobs: list[dict[int, Logprob] | None] | None,
        request: CompletionRequest,
        initial_text_offset: int = 0,
    ) -> CompletionLogProbs:
        """OpenAI's completion logprobs: per token its text, logprob, the top `logprobs`
        alternatives (plus the chosen one) and its character offset."""
        as_ids = self.tokens_as_token_ids(request)
        num_top = request.logprobs
        result = CompletionLogProbs()
        last_token_len = 0
        for i, token_id in enumerate(token_ids):
            step = top_logprobs[i] if top_logprobs is not None and i < len(top_logprobs) else None
            if step is None or token_id not in step:
                token = self.decoded_token(None, token_id, as_ids)
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
            else:
                token = self.decoded_token(step[token_id], token_id, as_ids)
                result.token_logprobs.append(max(step[token_id].logprob, -9999.0))
                result.top_logprobs.append(
                    {
                        self.decoded_token(lp, tid, as_ids): max(lp.logprob, -9999.0)
                        for rank, (tid, lp) in enumerate(step.items())
                        if rank <= num_top or num_top == -1
                    }
                )
            result.tokens.append(token)
            result.text_offset.append(
                initial_text_offset if not result.text_offset else result.text_offset[-1] + last_token_len
            )
            last_token_len = len(token)
        return result

    # ----- streaming ------------------------------------------------------------------

    async def _stream(
        self, request: CompletionRequest, request_id: str, created: int, model_name: str, num_prompts: int, outputs
    ) -> AsyncGenerator[str, None]:
        n = request.n
        previous_text_lens = [0] * n * num_prompts
        previous_num_tokens = [0] * n * num_prompts
        finish_sent = [False] * n * num_prompts
        first_sent = [False] * n * num_prompts
        has_echoed = [False] * n * num_prompts
        num_prompt_tokens = [0] * num_prompts
        num_cached_tokens = [0] * num_prompts
        include_usage, continuous_usage = self.stream_usage(request)
        try:
            async for prompt_index, result in outputs:
                prompt_ids = list(result.prompt_token_ids or [])
                num_prompt_tokens[prompt_index] = len(prompt_ids)
                num_cached_tokens[prompt_index] = result.num_cached_tokens or 0
                for output in result.outputs:
                    i = output.index + prompt_index * n
                    if finish_sent[i]:
                        continue  # a finished sample rides along in its siblings' outputs
                    delta_text, delta_ids, delta_logprobs = output.text, list(output.token_ids), output.logprobs
                    if request.echo and not has_echoed[i]:
                        prompt_text = self.decode_prompt(result.prompt, prompt_ids)
                        if request.max_tokens == 0:
                            delta_text, delta_ids, delta_logprobs = prompt_text, prompt_ids, result.prompt_logprobs
                        else:
                            delta_text = prompt_text + delta_text
                            delta_ids = prompt_ids + delta_ids
                            delta_logprobs = [*(result.prompt_logprobs or []), *(output.logprobs or [])]
                        has_echoed[i] = True
                    elif not delta_text and not delta_ids and output.finish_reason is None:
                        continue
                    logprobs = (
                        self._logprobs(delta_ids, delta_logprobs, request, previous_text_lens[i])
                        if request.logprobs is not None
                        else None
                    )
                    previous_text_lens[i] += len(delta_text)
                    previous_num_tokens[i] += len(output.token_ids)
                    finish_sent[i] = output.finish_reason is not None
                    chunk = CompletionStreamResponse(
                        id=request_id,
                        created=created,
                        model=model_name,
                        choices=[
                            CompletionResponseStreamChoice(
                                index=i,
                                text=delta_text,
                                logprobs=logprobs,
                                finish_reason=output.finish_reason,
                                stop_reason=output.stop_reason,
                                token_ids=delta_ids if request.return_token_ids else None,
                                prompt_token_ids=prompt_ids if request.return_token_ids and not first_sent[i] else None,
                            )
                        ],
                    )
                    first_sent[i] = True
                    if continuous_usage:
                        prompt_tokens = num_prompt_tokens[prompt_index]
                        chunk.usage = UsageInfo(
                            prompt_tokens=prompt_tokens,
                            completion_tokens=previous_num_tokens[i],
                            total_tokens=prompt_tokens + previous_num_tokens[i],
                        )
                    yield sse_event(chunk)
            if include_usage:
                usage = self.usage(sum(num_prompt_tokens), sum(previous_num_tokens), sum(num_cached_tokens))
                yield sse_event(
                    CompletionStreamResponse(id=request_id, created=created, model=model_name, choices=[], usage=usage),
                    exclude_none=True,
                )
        except Exception as e:  # noqa: BLE001 - the status line is gone; the error goes in the stream
            yield sse_error(e)
        finally:
            await outputs.aclose()
        yield "data: [DONE]\n\n"


def prompt_logprobs_json(prompt_logprobs) -> list[dict[int, LogprobEntry] | None] | None:
    if prompt_logprobs is None:
        return None
    return [
        None
        if step is None
        else {
            tid: LogprobEntry(logprob=max(lp.logprob, -9999.0), rank=lp.rank, decoded_token=lp.decoded_token)
            for tid, lp in step.items()
        }
        for step in prompt_logprobs
    ]
