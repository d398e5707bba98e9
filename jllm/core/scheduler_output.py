"""The one message a step sends from the scheduler to the worker (vLLM V1's SchedulerOutput).

The worker never sees an engine `Request` or a `SamplingParams`: a request reaches it
once as `NewRequestData` (its prompt, its sampling settings resolved to plain values,
its pages), and afterwards only as a delta in `CachedRequestData` (pages added, how far
the cache has got). The tokens a request samples are not in the message: the worker
records its own samples, so the message for step t+1 can be built before step t's
tokens reach the host (vLLM's async scheduling).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SamplingSettings:
    """A sample's sampling settings as the worker uses them, fixed for its life."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    # The 64-bit seed of this sample's random stream (folded with the output position).
    seed: int
    # Logprobs per sampled token / per prompt token: None for none, -1 for the vocabulary.
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: tuple[int, ...] = ()
    # Token sequences that may not be completed: the last token is banned after the rest.
    bad_words: tuple[tuple[int, ...], ...] = ()
    # Until this many tokens are out, `stop_token_ids` (EOS included) may not be sampled.
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    # Host callables on the logits (vLLM V0's logits_processors): the runner's slow path.
    logits_processors: tuple[Callable, ...] = ()

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


@dataclass(frozen=True, slots=True)
class NewRequestData:
    """A request the worker has not seen: sent once, at its first schedule."""

    req_id: str
    prompt_token_ids: list[int]
    sampling: SamplingSettings
    block_ids: list[int]
    # Tokens already in the KV cache (prefix-cache hits): where this step starts.
    num_computed_tokens: int
    # A pooling request's task ("embed", "classify", "token_embed", ...): it runs whole in
    # one step and its output is pooled hidden states instead of a sampled token.
    pooling_task: str | None = None
    # BERT's token types (segments) of the prompt, for cross-encoders scoring a pair.
    token_type_ids: tuple[int, ...] | None = None


@dataclass(slots=True)
class CachedRequestData:
    """The requests the worker knows, as parallel lists (one entry each)."""

    req_ids: list[str] = field(default_factory=list)
    # Back after a preemption: its pages were dropped, and `new_block_ids` are all of them.
    resumed_from_preemption: list[bool] = field(default_factory=list)
    # Pages allocated since the worker last heard of the request, in order.
    new_block_ids: list[list[int]] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)


@dataclass(slots=True)
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData] = field(default_factory=list)
    scheduled_cached_reqs: CachedRequestData = field(default_factory=CachedRequestData)
    # Tokens each scheduled request feeds the model this step, by request id.
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    total_num_scheduled_tokens: int = 0
    # Lost their pages this step; they come back as resumed (or finish).
    preempted_req_ids: set[str] = field(default_factory=set)
    # Finished (or aborted) since the previous step: the worker drops their state.
    finished_req_ids: set[str] = field(default_factory=set)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0
