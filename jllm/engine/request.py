"""The engine's host-side record of one sequence: tokens so far, progress, status.

A request with `n > 1` becomes n `Request`s (one per sample) that share a
`parent_id`; the scheduler and block manager only ever see `Request`s.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from jllm.core.scheduler_output import SamplingSettings


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH_CAPPED = 4
    FINISHED_ABORTED = 5
    # Its own processing raised (a logits processor, its detokenization, ...); the
    # engine goes on with the others.
    FINISHED_ERROR = 6

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


# vLLM's finish_reason strings, keyed by the terminal status.
FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: Any  # jllm.sampling_params.SamplingParams
    arrival_time: float = field(default_factory=time.time)
    # Which of the parent's n samples this is, and the user-facing request id.
    index: int = 0
    parent_id: str | None = None
    # Salt mixed into the first block hash so that requests with different salts
    # never share prefix-cache entries (vLLM's cache_salt).
    cache_salt: str | None = None
    eos_token_id: int | None = None
    # max_tokens resolved against max_model_len (None in SamplingParams means "fill
    # the context").
    max_tokens: int = 16
    # The 64-bit seed of this sample's random stream (the request's seed, or one
    # drawn from the engine's generator), folded with the output position per token.
    seed: int = 0
    # What the worker gets of sampling_params (and the seed, bad words), resolved once.
    sampling_settings: SamplingSettings | None = None
    # A pooling request: its task (it runs whole in one step and is then done), and its
    # token types where a cross-encoder scores a pair.
    pooling_task: str | None = None
    token_type_ids: tuple[int, ...] | None = None

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose K/V are in the cache (prefix-cache hits included).
    num_computed_tokens: int = 0
    # Of the prompt, how many tokens came from the prefix cache at first schedule.
    num_cached_tokens: int = -1
    # Physical page ids, in order; owned by the BlockManager.
    block_ids: list[int] = field(default_factory=list)
    # Chained hashes of the full blocks of all_token_ids, computed lazily.
    block_hashes: list[bytes] = field(default_factory=list)
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    # Timestamps for RequestMetrics.
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        # RequestStatus.is_finished, one property call fewer: asked of every request every step.
        return self.status >= RequestStatus.FINISHED_STOPPED

    def append_output_token_id(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)

    def get_finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)
