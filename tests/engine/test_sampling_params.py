"""SamplingParams: vLLM's defaults, normalisations and exact error messages."""

import logging
import re

import pytest

from jllm.sampling_params import RequestOutputKind, SamplingParams, SamplingType


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.max_tokens == 16
    assert p.min_tokens == 0
    assert p.seed is None
    assert p.stop == [] and p.stop_token_ids == [] and p.bad_words == []
    assert p.logprobs is None and p.prompt_logprobs is None
    assert p.detokenize and p.skip_special_tokens and p.spaces_between_special_tokens
    assert not p.include_stop_str_in_output and not p.ignore_eos
    assert p.output_kind is RequestOutputKind.CUMULATIVE
    assert p.logit_bias is None and p.allowed_token_ids is None
    assert p.output_text_buffer_length == 0
    assert p.sampling_type is SamplingType.RANDOM


def test_max_tokens_none_is_allowed():
    assert SamplingParams(max_tokens=None).max_tokens is None


def test_top_k_minus_one_means_disabled_and_is_stored_as_zero():
    assert SamplingParams(top_k=-1).top_k == 0


def test_seed_minus_one_means_no_seed():
    p = SamplingParams(seed=-1)
    assert p.seed is None
    assert p.sampling_type is SamplingType.RANDOM


def test_seed_gives_random_seed_sampling_type():
    assert SamplingParams(seed=7).sampling_type is SamplingType.RANDOM_SEED


def test_stop_string_becomes_list():
    assert SamplingParams(stop="###").stop == ["###"]


def test_stop_token_ids_are_deduplicated_in_order():
    assert SamplingParams(stop_token_ids=[5, 3, 5]).stop_token_ids == [5, 3]


def test_logprobs_true_means_one():
    p = SamplingParams(logprobs=True, prompt_logprobs=True)
    assert p.logprobs == 1 and p.prompt_logprobs == 1


def test_greedy_resets_filters():
    p = SamplingParams(temperature=0.0, top_p=0.5, top_k=10, min_p=0.2)
    assert (p.top_p, p.top_k, p.min_p) == (1.0, 0, 0.0)
    assert p.sampling_type is SamplingType.GREEDY


def test_tiny_temperature_warns_and_is_clamped(caplog):
    with caplog.at_level(logging.WARNING, logger="jllm.sampling_params"):
        p = SamplingParams(temperature=0.001)
    assert p.temperature == 0.01
    assert "We have maxed it out to 0.01" in caplog.text


def test_logit_bias_string_keys_converted_and_values_clamped():
    p = SamplingParams(logit_bias={"5": 150, 7: -300.0, "9": 1.5})
    assert p.logit_bias == {5: 100.0, 7: -100.0, 9: 1.5}


def test_output_text_buffer_length_is_longest_stop_minus_one():
    assert SamplingParams(stop=["ab", "abcd"]).output_text_buffer_length == 3
    # Nothing to hide when the stop string is going to be shown anyway.
    assert SamplingParams(stop=["abcd"], include_stop_str_in_output=True).output_text_buffer_length == 0


def test_all_stop_token_ids_contains_stop_token_ids():
    assert SamplingParams(stop_token_ids=[4, 8]).all_stop_token_ids == {4, 8}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": 1.5}, "n must be an int, but is of type <class 'float'>"),
        ({"n": 0}, "n must be at least 1, got 0."),
        ({"n": 20000}, "n must be at most 16384, got 20000."),
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2], got 2.5."),
        ({"frequency_penalty": -3.0}, "frequency_penalty must be in [-2, 2], got -3.0."),
        ({"repetition_penalty": float("inf")}, "repetition_penalty must be a finite number, got inf."),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be greater than zero, got 0.0."),
        ({"temperature": float("nan")}, "temperature must be a finite number, got nan."),
        ({"temperature": -0.5}, "temperature must be non-negative, got -0.5."),
        ({"temperature": 2.5}, "temperature must be in [0, 2], got 2.5."),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0."),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5."),
        ({"top_k": -2}, "top_k must be 0 (disable), or at least 1, got -2."),
        ({"top_k": 2.5}, "top_k must be an integer, got float"),
        ({"min_p": 1.5}, "min_p must be in [0, 1], got 1.5."),
        ({"max_tokens": 0}, "max_tokens must be at least 1, got 0."),
        ({"min_tokens": -1}, "min_tokens must be greater than or equal to 0, got -1."),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens must be less than or equal to max_tokens=10, got 20."),
        ({"logprobs": -2}, "logprobs must be non-negative or -1, got -2."),
        ({"prompt_logprobs": -2}, "prompt_logprobs must be non-negative or -1, got -2."),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens must be an integer >= 1 or -1, got 0"),
        ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens must be an integer >= 1 or -1, got -2"),
        ({"stop_token_ids": [1, "2"]}, "stop_token_ids must contain only integers, got [1, '2']."),
        ({"stop": ["a", ""]}, "stop cannot contain an empty string."),
        (
            {"stop": "x", "detokenize": False},
            "stop strings are only supported when detokenize is True. Set detokenize=True to use stop.",
        ),
        ({"bad_words": ["bad", ""]}, "bad_words cannot contain an empty string. Got bad_words=['bad', '']"),
        (
            {"logit_bias": {"abc": 1.0, "3": 2.0}},
            "logit_bias contains key(s) that cannot be converted to integer token IDs: ['abc']",
        ),
        ({"temperature": 0.0, "n": 2}, "n must be 1 when using greedy sampling, got 2."),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_invalid_argument_raises_vllm_message(kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        SamplingParams(**kwargs)


def test_truncate_prompt_tokens_minus_one_is_allowed():
    assert SamplingParams(truncate_prompt_tokens=-1).truncate_prompt_tokens == -1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"logprobs": 30}, "Requested sample logprobs of 30, which is greater than max allowed: 20"),
        ({"logprobs": -1}, "Requested sample logprobs of 100, which is greater than max allowed: 20"),
        ({"prompt_logprobs": 21}, "Requested prompt logprobs of 21, which is greater than max allowed: 20"),
        (
            {"stop_token_ids": [3, 100, -1]},
            "token_id(s) [100, -1] in stop_token_ids contain out-of-vocab token ids. Vocabulary size: 100",
        ),
        (
            {"logit_bias": {100: 1.0}},
            "token_id(s) [100] in logit_bias contain out-of-vocab token ids. Vocabulary size: 100",
        ),
        ({"allowed_token_ids": []}, "allowed_token_ids is not None and empty!"),
        ({"allowed_token_ids": [1, 100]}, "allowed_token_ids contains out-of-vocab token id!"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_verify_raises_vllm_message(kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        SamplingParams(**kwargs).verify(vocab_size=100, max_logprobs=20)


def test_verify_max_logprobs_minus_one_allows_full_vocab():
    SamplingParams(logprobs=-1, prompt_logprobs=-1).verify(vocab_size=100, max_logprobs=-1)


def test_update_from_generation_config_adds_extra_eos_ids():
    p = SamplingParams(stop_token_ids=[7])
    p.update_from_generation_config({"eos_token_id": [2, 5]}, model_eos_token_id=2)
    # The primary EOS is stopped on by the engine, not through stop_token_ids.
    assert sorted(p.stop_token_ids) == [5, 7]
    assert p.all_stop_token_ids == {2, 5, 7}


def test_update_from_generation_config_with_ignore_eos_keeps_stop_token_ids():
    p = SamplingParams(ignore_eos=True)
    p.update_from_generation_config({"eos_token_id": [2, 5]}, model_eos_token_id=2)
    assert p.stop_token_ids == []
    # min_tokens still masks every EOS.
    assert p.all_stop_token_ids == {2, 5}


def test_clone_is_deep_but_shares_stateless_logits_processors():
    def processor(output_ids, logits):
        return logits

    class Stateful:
        def clone(self):
            return Stateful()

        def __call__(self, output_ids, logits):
            return logits

    stateful = Stateful()
    p = SamplingParams(stop=["x"], logits_processors=[processor, stateful])
    q = p.clone()
    assert q == SamplingParams(stop=["x"], logits_processors=q.logits_processors)
    assert q.stop is not p.stop
    assert q.logits_processors[0] is processor
    assert q.logits_processors[1] is not stateful


def test_repr_matches_vllm_layout():
    assert repr(SamplingParams()) == (
        "SamplingParams(n=1, presence_penalty=0.0, frequency_penalty=0.0, "
        "repetition_penalty=1.0, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, "
        "seed=None, stop=[], stop_token_ids=[], bad_words=[], "
        "include_stop_str_in_output=False, ignore_eos=False, max_tokens=16, "
        "min_tokens=0, logprobs=None, prompt_logprobs=None, skip_special_tokens=True, "
        "spaces_between_special_tokens=True, truncate_prompt_tokens=None, "
        "extra_args=None)"
    )


def test_from_optional_treats_none_as_default():
    p = SamplingParams.from_optional(n=None, temperature=None, max_tokens=5, top_k=None)
    assert (p.n, p.temperature, p.max_tokens, p.top_k) == (1, 1.0, 5, 0)
