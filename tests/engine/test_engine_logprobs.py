"""Logprobs in the outputs: their shape and their consistency (vLLM's
tests/samplers/test_logprobs.py and test_ranks.py, engine side).

Sample logprobs: one dict per generated token with the top-k tokens plus the sampled
one (k or k + 1 entries), 1-based vocabulary ranks, of the raw model distribution;
cumulative_logprob is their sum. Prompt logprobs: one entry per prompt token, the
first None.
"""

import math

import pytest

from jllm import LLM, SamplingParams
from tiny_model import ENGINE_ARGS, VOCAB_SIZE

PROMPT = "The capital of France is"
MAX_LOGPROBS = 20  # EngineArgs' default


@pytest.fixture(scope="module")
def llm(tiny_llama_path):
    return LLM(model=tiny_llama_path, **ENGINE_ARGS)


def run(llm: LLM, prompt, params: SamplingParams):
    [output] = llm.generate([prompt], params, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    llm.llm_engine.scheduler.block_manager.check_no_leaks()
    return output


@pytest.fixture(scope="module")
def greedy_output(llm):
    return run(llm, PROMPT, SamplingParams(temperature=0.0, max_tokens=16, logprobs=5))


def assert_top_k_plus_token(entries: dict, k: int, token_id: int) -> None:
    """`entries` holds the top k by rank 1..k, in order, plus `token_id` if outside them."""
    assert token_id in entries
    top = [tid for tid, lp in entries.items() if lp.rank <= k]
    assert [entries[t].rank for t in top] == list(range(1, k + 1))
    values = [entries[t].logprob for t in top]
    assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
    if entries[token_id].rank <= k:
        assert len(entries) == k
    else:
        assert len(entries) == k + 1
        assert entries[token_id].logprob <= values[-1]
    assert all(isinstance(lp.decoded_token, str) for lp in entries.values())


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_each_position_has_k_or_k_plus_1_entries_including_the_sampled_token(llm, temperature):
    out = run(llm, PROMPT, SamplingParams(temperature=temperature, seed=0, max_tokens=16, logprobs=3)).outputs[0]
    assert len(out.logprobs) == len(out.token_ids) == 16
    for token_id, entries in zip(out.token_ids, out.logprobs):
        assert_top_k_plus_token(entries, 3, token_id)
    if temperature:  # the random model's flat distribution puts samples outside the top 3
        assert any(len(entries) == 4 for entries in out.logprobs)


def test_greedy_tokens_have_rank_1(greedy_output):
    out = greedy_output.outputs[0]
    assert [entries[t].rank for t, entries in zip(out.token_ids, out.logprobs)] == [1] * 16


def test_cumulative_logprob_is_the_sum_of_the_sampled_tokens_logprobs(llm):
    out = run(llm, PROMPT, SamplingParams(temperature=1.0, seed=1, max_tokens=16, logprobs=2)).outputs[0]
    sampled = [entries[t].logprob for t, entries in zip(out.token_ids, out.logprobs)]
    assert out.cumulative_logprob == pytest.approx(math.fsum(sampled), abs=1e-4)
    assert out.cumulative_logprob < 0


def test_logprobs_0_gives_only_the_sampled_token(llm):
    out = run(llm, PROMPT, SamplingParams(temperature=1.0, seed=2, max_tokens=8, logprobs=0)).outputs[0]
    assert [list(entries) for entries in out.logprobs] == [[t] for t in out.token_ids]


def test_logprobs_are_of_the_raw_distribution_not_the_tempered_one(llm, greedy_output):
    tempered = run(llm, PROMPT, SamplingParams(temperature=2.0, seed=3, max_tokens=1, logprobs=5))
    first_greedy = greedy_output.outputs[0].logprobs[0]
    first_tempered = tempered.outputs[0].logprobs[0]
    top = {t: lp for t, lp in first_greedy.items() if lp.rank <= 5}
    for token_id, lp in top.items():
        assert first_tempered[token_id].rank == lp.rank
        assert first_tempered[token_id].logprob == pytest.approx(lp.logprob, abs=1e-5)


@pytest.fixture(scope="module")
def long_prompt(greedy_output) -> list[int]:
    """The prompt and 15 of its greedy tokens: 20 tokens, more than one KV page."""
    return list(greedy_output.prompt_token_ids) + list(greedy_output.outputs[0].token_ids[:15])


def test_prompt_logprobs_have_one_entry_per_prompt_token_and_the_first_is_none(llm, long_prompt):
    out = run(llm, long_prompt, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=3))
    assert len(out.prompt_logprobs) == len(long_prompt)
    assert out.prompt_logprobs[0] is None
    for token_id, entries in zip(long_prompt[1:], out.prompt_logprobs[1:]):
        assert_top_k_plus_token(entries, 3, token_id)


def test_prompt_logprobs_agree_with_the_sample_logprobs_of_the_same_tokens(llm, greedy_output, long_prompt):
    """The prefill's logprob of each continuation token equals the logprob decoding gave it."""
    out = run(llm, long_prompt, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1))
    num_prompt = len(greedy_output.prompt_token_ids)
    for j, token_id in enumerate(greedy_output.outputs[0].token_ids[:15]):
        from_prompt = out.prompt_logprobs[num_prompt + j][token_id]
        from_sample = greedy_output.outputs[0].logprobs[j][token_id]
        assert from_prompt.rank == from_sample.rank == 1
        assert from_prompt.logprob == pytest.approx(from_sample.logprob, abs=1e-4)


def test_prompt_logprobs_are_computed_for_a_prefix_already_in_the_cache(llm, long_prompt):
    warm = run(llm, long_prompt, SamplingParams(temperature=0.0, max_tokens=1))
    again = run(llm, long_prompt, SamplingParams(temperature=0.0, max_tokens=1))
    assert again.num_cached_tokens == 16 and warm.prompt_logprobs is None
    out = run(llm, long_prompt, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=2))
    # Prompt logprobs need every position's logits, so nothing is read from the cache.
    assert out.num_cached_tokens == 0
    assert out.prompt_logprobs[0] is None and all(e is not None for e in out.prompt_logprobs[1:])


@pytest.mark.parametrize(
    ("field", "requested", "reported"),
    [
        ("logprobs", MAX_LOGPROBS + 1, MAX_LOGPROBS + 1),
        ("logprobs", -1, VOCAB_SIZE),
        ("prompt_logprobs", MAX_LOGPROBS + 1, MAX_LOGPROBS + 1),
    ],
)
def test_more_logprobs_than_max_logprobs_is_rejected_before_anything_runs(llm, field, requested, reported):
    kind = "sample" if field == "logprobs" else "prompt"
    message = f"Requested {kind} logprobs of {reported}, which is greater than max allowed: {MAX_LOGPROBS}"
    params = SamplingParams(temperature=0.0, max_tokens=4, **{field: requested})
    with pytest.raises(ValueError, match=message):
        llm.generate([PROMPT, PROMPT], [SamplingParams(temperature=0.0, max_tokens=4), params], use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    llm.llm_engine.scheduler.block_manager.check_no_leaks()
