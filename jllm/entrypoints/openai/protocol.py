"""The server's request and response bodies as pydantic models, with vLLM's field names,
defaults and validation messages (vllm/entrypoints/openai/protocol.py).

Requests accept unknown fields and ignore them with a logged warning, as vLLM does (OpenAI
clients send fields of their own); a field jllm defines but cannot honour is refused by
the serving layer, and a field of the wrong type or a rule broken here becomes a 400
through the server's validation handler.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from jllm.sampling_params import RequestOutputKind, SamplingParams

# Seeds travel as int64, as in vLLM (torch.iinfo(torch.long)).
_LONG_MIN, _LONG_MAX = -(1 << 63), (1 << 63) - 1

# vLLM's server defaults for fields a request leaves out; the model's
# generation_config.json overrides them (unless --generation-config vllm).
DEFAULT_SAMPLING_PARAMS = {"repetition_penalty": 1.0, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}


logger = logging.getLogger(__name__)


# Half a UTF-16 pair: JSON's \\uXXXX escapes can spell one, and Python keeps it in a str.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def reject_lone_surrogates(data):
    """Refuses a body holding a lone surrogate up front: no tokenizer, log or JSON
    encoder accepts one. Walked with a stack, since a body may nest deeper than Python
    recurses."""
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if _LONE_SURROGATE.search(value):
                raise ValueError(
                    "The request holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff "
                    "escape), which is not valid Unicode."
                )
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return data


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow")


class OpenAIRequestModel(OpenAIBaseModel):
    """A request body (or part of one): checked and logged as it arrives. Responses
    skip this, since they are built by the server (one per token when streaming)."""

    @model_validator(mode="before")
    @classmethod
    def check_unicode(cls, data):
        return reject_lone_surrogates(data)

    @model_validator(mode="wrap")
    @classmethod
    def log_extra_fields(cls, data, handler):
        result = handler(data)
        if isinstance(data, dict):
            known = {name for name in cls.model_fields} | {f.alias for f in cls.model_fields.values() if f.alias}
            extra = data.keys() - known
            if extra:
                logger.warning("The following fields were present in the request but ignored: %s", extra)
        return result


# ----- errors, usage, models -------------------------------------------------------------


class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int | None = 0
    prompt_tokens_details: dict[str, int] | None = None


class StreamOptions(OpenAIRequestModel):
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


class ModelPermission(OpenAIBaseModel):
    id: str
    object: str = "model_permission"
    created: int = Field(default_factory=lambda: int(time.time()))
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(OpenAIBaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "vllm"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[ModelPermission] = Field(default_factory=list)
    # jllm's addition (vLLM's card has none): what the model serves, "generate" or its
    # pooling tasks ("embed", "token_embed", "classify", "token_classify").
    supported_tasks: list[str] | None = None


class ModelList(OpenAIBaseModel):
    object: str = "list"
    data: list[ModelCard] = Field(default_factory=list)


class ResponseFormat(OpenAIRequestModel):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: dict[str, Any] | None = None


# ----- sampling fields shared by completions and chat ------------------------------------


class SamplingRequest(OpenAIRequestModel):
    """The OpenAI sampling fields and vLLM's extras, common to both generation APIs."""

    model: str | None = None
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    n: int = 1
    presence_penalty: float | None = 0.0
    seed: int | None = Field(None, ge=_LONG_MIN, le=_LONG_MAX)
    stop: str | list[str] | None = Field(default_factory=list)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    # vLLM's sampling extras
    use_beam_search: bool = False
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = Field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] = Field(default_factory=list)
    prompt_logprobs: int | None = None
    # vLLM's other extras
    request_id: str | None = None
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    cache_salt: str | None = None
    vllm_xargs: dict[str, Any] | None = None
    # Structured outputs, and the fields vLLM had for them before 0.12: defined so that
    # a request using them is refused (serving_engine) instead of being served
    # unconstrained.
    structured_outputs: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_decoding_backend: Any = None
    guided_whitespace_pattern: Any = None
    structural_tag: Any = None

    @model_validator(mode="before")
    @classmethod
    def validate_stream_options(cls, data):
        if isinstance(data, dict) and data.get("stream_options") and not data.get("stream"):
            raise ValueError("Stream options can only be defined when `stream=True`.")
        return data

    @model_validator(mode="before")
    @classmethod
    def check_prompt_logprobs(cls, data):
        if not isinstance(data, dict) or (prompt_logprobs := data.get("prompt_logprobs")) is None:
            return data
        if data.get("stream"):
            raise ValueError("`prompt_logprobs` are not available when `stream=True`.")
        if isinstance(prompt_logprobs, int) and prompt_logprobs < 0 and prompt_logprobs != -1:
            raise ValueError("`prompt_logprobs` must be a positive value or -1.")
        return data

    def build_sampling_params(
        self, max_tokens: int, default_sampling_params: dict, logprobs: int | None, prompt_logprobs: int | None
    ) -> SamplingParams:
        """SamplingParams with vLLM's precedence: the request's value, else the model's
        generation_config default, else the server default."""

        def pick(name: str):
            value = getattr(self, name)
            if value is None:
                value = default_sampling_params.get(name, DEFAULT_SAMPLING_PARAMS[name])
            return value

        return SamplingParams.from_optional(
            n=self.n,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=pick("repetition_penalty"),
            temperature=pick("temperature"),
            top_p=pick("top_p"),
            top_k=pick("top_k"),
            min_p=pick("min_p"),
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            bad_words=self.bad_words,
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            logit_bias=self.logit_bias,
            allowed_token_ids=self.allowed_token_ids,
            extra_args=self.vllm_xargs,
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
        )


# ----- completions -----------------------------------------------------------------------


class CompletionRequest(SamplingRequest):
    prompt: list[int] | list[list[int]] | str | list[str] | None = None
    echo: bool | None = False
    logprobs: int | None = None
    max_tokens: int | None = 16
    suffix: str | None = None
    add_special_tokens: bool = True

    @model_validator(mode="before")
    @classmethod
    def check_logprobs(cls, data):
        if (
            isinstance(data, dict)
            and isinstance(logprobs := data.get("logprobs"), int)
            and not isinstance(logprobs, bool)
            and logprobs < 0
            and logprobs != -1
        ):
            raise ValueError("`logprobs` must be a positive value or -1.")
        return data

    @model_validator(mode="before")
    @classmethod
    def validate_prompt(cls, data):
        if isinstance(data, dict):
            prompt = data.get("prompt")
            if prompt is None or (isinstance(prompt, str) and prompt == ""):
                raise ValueError("Either prompt or prompt_embeds must be provided and non-empty.")
        return data

    def to_sampling_params(self, max_tokens: int, default_sampling_params: dict) -> SamplingParams:
        prompt_logprobs = self.prompt_logprobs
        if prompt_logprobs is None and self.echo:
            prompt_logprobs = self.logprobs
        return self.build_sampling_params(max_tokens, default_sampling_params, self.logprobs, prompt_logprobs)


class CompletionLogProbs(OpenAIBaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class LogprobEntry(OpenAIBaseModel):
    """vLLM's Logprob as JSON (in prompt_logprobs)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class CompletionResponseChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None
    prompt_logprobs: list[dict[int, LogprobEntry] | None] | None = None
    prompt_token_ids: list[int] | None = None


class CompletionResponse(OpenAIBaseModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo


class CompletionResponseStreamChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None


class CompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseStreamChoice]
    usage: UsageInfo | None = None


# ----- chat ------------------------------------------------------------------------------


class ChatCompletionContentPart(OpenAIRequestModel):
    type: str
    text: str | None = None


class ChatCompletionMessageParam(OpenAIRequestModel):
    role: str
    content: str | list[ChatCompletionContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatTemplateFields(OpenAIRequestModel):
    """How a conversation becomes a prompt; shared by chat completions and /tokenize."""

    messages: list[ChatCompletionMessageParam] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    documents: list[dict[str, str]] | None = None

    @model_validator(mode="before")
    @classmethod
    def check_generation_prompt(cls, data):
        if isinstance(data, dict) and data.get("continue_final_message") and data.get("add_generation_prompt"):
            raise ValueError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        return data


class ChatCompletionRequest(ChatTemplateFields, SamplingRequest):
    logprobs: bool | None = False
    top_logprobs: int | None = 0
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    tool_choice: str | dict[str, Any] | None = "none"
    parallel_tool_calls: bool | None = False
    echo: bool = False
    n: int | None = 1

    @model_validator(mode="before")
    @classmethod
    def check_logprobs(cls, data):
        if not isinstance(data, dict) or (top_logprobs := data.get("top_logprobs")) is None:
            return data
        if isinstance(top_logprobs, int) and not isinstance(top_logprobs, bool):
            if top_logprobs < 0 and top_logprobs != -1:
                raise ValueError("`top_logprobs` must be a positive value or -1.")
            if (top_logprobs == -1 or top_logprobs > 0) and not data.get("logprobs"):
                raise ValueError("when using `top_logprobs`, `logprobs` must be set to true.")
        return data

    def to_sampling_params(self, max_tokens: int, default_sampling_params: dict) -> SamplingParams:
        logprobs = self.top_logprobs if self.logprobs else None
        return self.build_sampling_params(max_tokens, default_sampling_params, logprobs, self.prompt_logprobs)


class ChatMessage(OpenAIBaseModel):
    role: str
    content: str | None = None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)


class ChatCompletionLogProb(OpenAIBaseModel):
    token: str
    logprob: float = -9999.0
    bytes: list[int] | None = None


class ChatCompletionLogProbsContent(ChatCompletionLogProb):
    top_logprobs: list[ChatCompletionLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(OpenAIBaseModel):
    content: list[ChatCompletionLogProbsContent] | None = None


class ChatCompletionResponseChoice(OpenAIBaseModel):
    index: int
    message: ChatMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = "stop"
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo
    prompt_logprobs: list[dict[int, LogprobEntry] | None] | None = None
    prompt_token_ids: list[int] | None = None


class DeltaMessage(OpenAIBaseModel):
    role: str | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)


class ChatCompletionResponseStreamChoice(OpenAIBaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseStreamChoice]
    usage: UsageInfo | None = None
    # Set on the first chunk only, with return_token_ids.
    prompt_token_ids: list[int] | None = None


# ----- tokenization ----------------------------------------------------------------------


class TokenizeCompletionRequest(OpenAIRequestModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(ChatTemplateFields):
    model: str | None = None
    return_token_strs: bool | None = False


TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


class TokenizeResponse(OpenAIBaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIRequestModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str


# ----- the legacy /generate endpoint -----------------------------------------------------


class GenerateRequest(BaseModel):
    """vLLM's demo API server body: a prompt, `stream`, and SamplingParams fields by name.

    Unknown fields are refused here (vLLM passes them to SamplingParams, which fails)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    stream: bool = False

    @model_validator(mode="before")
    @classmethod
    def check_unicode(cls, data):
        return reject_lone_surrogates(data)

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = Field(None, ge=_LONG_MIN, le=_LONG_MAX)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
