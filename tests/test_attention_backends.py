"""The Pallas attention backend inside the engine, on the CPU in Pallas interpret mode:
the ragged kernel for prefill and mixed steps, the split-K decode kernel for
decode-only steps, and the same greedy tokens as the plain-jnp reference backend.
"""
import random

import numpy as np
import pytest

from jllm import LLM, SamplingParams
from jllm.layers.attention import AttentionBackend, default_attention_backend
from tiny_model import ENGINE_ARGS

GREEDY = SamplingParams(temperature=0.0, max_tokens=6)


def test_the_platform_picks_the_kernels_on_accelerators_and_the_reference_on_cpu():
    assert default_attention_backend("cpu") == AttentionBackend.REFERENCE
    assert default_attention_backend("gpu") == AttentionBackend.PALLAS
    assert default_attention_backend("cuda") == AttentionBackend.PALLAS


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    # Lengths around page edges (16) and one chunked over several 16-token steps.
    rng = random.Random(3)
    return [[rng.randrange(100, 40000) for _ in range(n)] for n in (1, 15, 16, 17, 40)]


def run(path: str, backend: str, prompts, fresh_prefill_min_tokens=None):
    llm = LLM(model=path, attention_backend=backend, **ENGINE_ARGS)
    assert llm.llm_engine.model_config.attention_backend == backend
    shapes = []
    runner = llm.llm_engine.runner
    # Off on the CPU by default (cuDNN is the GPU's); here the XLA implementation runs it.
    assert runner.builder.fresh_prefill_min_tokens is None
    runner.builder.fresh_prefill_min_tokens = fresh_prefill_min_tokens
    build = runner.builder.build

    def recording_build(rows, banned):
        shape, inputs, md = build(rows, banned)
        shapes.append(shape)
        return shape, inputs, md

    runner.builder.build = recording_build
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    llm.llm_engine.scheduler.block_manager.check_no_leaks()
    # The decode kernel's tickets go from step to step with no memset: each merge must
    # have put its ticket back.
    assert all(not np.asarray(c.decode_tickets).any() for c in runner.kv_caches)
    return [list(o.outputs[0].token_ids) for o in outputs], shapes


def test_pallas_backend_matches_the_reference_with_decode_and_mixed_steps(tiny_llama_path, prompts):
    expected, ref_shapes = run(tiny_llama_path, "reference", prompts)
    got, shapes = run(tiny_llama_path, "pallas", prompts)
    assert got == expected
    # The reference never marks steps; the kernels ran both a decode-only and a mixed step.
    assert not any(s.decode_only for s in ref_shapes)
    assert any(s.decode_only for s in shapes) and not all(s.decode_only for s in shapes)


def test_a_lone_first_prompt_chunk_runs_fresh_prefill_attention(tiny_llama_path, prompts):
    """One request at a time: each first chunk (no cached prefix) takes the fresh-prefill
    path; the second chunk of a 100-token prompt (64-token budget), on top of its first,
    does not."""
    long_prompt = [(7 * i) % 30000 + 100 for i in range(100)]
    for prompt in prompts[1:] + [long_prompt]:
        expected, _ = run(tiny_llama_path, "reference", [prompt])
        got, shapes = run(tiny_llama_path, "pallas", [prompt], fresh_prefill_min_tokens=16)
        assert got == expected
        assert shapes[0].fresh_prefill
        assert all(not s.fresh_prefill for s in shapes[1:])
    assert shapes[1].num_tokens == 64 and not shapes[1].decode_only  # the second chunk
