"""Compilation: with enforce_eager=False the engine compiles every step shape up to
max_seq_len_to_capture at start-up, and a run of mixed batches within that length
compiles nothing more; with enforce_eager=True nothing compiles up front.

The count is the jit cache size of the fused step (ModelRunner.num_compiled_steps).
"""

import random

import pytest

from jllm import LLM, SamplingParams
from tiny_model import ENGINE_ARGS

# Page buckets are 4, 8, 16, 20 pages of 16 tokens; 128 tokens captures 4 and 8.
MAX_SEQ_LEN_TO_CAPTURE = 128
TOKEN_BUCKETS = (16, 64)
CAPTURED_PAGE_BUCKETS = (4, 8)


@pytest.fixture(scope="module", params=[1, pytest.param(2, marks=pytest.mark.slow)], ids=["tp1", "tp2"])
def llm(request, tiny_llama_path):
    """On one device, and at tensor_parallel_size 2 (the same programs, split by GSPMD)."""
    return LLM(
        model=tiny_llama_path,
        enforce_eager=False,
        max_seq_len_to_capture=MAX_SEQ_LEN_TO_CAPTURE,
        tensor_parallel_size=request.param,
        **ENGINE_ARGS,
    )


def test_enforce_eager_compiles_nothing_up_front(tiny_llama_path):
    eager = LLM(model=tiny_llama_path, enforce_eager=True, **ENGINE_ARGS)
    assert eager.llm_engine.runner.num_compiled_steps == 0


def test_warm_up_compiles_each_token_and_page_bucket_up_to_max_seq_len_to_capture(llm):
    assert llm.llm_engine.parts.compilation_config.token_buckets == TOKEN_BUCKETS
    assert llm.llm_engine.runner.num_compiled_steps == len(TOKEN_BUCKETS) * len(CAPTURED_PAGE_BUCKETS)


def prompts(rng: random.Random, n: int, longest: int) -> list[list[int]]:
    return [[rng.randrange(100, 40000) for _ in range(rng.randint(1, longest))] for _ in range(n)]


def test_no_recompilation_after_warm_up(llm):
    """Batches of 1 to 20 requests, prompts of 1 to 100 tokens and up to 20 generated
    (every sequence within the captured 128), greedy and random sampling, n > 1, stop
    strings, chunked prefills next to decodes, prefix-cache hits, requests joining and
    leaving mid-run."""
    runner = llm.llm_engine.runner
    compiled = runner.num_compiled_steps
    rng = random.Random(0)
    greedy = SamplingParams(temperature=0.0, max_tokens=20)
    sampled = SamplingParams(temperature=0.8, seed=1, max_tokens=8)
    # Short: on the CPU a step with top-k/top-p rows sorts the vocabulary, which is slow.
    filtered = SamplingParams(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05, seed=2, max_tokens=3)

    llm.generate([[123]], greedy, use_tqdm=False)
    shared = prompts(rng, 3, 100)
    llm.generate(shared, greedy, use_tqdm=False)
    batch = prompts(rng, 16, 100)
    llm.generate(batch, [greedy if i % 2 else sampled for i in range(16)], use_tqdm=False)
    llm.generate(prompts(rng, 20, 12), SamplingParams(temperature=1.0, max_tokens=20), use_tqdm=False)
    llm.generate(prompts(rng, 2, 60), SamplingParams(temperature=1.0, n=3, stop=["e"], max_tokens=10), use_tqdm=False)
    outputs = llm.generate(shared, greedy, use_tqdm=False)
    assert any(o.num_cached_tokens > 0 for o in outputs)

    engine = llm.llm_engine
    for i, prompt in enumerate(prompts(rng, 4, 100)):
        engine.add_request(f"joining-{i}", prompt, greedy)
    for step in range(30):
        engine.step()
        if step == 2:
            engine.abort_request(["joining-1"])
            engine.add_request("late", prompts(rng, 1, 90)[0], filtered)
    while engine.has_unfinished_requests():
        engine.step()

    assert runner.num_compiled_steps == compiled
    engine.scheduler.block_manager.check_no_leaks()


def test_a_sequence_longer_than_captured_compiles_its_shape_on_first_use(llm):
    runner = llm.llm_engine.runner
    compiled = runner.num_compiled_steps
    [output] = llm.generate([list(range(100, 300))], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    assert len(output.outputs[0].token_ids) == 4
    assert runner.num_compiled_steps > compiled
    llm.llm_engine.scheduler.block_manager.check_no_leaks()


def test_warm_up_covers_fresh_and_prefix_prefill_steps(tiny_llama_path, monkeypatch):
    """Where lone prompt chunks run flash attention (the GPU's kernels in 16-bit), warm-up
    compiles the fresh- and prefix-prefill programs of those buckets too: a chunked
    prompt then compiles nothing. The flags are part of the jit key on any backend, so
    the reference backend shows it on the CPU."""
    monkeypatch.setattr("jllm.engine.engine_setup.fresh_prefill_min_tokens", lambda *args: 16)
    # The tiny chunk would not pay for its gather on a real model (attention_plan.py).
    monkeypatch.setattr("jllm.worker.attention_plan.PREFIX_PREFILL_TABLE_TOKENS_PER_PAIR", float("inf"))
    llm = LLM(model=tiny_llama_path, enforce_eager=False, max_seq_len_to_capture=MAX_SEQ_LEN_TO_CAPTURE, **ENGINE_ARGS)
    runner = llm.llm_engine.runner
    # Per token bucket and captured page width: the plain step and both prefill variants.
    assert runner.num_compiled_steps == 3 * len(TOKEN_BUCKETS) * len(CAPTURED_PAGE_BUCKETS)
    shapes, build = [], runner.builder.build

    def recording_build(scheduler_output):
        batch = build(scheduler_output)
        shapes.append(batch.shape)
        return batch

    runner.builder.build = recording_build
    prompt = [(7 * i) % 30000 + 100 for i in range(100)]  # Chunks of 64 and 36 tokens.
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    assert shapes[0].fresh_prefill and shapes[1].prefix_prefill
    assert runner.num_compiled_steps == 3 * len(TOKEN_BUCKETS) * len(CAPTURED_PAGE_BUCKETS)
