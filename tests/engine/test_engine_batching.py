"""Batch invariance, seeded sampling and aborts, end to end through the engine.

vLLM's tests/basic_correctness (chunked prefill, preemption, prefix caching on and off)
and tests/samplers/test_seeded_generate.py, on a tiny random-weight Llama. The
reference for each prompt is its greedy output when it runs alone on an engine without
prefix caching; every other way of batching it must give the same tokens. After every
scenario each KV page is free or held only by the prefix cache.
"""

import random

import pytest

from jllm import LLM, SamplingParams
from tiny_model import ENGINE_ARGS

MAX_TOKENS = 10
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)

PROMPT_LENGTHS = [
    1,
    2,
    3,
    5,
    8,
    13,
    16,
    17,
    24,
    31,
    32,
    33,
    47,
    48,
    64,
    65,
    80,
    100,
    127,
    128,
    129,
    150,
    170,
    190,
    200,
    220,
    240,
    256,
    260,
    280,
    290,
    300,
]


def _make_prompts() -> list[list[int]]:
    """32 token prompts of 1..300 tokens; every other one of 48 tokens or more starts
    with the same long prefix, so prefix-cache hits happen within one batch."""
    rng = random.Random(0)

    def draw(n: int) -> list[int]:
        return [rng.randrange(100, 40000) for _ in range(n)]  # ids below 100 include special tokens

    shared = draw(max(PROMPT_LENGTHS))
    prompts = []
    for i, length in enumerate(PROMPT_LENGTHS):
        if i % 2 == 0 and length >= 48:
            prompts.append(shared[: length - 16] + draw(16))
        else:
            prompts.append(draw(length))
    return prompts


PROMPTS = _make_prompts()


def token_ids(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def assert_no_leaks(llm: LLM) -> None:
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    engine.scheduler.block_manager.check_no_leaks()


@pytest.fixture(scope="module")
def reference_llm(tiny_llama_path):
    return LLM(model=tiny_llama_path, enable_prefix_caching=False, **ENGINE_ARGS)


@pytest.fixture(scope="module")
def alone_outputs(reference_llm) -> list[list[int]]:
    """Each prompt's greedy tokens, run on its own."""
    outputs = [token_ids(reference_llm.generate([p], GREEDY, use_tqdm=False))[0] for p in PROMPTS]
    assert_no_leaks(reference_llm)
    # A degenerate model (one token everywhere) would make every comparison vacuous.
    assert len({tuple(o) for o in outputs}) == len(PROMPTS)
    return outputs


@pytest.fixture(scope="module")
def cached_llm(tiny_llama_path):
    """Prefix caching on (the default), otherwise the reference engine's settings."""
    return LLM(model=tiny_llama_path, enable_prefix_caching=True, **ENGINE_ARGS)


# ----- batch invariance -----------------------------------------------------------


def test_batch_of_32_matches_alone_without_prefix_caching(reference_llm, alone_outputs):
    outputs = reference_llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert token_ids(outputs) == alone_outputs
    assert all(o.num_cached_tokens == 0 for o in outputs)
    assert_no_leaks(reference_llm)


def test_batch_of_32_matches_alone_with_prefix_caching(cached_llm, alone_outputs):
    outputs = cached_llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert token_ids(outputs) == alone_outputs
    # Prompts admitted after the first one with the shared prefix reuse its pages.
    assert any(o.num_cached_tokens > 0 for o in outputs)
    assert_no_leaks(cached_llm)


def test_fully_cached_prompts_match_alone(cached_llm, alone_outputs):
    """Run again: every full page of every prompt is now a hit (the pool is large
    enough that nothing was evicted); only the last token is always recomputed."""
    cached_llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    outputs = cached_llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert token_ids(outputs) == alone_outputs
    assert [o.num_cached_tokens for o in outputs] == [(len(p) - 1) // 16 * 16 for p in PROMPTS]
    assert_no_leaks(cached_llm)


@pytest.fixture(scope="module")
def chunked_llm(tiny_llama_path):
    args = dict(ENGINE_ARGS, max_num_batched_tokens=16, max_num_seqs=16)
    return LLM(model=tiny_llama_path, enable_prefix_caching=False, **args)


def test_batch_of_32_matches_alone_with_16_token_chunked_prefill(chunked_llm, alone_outputs):
    assert chunked_llm.llm_engine.scheduler_config.max_num_batched_tokens == 16
    outputs = chunked_llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert token_ids(outputs) == alone_outputs
    assert_no_leaks(chunked_llm)


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_batch_of_32_matches_alone_under_preemption(tiny_llama_path, alone_outputs, enable_prefix_caching):
    # 24 pages of 16 tokens: one 300-token prompt takes 20, so running requests
    # outgrow the pool and the newest are preempted and recomputed.
    args = dict(ENGINE_ARGS, num_gpu_blocks_override=24, max_num_batched_tokens=16, max_num_seqs=16)
    llm = LLM(model=tiny_llama_path, enable_prefix_caching=enable_prefix_caching, **args)
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert token_ids(outputs) == alone_outputs
    assert_no_leaks(llm)


# ----- seeded sampling ------------------------------------------------------------


def seeded(seed: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=MAX_TOKENS, **kwargs)


def test_seeded_sample_is_the_same_alone_and_in_any_batch(cached_llm, chunked_llm):
    prompt = PROMPTS[20]
    alone = token_ids(cached_llm.generate([prompt], seeded(1234), use_tqdm=False))[0]

    # Amid greedy, unseeded and differently seeded requests, at another row.
    others = PROMPTS[:6]
    batch_a = cached_llm.generate(
        others + [prompt],
        [
            GREEDY,
            SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS),
            seeded(1),
            GREEDY,
            SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=3),
            GREEDY,
            seeded(1234),
        ],
        use_tqdm=False,
    )
    batch_b = cached_llm.generate([prompt] + PROMPTS[25:29], [seeded(1234)] + [seeded(5)] * 4, use_tqdm=False)
    # On another engine, whose 16-token steps batch it differently again.
    chunked = chunked_llm.generate(PROMPTS[10:14] + [prompt], seeded(1234), use_tqdm=False)

    assert token_ids(batch_a)[-1] == alone
    assert token_ids(batch_b)[0] == alone
    assert token_ids(chunked)[-1] == alone
    assert_no_leaks(cached_llm)
    assert_no_leaks(chunked_llm)


def test_different_seeds_give_different_samples(cached_llm):
    outputs = cached_llm.generate([PROMPTS[20]] * 4, [seeded(s) for s in (1, 2, 3, 4)], use_tqdm=False)
    assert len({tuple(t) for t in token_ids(outputs)}) == 4
    assert_no_leaks(cached_llm)


def test_n_samples_have_indices_0_to_n_minus_1_and_differ(cached_llm):
    params = seeded(7, n=4)
    [first] = cached_llm.generate([PROMPTS[18]], params, use_tqdm=False)
    [again] = cached_llm.generate([PROMPTS[18]], params, use_tqdm=False)
    assert [c.index for c in first.outputs] == [0, 1, 2, 3]
    samples = [tuple(c.token_ids) for c in first.outputs]
    assert len(set(samples)) == 4
    assert all(len(s) == MAX_TOKENS for s in samples)
    assert [tuple(c.token_ids) for c in again.outputs] == samples
    assert_no_leaks(cached_llm)


# ----- aborts ---------------------------------------------------------------------


def test_aborted_requests_are_never_returned_and_free_their_pages(cached_llm, alone_outputs):
    engine = cached_llm.llm_engine
    # Earlier tests cached these prompts; without hits the long one is still mid-prefill
    # when it is aborted.
    assert engine.scheduler.reset_prefix_cache()
    prompt_of = {"kept": 9, "decoding": 5, "prefilling": 31, "waiting": 3, "n2": 24, "added_after": 29}
    for request_id in ("kept", "decoding", "prefilling"):
        engine.add_request(request_id, PROMPTS[prompt_of[request_id]], GREEDY)
    before_abort = []
    for _ in range(3):
        before_abort += engine.step()
    engine.add_request("waiting", PROMPTS[prompt_of["waiting"]], GREEDY)
    engine.add_request("n2", PROMPTS[prompt_of["n2"]], seeded(3, n=2))
    before_abort += engine.step()
    prefilling = engine.scheduler.requests["prefilling"]
    assert 0 < prefilling.num_computed_tokens < prefilling.num_prompt_tokens
    assert engine.scheduler.requests["decoding"].num_output_tokens > 0

    aborted = {"decoding", "prefilling", "waiting", "n2"}
    engine.abort_request(sorted(aborted))
    engine.add_request("added_after", PROMPTS[prompt_of["added_after"]], GREEDY)
    after_abort = []
    while engine.has_unfinished_requests():
        after_abort += engine.step()

    assert not any(out.finished for out in before_abort if out.request_id in aborted)
    assert not any(out.request_id in aborted for out in after_abort)
    finished = {out.request_id: out for out in after_abort if out.finished}
    assert set(finished) == {"kept", "added_after"}
    for request_id, out in finished.items():
        assert list(out.outputs[0].token_ids) == alone_outputs[prompt_of[request_id]]
    assert engine.get_num_unfinished_requests() == 0
    assert_no_leaks(cached_llm)

    # Aborting finished or unknown requests changes nothing.
    engine.abort_request(["kept", "never-added"])
    assert_no_leaks(cached_llm)
