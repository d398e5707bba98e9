"""jllm's OPT and GPT-2 families against HF transformers: greedy tokens exact and logprobs
equal in float32, through plain batches, chunked prefill and the prefix cache.

The reference is transformers' own OPTForCausalLM / GPT2LMHeadModel (eager attention) on
the same random weights, saved with a small byte-level BPE tokenizer trained on ASCII
text (tests/hf_opt_gpt2_models.py).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import AutoConfig, GPT2Config, OPTConfig

from hf_opt_gpt2_models import (
    CORPUS,
    MAX_TOKENS,
    NUM_LOGPROBS,
    TINY_GPT2,
    TINY_OPT,
    VARIANTS,
    assert_equal_to_hf,
    prompt_ids,
    save_tiny_models,
    save_tokenizer,
)
from jllm import LLM, SamplingParams
from jllm.models import gpt2, opt
from jllm.models.interface import ModelHead
from jllm.models.loader.safetensors_loader import load_safetensors
from jllm.config import ParallelConfig
from jllm.distributed.mesh import make_mesh
from jllm.models.model_loader import load_checkpoint, param_shapes
from jllm.models.registry import resolve_architecture
from jllm.models.weights import params_from_hf

# 64-token steps, so the long prompt is prefilled in chunks; one token bucket and 64-token
# pages keep the compiled step programs few (each costs seconds on the CPU).
BLOCK_SIZE = 64
ENGINE_ARGS = dict(
    max_model_len=512,
    max_num_seqs=8,
    max_num_batched_tokens=64,
    block_size=BLOCK_SIZE,
    compilation_config={"token_buckets": [64]},
    seed=0,
)


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    return save_tiny_models(str(tmp_path_factory.mktemp("opt-gpt2")))


def greedy(max_tokens=MAX_TOKENS, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kwargs)


def generate(llm: LLM, prompt_ids, params: SamplingParams):
    return llm.generate([{"prompt_token_ids": list(ids)} for ids in prompt_ids], params, use_tqdm=False)


@pytest.fixture(scope="module", params=list(VARIANTS))
def folder(request, tiny_folders) -> str:
    return tiny_folders[request.param]


@pytest.fixture(scope="module")
def llm(folder) -> LLM:
    return LLM(model=folder, **ENGINE_ARGS)


def test_greedy_and_logprobs_equal_hf_float32(folder, llm):
    """One batch of four prompts; the longest runs in chunks beside the others' decodes."""
    ids = prompt_ids(folder)
    assert len(ids[-1]) > 3 * ENGINE_ARGS["max_num_batched_tokens"]
    outputs = generate(llm, ids, greedy(logprobs=NUM_LOGPROBS))
    # Random weights at this scale give varied text, not one token repeated.
    assert len({tuple(o.outputs[0].token_ids) for o in outputs}) == len(outputs)
    assert_equal_to_hf(folder, outputs, with_logprobs=True)


def test_prompts_over_a_cached_prefix_equal_hf_float32(folder, llm):
    """Prompts that extend a cached one read their first pages from the prefix cache and
    compute only the rest, in chunks."""
    (long_ids,) = prompt_ids(folder, [CORPUS])
    generate(llm, [long_ids], greedy(max_tokens=1))
    extended = [long_ids + [5, 6, 7], long_ids[:100] + [9]]
    outputs = generate(llm, extended, greedy())
    assert [o.num_cached_tokens for o in outputs] == [len(long_ids) // BLOCK_SIZE * BLOCK_SIZE, BLOCK_SIZE]
    assert_equal_to_hf(folder, outputs)


def _family_model(folder: str):
    config = AutoConfig.from_pretrained(folder)
    _, family, head = resolve_architecture(config)
    spec = family.build_spec(config, head)
    return family, spec, family.module(spec, jnp.float32)


def _shapes(params):
    return jax.tree.map(lambda x: (x.shape, x.dtype), params)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_dummy_weights_have_the_checkpoint_shapes(name, tiny_folders):
    """load_format="dummy" builds the very tree the checkpoint loads into, its LayerNorm
    scales at one."""
    family, spec, model = _family_model(tiny_folders[name])
    mesh = make_mesh(ParallelConfig())
    loaded = load_checkpoint(family, model, spec, {}, tiny_folders[name], "safetensors", jnp.float32, 0, mesh)
    dummy = load_checkpoint(family, model, spec, {}, tiny_folders[name], "dummy", jnp.float32, 0, mesh)
    assert _shapes(dummy) == _shapes(loaded)
    scales = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(dummy) if path[-1].key == "weight"]
    assert len(scales) >= 2 * spec.num_hidden_layers and all(bool((s == 1).all()) for s in scales)


@pytest.mark.parametrize("name", ["opt-post-ln-project", "gpt2"])
def test_checkpoints_saved_without_the_task_prefix_load(name, tiny_folders):
    """opt-125m's files name tensors `decoder.*` and gpt2's `h.*`, as their base models
    (OPTModel, GPT2Model) save them, without `model.` / `transformer.`."""
    family, spec, model = _family_model(tiny_folders[name])
    weights = load_safetensors(tiny_folders[name], use_tqdm=False)
    base_only = {n.partition(".")[2]: w for n, w in weights.items() if n.startswith(("model.", "transformer."))}
    assert not any(n.startswith(("model.", "transformer.")) for n in base_only)
    shapes, _ = param_shapes(model, spec, {})
    expected = params_from_hf(family.hf_name_map(spec), weights, jnp.float32, shapes)
    loaded = params_from_hf(family.hf_name_map(spec), base_only, jnp.float32, shapes)
    jax.tree.map(np.testing.assert_array_equal, loaded, expected)


@pytest.mark.parametrize(
    ("module", "config"),
    [(opt, OPTConfig(**TINY_OPT)), (gpt2, GPT2Config(**TINY_GPT2))],
)
def test_generators_refuse_pooling_heads(module, config):
    with pytest.raises(ValueError, match="only generates"):
        module.build_spec(config, ModelHead.EMBED)


def test_tokenizer_round_trips_corpus(tmp_path):
    tokenizer = save_tokenizer(str(tmp_path))
    assert 300 <= len(tokenizer) <= 400
    assert tokenizer.decode(tokenizer(CORPUS).input_ids) == CORPUS
    assert os.path.exists(tmp_path / "tokenizer.json")
