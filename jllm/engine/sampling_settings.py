"""A sample's SamplingParams resolved into the plain SamplingSettings the worker gets."""

from __future__ import annotations

from jllm.core.scheduler_output import SamplingSettings
from jllm.sampling_params import SamplingParams


def sampling_settings(
    params: SamplingParams, seed: int, bad_words: list[list[int]] = (), with_prompt_logprobs: bool = True
) -> SamplingSettings:
    """`params` once verified and updated from the generation config (its stop ids then
    include EOS); `bad_words` as token ids (prompts.bad_words_token_ids). Prompt logprobs
    are the same for every sample of a request, so only its first asks for them."""
    return SamplingSettings(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty,
        seed=seed,
        logprobs=params.logprobs,
        prompt_logprobs=params.prompt_logprobs if with_prompt_logprobs else None,
        logit_bias=tuple(sorted((params.logit_bias or {}).items())),
        # Unique ids: a list of repeats must not outgrow the largest list bucket.
        allowed_token_ids=tuple(sorted(set(params.allowed_token_ids or ()))),
        bad_words=tuple(tuple(word) for word in bad_words),
        min_tokens=params.min_tokens,
        stop_token_ids=tuple(sorted(params.all_stop_token_ids)) if params.min_tokens else (),
        logits_processors=tuple(params.logits_processors or ()),
    )
