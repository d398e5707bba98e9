"""What `LLM.generate` and the engine hand back: vLLM's RequestOutput and its parts.

Names, fields and reprs follow `vllm/outputs.py` and `vllm/logprobs.py`, so code written
against vLLM's outputs reads jllm's unchanged.
"""

from __future__ import annotations

from collections.abc import MutableSequence, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Logprob:
    """The log probability of one token, its 1-based rank in the vocabulary (1 = most
    likely) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per generated token: the top-k tokens plus the sampled one (up to k+1 entries).
SampleLogprobs = list[dict[int, Logprob]]
# One entry per prompt token; the first is always None, as nothing predicts it.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass(repr=False)
class CompletionOutput:
    """One of a request's n samples.

    finish_reason is "stop", "length", "abort" or "error" once finished; stop_reason is
    the stop string or stop token id that ended it, and None when EOS or max_tokens did.
    """

    index: int
    text: str
    token_ids: Sequence[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return (
            f"CompletionOutput(index={self.index}, "
            f"text={self.text!r}, "
            f"token_ids={self.token_ids}, "
            f"cumulative_logprob={self.cumulative_logprob}, "
            f"logprobs={self.logprobs}, "
            f"finish_reason={self.finish_reason}, "
            f"stop_reason={self.stop_reason})"
        )


@dataclass
class RequestMetrics:
    """Wall-clock times (time.time()) in a request's life; None until reached."""

    arrival_time: float | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


class RequestOutput:
    """The output of one request: its prompt and its n completions so far.

    `error` (jllm's, not vLLM's) is the exception that ended a request whose own
    processing failed; its completions then finish with "error". Callers re-raise it
    (LLM.generate) or answer with it (the server); other requests are unaffected.
    """

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int] | None,
        prompt_logprobs: PromptLogprobs | None,
        outputs: list[CompletionOutput],
        finished: bool,
        metrics: RequestMetrics | None = None,
        num_cached_tokens: int | None = None,
        error: BaseException | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.prompt_logprobs = prompt_logprobs
        self.outputs = outputs
        self.finished = finished
        self.metrics = metrics
        self.num_cached_tokens = num_cached_tokens
        self.error = error

    def add(self, next_output: RequestOutput, aggregate: bool) -> None:
        """Merge a later output of the same request into this one.

        With `aggregate`, a completion's text, token ids and logprobs are appended to
        (DELTA outputs accumulated into a whole); otherwise the newer completion replaces
        the older. Completions not seen before are appended.
        """
        self.finished |= next_output.finished
        self.error = self.error or next_output.error
        for next_completion in next_output.outputs:
            for i, completion in enumerate(self.outputs):
                if completion.index != next_completion.index:
                    continue
                if aggregate:
                    completion.text += next_completion.text
                    if not isinstance(completion.token_ids, MutableSequence):
                        completion.token_ids = list(completion.token_ids)
                    completion.token_ids.extend(next_completion.token_ids)
                    if next_completion.logprobs:
                        assert completion.logprobs is not None
                        completion.logprobs.extend(next_completion.logprobs)
                    # These describe the whole sequence, so the latest value wins.
                    completion.cumulative_logprob = next_completion.cumulative_logprob
                    completion.finish_reason = next_completion.finish_reason
                    completion.stop_reason = next_completion.stop_reason
                else:
                    self.outputs[i] = next_completion
                break
            else:
                self.outputs.append(next_completion)

    def __repr__(self) -> str:
        return (
            f"RequestOutput(request_id={self.request_id}, "
            f"prompt={self.prompt!r}, "
            f"prompt_token_ids={self.prompt_token_ids}, "
            f"prompt_logprobs={self.prompt_logprobs}, "
            f"outputs={self.outputs}, "
            f"finished={self.finished}, "
            f"metrics={self.metrics}, "
            f"num_cached_tokens={self.num_cached_tokens})"
        )


@dataclass
class PoolingOutput:
    """A pooling request's output: `data` is a float32 numpy array ([dims] for a sequence,
    [tokens, dims] per token); vLLM holds a torch tensor here."""

    data: Any

    def __eq__(self, other) -> bool:
        return isinstance(other, self.__class__) and bool(np.array_equal(self.data, other.data))


class PoolingRequestOutput:
    """The output of one pooling request (vLLM's PoolingRequestOutput)."""

    def __init__(
        self,
        request_id: str,
        outputs,
        prompt_token_ids: list[int],
        finished: bool,
        num_cached_tokens: int = 0,
        error: BaseException | None = None,
    ) -> None:
        self.request_id = request_id
        self.outputs = outputs
        self.prompt_token_ids = prompt_token_ids
        self.finished = finished
        self.num_cached_tokens = num_cached_tokens
        self.error = error

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(request_id={self.request_id!r}, outputs={self.outputs!r}, "
            f"prompt_token_ids={self.prompt_token_ids}, num_cached_tokens={self.num_cached_tokens}, "
            f"finished={self.finished})"
        )

    @classmethod
    def from_base(cls, request_output: PoolingRequestOutput):
        return cls(
            request_output.request_id,
            cls._output_class().from_base(request_output.outputs),
            request_output.prompt_token_ids,
            request_output.finished,
            request_output.num_cached_tokens,
        )

    @staticmethod
    def _output_class():
        raise NotImplementedError


@dataclass
class EmbeddingOutput:
    """One embedding vector."""

    embedding: list[float]

    @staticmethod
    def from_base(pooling_output: PoolingOutput) -> EmbeddingOutput:
        data = np.asarray(pooling_output.data)
        if data.ndim != 1:
            raise ValueError("pooled_data should be a 1-D embedding vector")
        return EmbeddingOutput(data.tolist())

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


class EmbeddingRequestOutput(PoolingRequestOutput):
    @staticmethod
    def _output_class():
        return EmbeddingOutput


@dataclass
class ClassificationOutput:
    """One sequence's class probabilities."""

    probs: list[float]

    @staticmethod
    def from_base(pooling_output: PoolingOutput) -> ClassificationOutput:
        data = np.asarray(pooling_output.data)
        if data.ndim != 1:
            raise ValueError("pooled_data should be a 1-D probability vector")
        return ClassificationOutput(data.tolist())

    @property
    def num_classes(self) -> int:
        return len(self.probs)


class ClassificationRequestOutput(PoolingRequestOutput):
    @staticmethod
    def _output_class():
        return ClassificationOutput


@dataclass
class ScoringOutput:
    """The similarity score of one pair."""

    score: float

    @staticmethod
    def from_base(pooling_output: PoolingOutput) -> ScoringOutput:
        data = np.asarray(pooling_output.data)
        if data.size != 1:
            raise ValueError("pooled_data should be a scalar score")
        return ScoringOutput(float(data.reshape(-1)[0]))


class ScoringRequestOutput(PoolingRequestOutput):
    @staticmethod
    def _output_class():
        return ScoringOutput
