"""What every OpenAI endpoint shares (vLLM's OpenAIServing): the model check, request
ids, tokenization off the event loop, the context-length check, SamplingParams with
the server's defaults, handing requests to the engine, and server-sent events."""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import Executor
from dataclasses import dataclass
from http import HTTPStatus

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from jllm.engine.async_llm_engine import AsyncLLMEngine, RequestStream
from jllm.engine.prompts import bad_words_token_ids
from jllm.transformers_utils.config import get_diff_sampling_param
from jllm.entrypoints.openai.errors import OpenAIServingError, create_error_response
from jllm.entrypoints.openai.protocol import SamplingRequest, UsageInfo
from jllm.entrypoints.openai.request_logger import RequestLogger
from jllm.entrypoints.openai.serving_models import OpenAIServingModels
from jllm.outputs import Logprob
from jllm.sampling_params import SamplingParams

# vLLM's VLLM_MAX_NUM_BAD_WORDS: token sequences per request after tokenization.
MAX_NUM_BAD_WORDS = 128
# Request fields that ask for structured outputs (guided_* are vLLM's names before 0.12).
STRUCTURED_OUTPUT_FIELDS = (
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_decoding_backend",
    "guided_whitespace_pattern",
    "structural_tag",
)


@dataclass(frozen=True)
class ResponseOptions:
    """Server flags that shape every response (vLLM's frontend flags of the same names)."""

    return_tokens_as_token_ids: bool = False
    enable_force_include_usage: bool = False
    enable_prompt_tokens_details: bool = False


def random_uuid() -> str:
    return uuid.uuid4().hex


def sse_event(chunk: BaseModel | str, exclude_unset: bool = False, exclude_none: bool = False) -> str:
    data = (
        chunk
        if isinstance(chunk, str)
        else chunk.model_dump_json(exclude_unset=exclude_unset, exclude_none=exclude_none)
    )
    return f"data: {data}\n\n"


def sse_error(exc: BaseException) -> str:
    """An error after the stream has started: the status is already 200, so it goes in
    an event (vLLM's create_streaming_error_response)."""
    if isinstance(exc, OpenAIServingError):
        error = create_error_response(exc.message, exc.err_type, exc.status_code, exc.param)
    elif isinstance(exc, ValueError):
        error = create_error_response(str(exc))
    else:
        error = create_error_response(
            str(exc) or type(exc).__name__, "InternalServerError", HTTPStatus.INTERNAL_SERVER_ERROR
        )
    return sse_event(error)


class EngineStreamingResponse(StreamingResponse):
    """An SSE response that aborts its engine requests however it ends: a client that
    leaves before the body is first iterated never runs the generator's own cleanup."""

    def __init__(
        self, content, engine: AsyncLLMEngine, streams: list[RequestStream], media_type: str = "text/event-stream"
    ) -> None:
        super().__init__(content, media_type=media_type)
        self._engine = engine
        self._streams = streams

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for stream in self._streams:
                if not stream.finished:
                    self._engine.abort(stream.request_id)


class OpenAIServing:
    def __init__(
        self,
        engine: AsyncLLMEngine,
        models: OpenAIServingModels,
        request_logger: RequestLogger | None,
        tokenizer_executor: Executor,
        options: ResponseOptions = ResponseOptions(),
    ) -> None:
        self.engine = engine
        self.options = options
        self.models = models
        self.request_logger = request_logger
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.model_config.max_model_len
        self.vocab_size = engine.vocab_size
        self.default_sampling_params = get_diff_sampling_param(engine.generation_config)
        # One thread: tokenizing a long prompt must not stall the event loop, and the
        # tokenizer is not shared between several frontend threads.
        self.tokenizer_executor = tokenizer_executor

    # ----- request checks -------------------------------------------------------------

    def check_model(self, request) -> None:
        self.models.check_model(getattr(request, "model", None))

    @staticmethod
    def check_sampling_support(request: SamplingRequest) -> None:
        """Refuse what jllm cannot honour yet, rather than serve the request without it."""
        if request.use_beam_search:
            raise OpenAIServingError("Beam search is not supported by jllm.", param="use_beam_search")
        if request.response_format is not None and request.response_format.type != "text":
            raise OpenAIServingError(
                f"response_format type '{request.response_format.type}' needs structured outputs, "
                "which jllm does not support.",
                param="response_format",
            )
        for name in STRUCTURED_OUTPUT_FIELDS:
            if getattr(request, name) is not None:
                raise OpenAIServingError(
                    f"`{name}` asks for structured outputs, which jllm does not support yet; the output "
                    "would not be constrained, so the request is refused.",
                    param=name,
                )
        if request.vllm_xargs:
            raise OpenAIServingError(
                "`vllm_xargs` is read by engine-level logits processors and plugins, and this server has none.",
                param="vllm_xargs",
            )

    @staticmethod
    def base_request_id(raw_request: Request | None, default: str | None = None) -> str:
        default = default or random_uuid()
        if raw_request is None:
            return default
        return raw_request.headers.get("X-Request-Id", default)

    # ----- prompts --------------------------------------------------------------------

    def require_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise OpenAIServingError(f"{what} needs a tokenizer; this server runs with --skip-tokenizer-init.")
        return self.tokenizer

    async def run_in_tokenizer_thread(self, fn, *args):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.tokenizer_executor, fn, *args)

    async def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        tokenizer = self.require_tokenizer("A text prompt")
        return await self.run_in_tokenizer_thread(
            lambda: list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
        )

    def truncate(self, token_ids: list[int], truncate_prompt_tokens: int | None) -> list[int]:
        if truncate_prompt_tokens is None:
            return token_ids
        keep = self.max_model_len if truncate_prompt_tokens == -1 else truncate_prompt_tokens
        return token_ids[-keep:]

    def validate_input_length(self, num_prompt_tokens: int, max_tokens: int | None) -> None:
        """vLLM's context-length check: the prompt plus the requested output must fit,
        and without max_tokens the prompt must leave room for one token."""
        requested = max_tokens or 0
        total = num_prompt_tokens + requested
        if total > self.max_model_len or num_prompt_tokens >= self.max_model_len:
            raise OpenAIServingError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {requested} output tokens and your prompt contains {num_prompt_tokens} input "
                f"tokens, for a total of {total} tokens. Please reduce the length of the input prompt or "
                "the number of requested output tokens.",
                param="input_tokens",
            )

    def max_tokens(self, num_prompt_tokens: int, requested: int | None) -> int:
        """vLLM's get_max_tokens: the smallest of the context left, the request's value
        and the model's generation_config max_new_tokens."""
        candidates = (self.max_model_len - num_prompt_tokens, requested, self.default_sampling_params.get("max_tokens"))
        return min(v for v in candidates if v is not None)

    def sampling_params(self, request, max_tokens: int) -> SamplingParams:
        try:
            params = request.to_sampling_params(max_tokens, self.default_sampling_params)
            self._check_engine_limits(params)
        except ValueError as e:
            raise OpenAIServingError(str(e)) from e
        return params

    def _check_engine_limits(self, params: SamplingParams) -> None:
        """Keep requests inside what one engine step can hold: a value that would
        overflow the step's int32 arrays or its largest list bucket must never reach
        it, since a failed step ends the engine for every request."""
        if params.top_k >= self.vocab_size:
            params.top_k = 0  # keeps every token either way
        if params.allowed_token_ids:
            params.allowed_token_ids = list(dict.fromkeys(params.allowed_token_ids))
        if params.bad_words and self.tokenizer is not None:
            words = bad_words_token_ids(params, self.tokenizer, self.vocab_size)
            if len(words) > MAX_NUM_BAD_WORDS:
                raise ValueError(
                    f"Too many bad words after tokenization: {len(words)}. The max number is {MAX_NUM_BAD_WORDS}."
                )

    def log_inputs(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int] | None,
        params: SamplingParams | None,
        user: str | None = None,
    ) -> None:
        if self.request_logger is not None:
            self.request_logger.log_inputs(request_id, prompt, prompt_token_ids, params, user)

    # ----- the engine -----------------------------------------------------------------

    async def add_requests(self, requests: list[tuple[str, dict, SamplingParams]]) -> list[RequestStream]:
        """Hand all of one HTTP request's prompts to the engine: all are accepted, or
        none stays (the first refusal is the answer, as a 400)."""
        results = await asyncio.gather(
            *(self.engine.add_request(request_id, prompt, params) for request_id, prompt, params in requests),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if not errors:
            return results
        for result in results:
            if isinstance(result, RequestStream):
                self.engine.abort(result.request_id)
        error = errors[0]
        if isinstance(error, (ValueError, TypeError)):
            raise OpenAIServingError(str(error)) from error
        raise error

    # ----- outputs --------------------------------------------------------------------

    def tokens_as_token_ids(self, request: SamplingRequest) -> bool:
        """The request's return_tokens_as_token_ids, else the server's flag."""
        if request.return_tokens_as_token_ids is not None:
            return request.return_tokens_as_token_ids
        return self.options.return_tokens_as_token_ids

    def stream_usage(self, request: SamplingRequest) -> tuple[bool, bool]:
        """(a final usage chunk, usage on every chunk), as vLLM's should_include_usage."""
        options = request.stream_options
        force = self.options.enable_force_include_usage
        if options is None:
            return force, False
        include = bool(options.include_usage) or force
        return include, include and bool(options.continuous_usage_stats)

    def usage(self, num_prompt_tokens: int, num_generated_tokens: int, num_cached_tokens: int = 0) -> UsageInfo:
        usage = UsageInfo(
            prompt_tokens=num_prompt_tokens,
            completion_tokens=num_generated_tokens,
            total_tokens=num_prompt_tokens + num_generated_tokens,
        )
        if self.options.enable_prompt_tokens_details and num_cached_tokens:
            usage.prompt_tokens_details = {"cached_tokens": num_cached_tokens}
        return usage

    def decoded_token(self, logprob: Logprob | None, token_id: int, as_token_id: bool) -> str:
        if as_token_id or self.tokenizer is None:
            return f"token_id:{token_id}"
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return self.tokenizer.decode([token_id])

    def decode_prompt(self, prompt: str | None, prompt_token_ids: list[int]) -> str:
        if prompt is not None:
            return prompt
        return self.tokenizer.decode(prompt_token_ids) if self.tokenizer is not None else ""
