"""The pooling routes' request and response bodies: /v1/embeddings (OpenAI's, and vLLM's
chat-style one), /pooling, /classify, /score and /rerank, with vLLM's field names, defaults
and shapes (vllm/entrypoints/pooling/*/protocol.py).

vLLM's latest protocol dropped `normalize` for `use_activation` on embeddings; jllm keeps
`normalize`, the name its PoolingParams (and vLLM's up to 0.11) have.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from jllm.entrypoints.openai.protocol import (
    ChatTemplateFields,
    OpenAIBaseModel,
    OpenAIRequestModel,
    UsageInfo,
)
from jllm.pooling_params import PoolingParams

# OpenAI's `input`: one text, texts, one prompt of token ids, or several.
PromptInput = list[int] | list[list[int]] | str | list[str]
ScoreInputs = str | list[str]


class PoolingBaseRequest(OpenAIRequestModel):
    """Fields every pooling route takes (vLLM's PoolingBasicRequestMixin)."""

    model: str | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    request_id: str | None = None
    priority: int = 0


class EmbedOptions(OpenAIRequestModel):
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    normalize: bool | None = None


class ChatPromptFields(ChatTemplateFields):
    # An embedding of a conversation reads the conversation alone (vLLM's default).
    add_generation_prompt: bool = False


class EmbeddingCompletionRequest(EmbedOptions, PoolingBaseRequest):
    input: PromptInput
    add_special_tokens: bool = True

    def to_pooling_params(self) -> PoolingParams:
        return PoolingParams(dimensions=self.dimensions, normalize=self.normalize, task="embed")


class EmbeddingChatRequest(ChatPromptFields, EmbedOptions, PoolingBaseRequest):
    def to_pooling_params(self) -> PoolingParams:
        return PoolingParams(dimensions=self.dimensions, normalize=self.normalize, task="embed")


EmbeddingRequest = EmbeddingCompletionRequest | EmbeddingChatRequest


class PoolingOptions(EmbedOptions):
    # None: the model's token-level task ("token_embed" or "token_classify"), as vLLM's /pooling.
    task: str | None = None
    use_activation: bool | None = None

    def to_pooling_params(self, task: str) -> PoolingParams:
        return PoolingParams(
            dimensions=self.dimensions, normalize=self.normalize, use_activation=self.use_activation, task=task
        )


class PoolingCompletionRequest(PoolingOptions, PoolingBaseRequest):
    input: PromptInput
    add_special_tokens: bool = True


class PoolingChatRequest(ChatPromptFields, PoolingOptions, PoolingBaseRequest):
    pass


PoolingRequest = PoolingCompletionRequest | PoolingChatRequest


class ClassificationRequest(PoolingBaseRequest):
    input: PromptInput
    add_special_tokens: bool = True
    use_activation: bool | None = None

    def to_pooling_params(self) -> PoolingParams:
        return PoolingParams(use_activation=self.use_activation, task="classify")


# The names vLLM takes for a score request's two sides, in the order it tries them.
SCORE_FIELD_PAIRS = (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"), ("text_1", "text_2"))


class ScoreRequest(PoolingBaseRequest):
    text_1: ScoreInputs | None = None
    text_2: ScoreInputs | None = None
    queries: ScoreInputs | None = None
    documents: ScoreInputs | None = None
    items: ScoreInputs | None = None
    data_1: ScoreInputs | None = None
    data_2: ScoreInputs | None = None
    use_activation: bool | None = None

    @model_validator(mode="after")
    def check_pair(self):
        self.sides()
        return self

    def sides(self) -> tuple[ScoreInputs, ScoreInputs]:
        for first, second in SCORE_FIELD_PAIRS:
            if getattr(self, first) is not None and getattr(self, second) is not None:
                return getattr(self, first), getattr(self, second)
        raise ValueError(
            "A score request needs text_1 and text_2 (or queries with documents or items, or data_1 and data_2)."
        )


class RerankRequest(PoolingBaseRequest):
    query: str
    documents: list[str]
    # 0: every document.
    top_n: int = 0
    use_activation: bool | None = None


# ----- responses -------------------------------------------------------------------------


class EmbeddingResponseData(OpenAIBaseModel):
    index: int
    object: str = "embedding"
    # A base64 string with encoding_format="base64".
    embedding: list[float] | str


class EmbeddingResponse(OpenAIBaseModel):
    id: str
    object: str = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[EmbeddingResponseData]
    usage: UsageInfo


class PoolingResponseData(OpenAIBaseModel):
    index: int
    object: str = "pooling"
    data: list[list[float]] | list[float] | str


class PoolingResponse(OpenAIBaseModel):
    id: str
    object: str = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[PoolingResponseData]
    usage: UsageInfo


class ClassificationData(OpenAIBaseModel):
    index: int
    label: str | None
    probs: list[float]
    num_classes: int


class ClassificationResponse(OpenAIBaseModel):
    id: str
    object: str = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ClassificationData]
    usage: UsageInfo


class ScoreResponseData(OpenAIBaseModel):
    index: int
    object: str = "score"
    score: float


class ScoreResponse(OpenAIBaseModel):
    id: str
    object: str = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ScoreResponseData]
    usage: UsageInfo


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    document: RerankDocument
    relevance_score: float


class RerankUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(OpenAIBaseModel):
    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]
