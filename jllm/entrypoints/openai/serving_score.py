"""`POST /score` and `POST /rerank` (vLLM's ServingScores): the similarity of text pairs, 1:1,
1:N or N:N as LLM.score pairs them. A cross-encoder (a one-label classifier) reads each pair
in one pass; an embedding model gives the cosine similarity of the two embeddings. Rerank
scores one query against documents and answers them best first (Jina's and Cohere's body)."""

from __future__ import annotations

import time

from fastapi import Request

from jllm.entrypoints.openai.errors import OpenAIServingError
from jllm.entrypoints.openai.protocol_pooling import (
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
    ScoreInputs,
    ScoreRequest,
    ScoreResponse,
    ScoreResponseData,
)
from jllm.entrypoints.openai.serving_pooling_base import PoolingServing
from jllm.entrypoints.score_utils import cosine_scores, cross_encoder_prompt, validate_score_input
from jllm.outputs import PoolingRequestOutput, ScoringOutput
from jllm.pooling_params import PoolingParams


class ServingScores(PoolingServing):
    async def create_score(self, request: ScoreRequest, raw_request: Request | None = None) -> ScoreResponse:
        self.check_request(request)
        request_id = self.request_id("score", request, raw_request)
        created = int(time.time())
        data_1, data_2 = request.sides()
        outputs = await self._score(request_id, data_1, data_2, request, "score")
        data = [ScoreResponseData(index=i, score=_score_of(output)) for i, output in enumerate(outputs)]
        return ScoreResponse(
            id=request_id, created=created, model=self.models.model_name, data=data, usage=self.pooling_usage(outputs)
        )

    async def do_rerank(self, request: RerankRequest, raw_request: Request | None = None) -> RerankResponse:
        self.check_request(request)
        request_id = self.request_id("rerank", request, raw_request)
        documents = request.documents
        top_n = request.top_n if request.top_n > 0 else len(documents)
        outputs = await self._score(request_id, request.query, documents, request, "embedding generation")
        results = [
            RerankResult(index=i, document=RerankDocument(text=documents[i]), relevance_score=_score_of(output))
            for i, output in enumerate(outputs)
        ]
        results.sort(key=lambda result: result.relevance_score, reverse=True)
        num_prompt_tokens = self.pooling_usage(outputs).prompt_tokens
        return RerankResponse(
            id=request_id,
            model=self.models.model_name,
            usage=RerankUsage(prompt_tokens=num_prompt_tokens, total_tokens=num_prompt_tokens),
            results=results[:top_n],
        )

    async def _score(
        self, request_id: str, data_1: ScoreInputs, data_2: ScoreInputs, request, operation: str
    ) -> list[PoolingRequestOutput]:
        """One output per pair, its `outputs.data` the pair's score."""
        try:
            data_1, data_2 = validate_score_input(data_1, data_2)
        except ValueError as e:
            raise OpenAIServingError(str(e)) from e
        truncate = request.truncate_prompt_tokens
        if not self.model_config.is_cross_encoder:
            prompts = await self.text_prompts(data_1 + data_2, truncate, True, operation)
            embeds = await self.encode(request_id, prompts, PoolingParams(task="embed"), request.user)
            pad = getattr(self.tokenizer, "pad_token_id", None)
            return cosine_scores(embeds[: len(data_1)], embeds[len(data_1) :], pad)
        tokenizer = self.require_tokenizer("Scoring with a cross-encoder")
        keep = self.max_model_len if truncate == -1 else truncate
        prompts = await self.run_in_tokenizer_thread(
            lambda: [cross_encoder_prompt(tokenizer, t1, t2, keep) for t1, t2 in zip(data_1, data_2)]
        )
        for prompt in prompts:
            self.validate_pooling_length(len(prompt["prompt_token_ids"]), operation)
        params = PoolingParams(task="score", use_activation=request.use_activation)
        return await self.encode(request_id, prompts, params, request.user)


def _score_of(output: PoolingRequestOutput) -> float:
    return ScoringOutput.from_base(output.outputs).score
