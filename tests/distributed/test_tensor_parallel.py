"""Tensor parallelism on eight virtual CPU devices (tests/conftest.py): the same greedy
tokens as HF transformers at every tensor_parallel_size, and logprobs within 1e-4 of
one device.

The reference is transformers' own model on the same random weights (tests/hf_models.py),
and the default SmolLM2 GGUF as transformers loads it. The tiny models have 8 query heads
over 2 kv heads, so TP 4 and 8 replicate each kv head on 2 and 4 devices; a 6-head model
runs at TP 3 with an ffn size that does not split in three (its MLP stays whole).
"""

import dataclasses
import os

import numpy as np
import pytest

from hf_models import TINY_MODELS, hf_greedy, load_hf_model, save_tiny_model
from jllm import LLM, SamplingParams
from jllm.config import ParallelConfig
from jllm.distributed.mesh import make_mesh, verify_tensor_parallel
from jllm.models.loader.gguf_loader import load_gguf_tokenizer
from tiny_model import ENGINE_ARGS

MAX_TOKENS = 8
NUM_LOGPROBS = 4
# A short prompt, one past a page, and one longer than the 64-token step (chunked prefill).
PROMPT_LENS = (5, 17, 90)

# Llama (llama3 rope, untied head), Qwen2 (qkv bias, tied) and Qwen3 (q/k norm, head_dim 32).
EIGHT_HEADS = {"num_attention_heads": 8, "num_key_value_heads": 2}
MODELS = {
    "llama": dataclasses.replace(
        TINY_MODELS["llama3-rope"], overrides={**TINY_MODELS["llama3-rope"].overrides, **EIGHT_HEADS}
    ),
    "qwen2": dataclasses.replace(
        TINY_MODELS["qwen2-qkv-bias"], overrides={**TINY_MODELS["qwen2-qkv-bias"].overrides, **EIGHT_HEADS}
    ),
    "qwen3": dataclasses.replace(
        TINY_MODELS["qwen3-qk-norm"], overrides={**TINY_MODELS["qwen3-qk-norm"].overrides, **EIGHT_HEADS}
    ),
    # 6 q heads over 3 kv heads (head_dim 8); intermediate 128 does not split in three.
    "llama-6-heads": dataclasses.replace(
        TINY_MODELS["llama3-rope"],
        overrides={
            **TINY_MODELS["llama3-rope"].overrides,
            "num_attention_heads": 6,
            "num_key_value_heads": 3,
            "hidden_size": 48,
        },
    ),
}


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = np.random.default_rng(3)
    return [rng.integers(100, 40000, size=n).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def references(tmp_path_factory, smollm2_gguf_path, prompts):
    """Per model: its folder, HF's greedy tokens, and jllm's TP 1 outputs (built on first use)."""
    tokenizer = load_gguf_tokenizer(smollm2_gguf_path)
    cache = {}

    def get(name: str):
        if name not in cache:
            folder = save_tiny_model(MODELS[name], str(tmp_path_factory.mktemp(name)), tokenizer, seed=1)
            hf = hf_greedy(load_hf_model(folder), tokenizer, prompts, MAX_TOKENS)
            cache[name] = (folder, [o.token_ids for o in hf], run(folder, prompts, tensor_parallel_size=1))
        return cache[name]

    return get


def run(folder: str, prompts, **kwargs):
    llm = LLM(model=folder, dtype="float32", skip_tokenizer_init=True, **{**ENGINE_ARGS, **kwargs})
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=NUM_LOGPROBS)
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def tokens(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def assert_logprobs_close(outputs, reference, atol: float = 1e-4) -> None:
    """Each position's top-k: the same ids (tokens are equal, so the ranking is), logprobs within atol."""
    for out, ref in zip(outputs, reference):
        for got, want in zip(out.outputs[0].logprobs, ref.outputs[0].logprobs):
            common = set(got) & set(want)
            assert len(common) >= NUM_LOGPROBS - 1
            for token_id in common:
                assert abs(got[token_id].logprob - want[token_id].logprob) <= atol


@pytest.mark.parametrize("tp", [2, pytest.param(4, marks=pytest.mark.slow), pytest.param(8, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_greedy_tokens_at_every_tp_size_equal_hf(name, tp, references, prompts):
    folder, hf_tokens, tp1 = references(name)
    assert tokens(tp1) == hf_tokens
    outputs = run(folder, prompts, tensor_parallel_size=tp)
    assert tokens(outputs) == hf_tokens
    assert_logprobs_close(outputs, tp1)


def test_six_heads_at_tp_3_equal_hf(references, prompts):
    folder, hf_tokens, tp1 = references("llama-6-heads")
    outputs = run(folder, prompts, tensor_parallel_size=3)
    assert tokens(outputs) == hf_tokens
    assert_logprobs_close(outputs, tp1)


@pytest.mark.slow
def test_pallas_kernels_in_interpret_mode_under_shard_map(references, prompts):
    """The Pallas kernels (KV write, ragged and decode attention) run per head shard."""
    folder, hf_tokens, tp1 = references("llama")
    outputs = run(folder, prompts[:2], tensor_parallel_size=2, attention_backend="pallas")
    assert tokens(outputs) == hf_tokens[:2]
    assert_logprobs_close(outputs, tp1[:2])


@pytest.mark.slow
def test_default_smollm2_gguf_at_tp_3_equals_tp_1_and_hf(smollm2_gguf_path):
    """SmolLM2-135M has 9 query heads over 3 kv heads: one kv head per device at TP 3."""
    tokenizer = load_gguf_tokenizer(smollm2_gguf_path)
    messages = ["What is the capital of France?", "Write a haiku about the sea."]
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True) for m in messages
    ]
    prompts = [p if isinstance(p, list) else p["input_ids"] for p in prompts]
    folder, name = os.path.split(smollm2_gguf_path)
    hf_tokens = [o.token_ids for o in hf_greedy(load_hf_model(folder, gguf_file=name), tokenizer, prompts, 16)]

    def generate(tp: int):
        llm = LLM(model=smollm2_gguf_path, dtype="float32", tensor_parallel_size=tp, **ENGINE_ARGS)
        params = SamplingParams(temperature=0.0, max_tokens=16)
        return tokens(llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False))

    assert generate(3) == generate(1) == hf_tokens


def test_heads_that_do_not_split_are_refused_in_vllm_words(tiny_llama_path):
    with pytest.raises(
        ValueError, match=r"Total number of attention heads \(4\) must be divisible by tensor parallel size \(3\)\."
    ):
        LLM(model=tiny_llama_path, tensor_parallel_size=3, **ENGINE_ARGS)
    with pytest.raises(ValueError, match=r"key-value heads \(2\) must be divisible by tensor parallel size \(3\)"):
        verify_tensor_parallel(6, 2, 3)
    verify_tensor_parallel(8, 2, 8)  # each kv head on 4 devices
    verify_tensor_parallel(8, 8, 4)


def test_more_devices_than_exist_is_refused():
    with pytest.raises(
        ValueError,
        match=r"World size \(16: tensor_parallel_size=4 x data_parallel_size=4\) is larger than the number "
        r"of available devices \(8\)",
    ):
        make_mesh(ParallelConfig(tensor_parallel_size=4, data_parallel_size=4))


def test_pipeline_parallelism_is_refused_as_not_supported_yet(tiny_llama_path):
    with pytest.raises(
        ValueError, match=r"^pipeline_parallel_size=2 is not supported: pipeline parallelism is not supported yet"
    ):
        LLM(model=tiny_llama_path, pipeline_parallel_size=2)
