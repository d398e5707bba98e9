"""Sampling parameters for one request, with vLLM's fields, defaults and error messages.

`SamplingParams` is host-side configuration only: the sampler turns a batch of them into
device arrays. Checks that need nothing but the parameters run in `__post_init__`; checks
that need the model (vocabulary size, `max_logprobs`) run in `verify`.
"""

from __future__ import annotations

import copy
import enum
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable

logger = logging.getLogger(__name__)

# Below this temperature sampling is greedy argmax.
_SAMPLING_EPS = 1e-5
# Temperatures in (0, _MAX_TEMP) overflow logits / temperature in low precision, so they
# are raised to _MAX_TEMP (vLLM's name for it).
_MAX_TEMP = 1e-2
# vLLM's default VLLM_MAX_N_SEQUENCES; jllm keeps it fixed rather than read the environment.
MAX_N_SEQUENCES = 16384

# A per-request logits processor on the host: `(output_ids, logits) -> logits` or
# `(prompt_ids, output_ids, logits) -> logits`. This is the slow path: a request that has
# one makes its row leave the jitted sampler and run in Python every step.
LogitsProcessor = Callable[..., Any]


class SamplingType(enum.IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


class RequestOutputKind(enum.Enum):
    # Every RequestOutput carries the whole output so far.
    CUMULATIVE = 0
    # Every RequestOutput carries only what is new since the last one.
    DELTA = 1
    # Only the final RequestOutput is returned.
    FINAL_ONLY = 2


@dataclass(repr=False)
class SamplingParams:
    """Sampling parameters for text generation, following the OpenAI completions API.

    Field meanings and defaults are vLLM's; see its documentation. `top_k=-1` is accepted
    as "disabled" and stored as 0; `seed=-1` is stored as None; `logprobs=True` as 1.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logits_processors: list[LogitsProcessor] | None = None
    # -1 keeps the last max_model_len tokens; k >= 1 keeps the last k.
    truncate_prompt_tokens: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    extra_args: dict[str, Any] | None = None

    # Characters of output text held back while streaming, so that a stop string that is
    # only partly generated never reaches the user.
    output_text_buffer_length: int = field(default=0, init=False)
    # stop_token_ids plus every EOS id; the engine masks these until min_tokens is reached.
    _all_stop_token_ids: set[int] = field(default_factory=set, init=False)

    def __post_init__(self) -> None:
        if 0 < self.temperature < _MAX_TEMP:
            logger.warning(
                "temperature %s is less than %s, which may cause numerical "
                "errors nan or inf in tensors. We have maxed it out to %s.",
                self.temperature,
                _MAX_TEMP,
                _MAX_TEMP,
            )
            self.temperature = _MAX_TEMP
        if self.seed == -1:
            self.seed = None
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        # dict.fromkeys drops duplicates but keeps the caller's order.
        self.stop_token_ids = [] if self.stop_token_ids is None else list(dict.fromkeys(self.stop_token_ids))
        self.bad_words = [] if self.bad_words is None else list(dict.fromkeys(self.bad_words))
        if self.logprobs is True:
            self.logprobs = 1
        if self.prompt_logprobs is True:
            self.prompt_logprobs = 1
        if self.logit_bias is not None:
            self.logit_bias = _convert_logit_bias(self.logit_bias)
        if self.stop and not self.include_stop_str_in_output:
            self.output_text_buffer_length = max(len(s) for s in self.stop) - 1

        self._verify_args()

        if self.top_k == -1:
            self.top_k = 0
        if self.temperature < _SAMPLING_EPS:
            # Greedy ignores the filters; resetting them keeps greedy rows out of the
            # top-k/top-p/min-p kernels.
            self.top_p = 1.0
            self.top_k = 0
            self.min_p = 0.0
            self._verify_greedy_sampling()

        self._all_stop_token_ids.update(self.stop_token_ids)

    @classmethod
    def from_optional(cls, **kwargs: Any) -> SamplingParams:
        """Build from request fields where None means "use the default" (the server's path)."""
        return cls(**{k: v for k, v in kwargs.items() if v is not None})

    def _verify_args(self) -> None:
        if not isinstance(self.n, int):
            raise ValueError(f"n must be an int, but is of type {type(self.n)}")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}.")
        if self.n > MAX_N_SEQUENCES:
            raise ValueError(f"n must be at most {MAX_N_SEQUENCES}, got {self.n}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not math.isfinite(self.repetition_penalty):
            raise ValueError(f"repetition_penalty must be a finite number, got {self.repetition_penalty}.")
        if self.repetition_penalty <= 0.0:
            raise ValueError(f"repetition_penalty must be greater than zero, got {self.repetition_penalty}.")
        if not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a finite number, got {self.temperature}.")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if self.temperature > 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < -1:
            raise ValueError(f"top_k must be 0 (disable), or at least 1, got {self.top_k}.")
        if not isinstance(self.top_k, int):
            raise ValueError(f"top_k must be an integer, got {type(self.top_k).__name__}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}."
            )
        if self.logprobs is not None and self.logprobs != -1 and self.logprobs < 0:
            raise ValueError(f"logprobs must be non-negative or -1, got {self.logprobs}.")
        if self.prompt_logprobs is not None and self.prompt_logprobs != -1 and self.prompt_logprobs < 0:
            raise ValueError(f"prompt_logprobs must be non-negative or -1, got {self.prompt_logprobs}.")
        if self.truncate_prompt_tokens is not None and (
            self.truncate_prompt_tokens == 0 or self.truncate_prompt_tokens < -1
        ):
            raise ValueError(f"truncate_prompt_tokens must be an integer >= 1 or -1, got {self.truncate_prompt_tokens}")
        if not all(isinstance(t, int) for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must contain only integers, got {self.stop_token_ids}.")
        if any(not s for s in self.stop):
            raise ValueError("stop cannot contain an empty string.")
        if self.stop and not self.detokenize:
            raise ValueError(
                "stop strings are only supported when detokenize is True. Set detokenize=True to use stop."
            )
        if any(not w for w in self.bad_words):
            raise ValueError(f"bad_words cannot contain an empty string. Got bad_words={self.bad_words}")

    def _verify_greedy_sampling(self) -> None:
        if self.n > 1:
            raise ValueError(f"n must be 1 when using greedy sampling, got {self.n}.")

    def verify(self, vocab_size: int, max_logprobs: int) -> None:
        """Engine-side checks against the model: token ids in vocabulary, logprob caps.

        `max_logprobs=-1` means no cap (up to the whole vocabulary); a request's
        `logprobs=-1` counts as `vocab_size`.
        """
        if max_logprobs == -1:
            max_logprobs = vocab_size
        if num_logprobs := self.logprobs:
            if num_logprobs == -1:
                num_logprobs = vocab_size
            if num_logprobs > max_logprobs:
                raise ValueError(
                    f"Requested sample logprobs of {num_logprobs}, which is greater than max allowed: {max_logprobs}"
                )
        if num_prompt_logprobs := self.prompt_logprobs:
            if num_prompt_logprobs == -1:
                num_prompt_logprobs = vocab_size
            if num_prompt_logprobs > max_logprobs:
                raise ValueError(
                    f"Requested prompt logprobs of {num_prompt_logprobs}, "
                    f"which is greater than max allowed: {max_logprobs}"
                )
        for name, token_ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", self.logit_bias or ())):
            invalid = [t for t in token_ids if not 0 <= t < vocab_size]
            if invalid:
                raise ValueError(
                    f"token_id(s) {invalid} in {name} contain out-of-vocab token ids. Vocabulary size: {vocab_size}"
                )
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids is not None and empty!")
            if not all(0 <= t < vocab_size for t in self.allowed_token_ids):
                raise ValueError("allowed_token_ids contains out-of-vocab token id!")

    def update_from_generation_config(
        self, generation_config: dict[str, Any], model_eos_token_id: int | None = None
    ) -> None:
        """Merge the model's extra EOS ids (generation_config.json) into the stop set.

        The primary EOS is handled by the engine itself, so only the other ids become
        stop_token_ids, and not at all with ignore_eos; every EOS still joins
        all_stop_token_ids so min_tokens can mask it.
        """
        if model_eos_token_id is not None:
            self._all_stop_token_ids.add(model_eos_token_id)
        eos_ids = generation_config.get("eos_token_id")
        if eos_ids is None:
            return
        eos_ids = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids)
        eos_ids.discard(model_eos_token_id)
        if eos_ids:
            self._all_stop_token_ids.update(eos_ids)
            if not self.ignore_eos:
                eos_ids.update(self.stop_token_ids)
                self.stop_token_ids = list(eos_ids)

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < _SAMPLING_EPS:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    @property
    def all_stop_token_ids(self) -> set[int]:
        return self._all_stop_token_ids

    def clone(self) -> SamplingParams:
        """Deep copy, except logits processors without a `clone()` method are shared.

        A processor may hold large state that is costly to copy; one that keeps
        per-sequence state must provide `clone()` so each of the n samples gets its own.
        """
        memo = {id(lp): lp.clone() if hasattr(lp, "clone") else lp for lp in self.logits_processors or ()}
        return copy.deepcopy(self, memo=memo)

    def __repr__(self) -> str:
        return (
            f"SamplingParams(n={self.n}, "
            f"presence_penalty={self.presence_penalty}, "
            f"frequency_penalty={self.frequency_penalty}, "
            f"repetition_penalty={self.repetition_penalty}, "
            f"temperature={self.temperature}, "
            f"top_p={self.top_p}, "
            f"top_k={self.top_k}, "
            f"min_p={self.min_p}, "
            f"seed={self.seed}, "
            f"stop={self.stop}, "
            f"stop_token_ids={self.stop_token_ids}, "
            f"bad_words={self.bad_words}, "
            f"include_stop_str_in_output={self.include_stop_str_in_output}, "
            f"ignore_eos={self.ignore_eos}, "
            f"max_tokens={self.max_tokens}, "
            f"min_tokens={self.min_tokens}, "
            f"logprobs={self.logprobs}, "
            f"prompt_logprobs={self.prompt_logprobs}, "
            f"skip_special_tokens={self.skip_special_tokens}, "
            f"spaces_between_special_tokens={self.spaces_between_special_tokens}, "
            f"truncate_prompt_tokens={self.truncate_prompt_tokens}, "
            f"extra_args={self.extra_args})"
        )


def _convert_logit_bias(logit_bias: dict[Any, float]) -> dict[int, float]:
    """Token-id keys to int (JSON sends them as strings), biases clamped to [-100, 100]
    as the OpenAI API specifies."""
    converted: dict[int, float] = {}
    invalid_keys = []
    for token, bias in logit_bias.items():
        try:
            token_id = int(token)
        except (ValueError, TypeError):
            invalid_keys.append(token)
            continue
        converted[token_id] = min(100.0, max(-100.0, bias))
    if invalid_keys:
        raise ValueError(f"logit_bias contains key(s) that cannot be converted to integer token IDs: {invalid_keys!r}")
    return converted
