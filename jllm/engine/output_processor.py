"""Turns sampled tokens into RequestOutputs: stop checks, text, logprobs, metrics.

One `RequestState` per user request holds the detokenizer and logprobs of each of its
n samples; the engine feeds it the runner's rows and asks it for outputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from jllm.engine.detokenizer import IncrementalDetokenizer, convert_ids_list_to_tokens
from jllm.engine.request import Request, RequestStatus
from jllm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from jllm.sampling_params import RequestOutputKind, SamplingParams


def past_min_tokens(request: Request) -> bool:
    """min_tokens, the one rule on the engine's side: the first min_tokens output tokens
    cannot end the request with a stop token, EOS or a stop string. (The worker bans stop
    tokens until then: SamplingSettings.min_tokens.)"""
    return request.num_output_tokens > request.sampling_params.min_tokens


def check_stop(request: Request, max_model_len: int) -> bool:
    """Sets a terminal status when the newest token ends the request.

    Stop tokens are checked before the length cap, so EOS sampled as the last allowed
    token reports "stop" (the reason the model gave), not "length".
    """
    params = request.sampling_params
    output_ids = request.output_token_ids
    last, num_output = output_ids[-1], len(output_ids)
    if past_min_tokens(request):
        if not params.ignore_eos and last == request.eos_token_id:
            request.status = RequestStatus.FINISHED_STOPPED
            return True
        if last in params.stop_token_ids:
            request.status = RequestStatus.FINISHED_STOPPED
            request.stop_reason = last
            return True
    if num_output >= request.max_tokens or len(request.prompt_token_ids) + num_output >= max_model_len:
        request.status = RequestStatus.FINISHED_LENGTH_CAPPED
        return True
    return False


@dataclass
class SampleState:
    request: Request
    detokenizer: IncrementalDetokenizer
    logprobs: list[dict[int, Logprob]] | None
    cumulative_logprob: float | None
    sent_tokens: int = 0
    sent_logprobs: int = 0


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[SampleState]
    tokenizer: object | None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    arrival_time: float = field(default_factory=time.time)
    # What failed this request's own processing; it then ends with "error".
    error: BaseException | None = None
    # params.output_kind, resolved once: make_output runs every step.
    final_only: bool = field(init=False)
    delta: bool = field(init=False)

    def __post_init__(self) -> None:
        self.final_only = self.params.output_kind == RequestOutputKind.FINAL_ONLY
        self.delta = self.params.output_kind == RequestOutputKind.DELTA

    @property
    def finished(self) -> bool:
        for sample in self.samples:
            if not sample.request.is_finished:
                return False
        return True

    def add_sampled_logprobs(
        self, sample: SampleState, token_id: int, token_lp: float, rank: int, top_ids: np.ndarray, top_lps: np.ndarray
    ) -> None:
        k = self.params.logprobs
        if k == -1:
            k = len(top_ids)
        sample.logprobs.append(self._position_logprobs(token_id, token_lp, rank, top_ids[:k], top_lps[:k]))
        sample.cumulative_logprob += float(token_lp)

    def _position_logprobs(self, token_id: int, token_lp, rank, top_ids, top_lps) -> dict[int, Logprob]:
        """vLLM's dict for one position: the chosen (or prompt) token first, then the
        top-k by rank; k + 1 entries, or k when the chosen token is among them."""
        ids = [int(t) for t in top_ids]
        decoded = self._decode([token_id] + ids)
        entries = {token_id: Logprob(float(token_lp), int(rank), decoded[0])}
        for rank_i, (tid, lp) in enumerate(zip(ids, top_lps), start=1):
            entries.setdefault(tid, Logprob(float(lp), rank_i, decoded[rank_i]))
        return entries

    def add_prompt_logprobs(self, positions: np.ndarray, target_lps, target_ranks, top_ids, top_lps) -> None:
        """positions: prompt positions (>= 1) whose logprob these rows give."""
        k = self.params.prompt_logprobs
        if k == -1:
            k = top_ids.shape[1]
        for row, pos in enumerate(positions):
            self.prompt_logprobs[pos] = self._position_logprobs(
                self.prompt_token_ids[pos], target_lps[row], target_ranks[row], top_ids[row, :k], top_lps[row, :k]
            )

    def _decode(self, ids: list[int]) -> list[str | None]:
        if self.tokenizer is None or not self.params.detokenize:
            return [None] * len(ids)
        return convert_ids_list_to_tokens(self.tokenizer, ids)

    # make_output runs for every running request every step (but FINAL_ONLY), so the
    # records below are built with positional arguments, in their fields' order.

    def make_output(self) -> RequestOutput | None:
        finished = self.finished
        if self.final_only and not finished:
            return None
        outputs = [self._completion(sample, self.delta) for sample in self.samples]
        num_cached_tokens = max(self.samples[0].request.num_cached_tokens, 0)
        return RequestOutput(
            self.request_id,
            self.prompt,
            self.prompt_token_ids,
            self.prompt_logprobs,
            outputs,
            finished,
            self._metrics(finished),
            num_cached_tokens,
        )

    def make_error_output(self) -> RequestOutput:
        """The final output of a failed request: nothing of its processing is trusted
        (the detokenizer may be what failed), so its completions are empty."""
        outputs = [CompletionOutput(s.request.index, "", [], None, None, "error") for s in self.samples]
        return RequestOutput(
            self.request_id,
            self.prompt,
            self.prompt_token_ids,
            None,
            outputs,
            True,
            self._metrics(True),
            max(self.samples[0].request.num_cached_tokens, 0),
            self.error,
        )

    @staticmethod
    def _completion(sample: SampleState, delta: bool) -> CompletionOutput:
        req = sample.request
        done = req.is_finished
        text = sample.detokenizer.get_next_output_text(done, delta)
        logprobs = sample.logprobs
        if delta:
            token_ids = req.output_token_ids[sample.sent_tokens :]
            if logprobs is not None:
                logprobs = logprobs[sample.sent_logprobs :]
        else:
            token_ids = list(req.output_token_ids)
            if logprobs is not None:
                logprobs = list(logprobs)
        sample.sent_tokens = len(req.output_token_ids)
        sample.sent_logprobs = len(sample.logprobs) if sample.logprobs is not None else 0
        if done:
            return CompletionOutput(
                req.index,
                text,
                token_ids,
                sample.cumulative_logprob,
                logprobs,
                req.get_finish_reason(),
                req.stop_reason,
            )
        return CompletionOutput(req.index, text, token_ids, sample.cumulative_logprob, logprobs)

    def _metrics(self, finished: bool) -> RequestMetrics:
        first = self.samples[0].request
        if len(self.samples) == 1:
            return RequestMetrics(
                self.arrival_time,
                first.first_scheduled_time,
                first.first_token_time or None,
                first.last_token_time or None,
                (first.finished_time or 0.0) if finished else None,
            )
        requests = [s.request for s in self.samples]
        return RequestMetrics(
            self.arrival_time,
            first.first_scheduled_time,
            min((r.first_token_time for r in requests if r.first_token_time), default=None),
            max((r.last_token_time for r in requests if r.last_token_time), default=None),
            max(r.finished_time or 0.0 for r in requests) if finished else None,
        )
