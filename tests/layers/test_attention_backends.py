"""The Pallas attention backend inside the engine, on the CPU in Pallas interpret mode:
the ragged kernel for prefill and mixed steps, the split-K decode kernel for
decode-only steps, flash attention for lone prompt chunks (XLA's implementation here,
cuDNN's on the GPU), and the same greedy tokens as the plain-jnp reference backend.
"""

import random

import jax.numpy as jnp
import numpy as np
import pytest

from jllm import LLM, SamplingParams
from jllm.layers.attention import AttentionBackend, default_attention_backend, prefix_prefill_attention
from pallas_kernels import ragged_paged_attention_reference, write_kv_reference
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
    assert runner.planner.fresh_prefill_min_tokens is None
    runner.planner.fresh_prefill_min_tokens = fresh_prefill_min_tokens
    build = runner.builder.build

    def recording_build(scheduler_output):
        batch = build(scheduler_output)
        shapes.append(batch.shape)
        return batch

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


@pytest.mark.slow
def test_lone_prompt_chunks_run_fresh_and_prefix_prefill_attention(tiny_llama_path, prompts, monkeypatch):
    """One request at a time: each first chunk (no cached prefix) takes the fresh-prefill
    path; the second chunk of a 100-token prompt (64-token budget), on top of its first,
    takes the prefix-prefill path (two flash attentions merged); greedy tokens equal the
    reference backend's. The tiny chunk would not pay for its gather on a real model:
    the test lifts that limit."""
    monkeypatch.setattr("jllm.worker.attention_plan.PREFIX_PREFILL_TABLE_TOKENS_PER_PAIR", float("inf"))
    long_prompt = [(7 * i) % 30000 + 100 for i in range(100)]
    for prompt in prompts[1:] + [long_prompt]:
        expected, _ = run(tiny_llama_path, "reference", [prompt])
        got, shapes = run(tiny_llama_path, "pallas", [prompt], fresh_prefill_min_tokens=16)
        assert got == expected
        assert shapes[0].fresh_prefill and not shapes[0].prefix_prefill
        assert all(not s.fresh_prefill for s in shapes[1:])
    second = shapes[1]  # The long prompt's second chunk: 36 tokens over 64 cached.
    assert second.num_tokens == 64 and second.prefix_prefill and not second.decode_only
    assert not any(s.prefix_prefill for s in shapes[2:])  # Its decode steps.


@pytest.mark.parametrize("prefix_len,num_tokens", [(37, 21), (16, 32), (1, 5)])
def test_prefix_prefill_attention_matches_the_reference(prefix_len, num_tokens):
    """A chunk over a cached prefix that ends mid-page, on a page boundary, or after one
    token; GQA 4; shuffled pages; padding tokens after the chunk come back zero."""
    rng = np.random.default_rng(prefix_len)
    kv_heads, group, head_dim, block_size, num_blocks, T = 2, 4, 16, 16, 12, 48
    pages = jnp.asarray(rng.permutation(num_blocks)[:8], jnp.int32)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    k_cache, v_cache = (normal(kv_heads, num_blocks, block_size, head_dim) for _ in range(2))
    q = normal(T, kv_heads * group, head_dim)
    k, v = normal(T, kv_heads, head_dim), normal(T, kv_heads, head_dim)
    # The step writes its own K/V into the pages first, as paged_attention does.
    positions = np.arange(prefix_len, prefix_len + num_tokens)
    slots = np.asarray(pages)[positions // block_size] * block_size + positions % block_size
    slot_mapping = jnp.asarray(np.concatenate([slots, np.full(T - num_tokens, -1)]), jnp.int32)
    k_cache, v_cache = write_kv_reference(k_cache, v_cache, k, v, slot_mapping)
    seq_len = jnp.int32(prefix_len + num_tokens)
    got = prefix_prefill_attention(q, k, v, k_cache, v_cache, pages, seq_len, jnp.int32(num_tokens), scale=0.25)
    want = ragged_paged_attention_reference(
        q, k_cache, v_cache, jnp.array([0, num_tokens], jnp.int32), seq_len.reshape(1), pages[None], scale=0.25
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
    assert not np.asarray(got)[num_tokens:].any()
