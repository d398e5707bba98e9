"""jllm's OPT and GPT-2 families against HF transformers: greedy tokens exact and logprobs
equal in float32, through plain batches, chunked prefill and the prefix cache.

The reference is transformers' own OPTForCausalLM / GPT2LMHeadModel (eager attention) on
the same random weights, saved with a small byte-level BPE tokenizer trained here on
ASCII text, so that every token decodes to whole characters and the models stay tiny.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

from hf_models import EOS_TOKEN_ID, check_outputs_equal, hf_greedy, load_hf_model
from jllm import LLM, SamplingParams
from jllm.models import gpt2, opt
from jllm.models.interface import ModelHead
from jllm.models.loader.safetensors_loader import load_safetensors
from jllm.config import ParallelConfig
from jllm.distributed.mesh import make_mesh
from jllm.models.model_loader import load_checkpoint, param_shapes
from jllm.models.registry import resolve_architecture
from jllm.models.weights import params_from_hf

MAX_TOKENS = 20
NUM_LOGPROBS = 5
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

CORPUS = (
    "The history of the printing press begins long before Johannes Gutenberg set up his workshop in Mainz. "
    "In China, craftsmen carved whole pages into wooden blocks as early as the seventh century, and by the "
    "eleventh century an artisan named Bi Sheng had experimented with movable characters made of baked clay. "
    "Korean printers later cast metal type, and the Jikji, a collection of Buddhist teachings printed in 1377, "
    "is the oldest surviving book made that way. What Gutenberg added around 1450 was a complete system: a hand "
    "mould that produced uniform metal letters quickly, an alloy of lead, tin and antimony that melted at a low "
    "temperature yet held its shape, an oil-based ink that clung to metal, and a screw press adapted from the "
    "presses that wine makers and paper makers already used. Together these made it possible to print hundreds "
    "of identical copies of a page in a day. Within fifty years printing shops operated in more than two hundred "
    "European cities, and some twenty million volumes had been produced by the year 1500. Hello, my name is "
    "Ada. Once upon a time, in a small village by the sea, there lived a fisherman and his daughter."
)
# Different lengths in one batch: 5, ~20, ~60 and ~250 tokens.
PROMPTS = [
    "Hello, my name is",
    "Once upon a time, in a small village by the sea,",
    CORPUS[:300],
    CORPUS,
]


def save_tokenizer(folder: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on CORPUS; its alphabet is only CORPUS's characters, so no
    token is a lone byte of a multi-byte character. </s> is EOS_TOKEN_ID (2), as
    hf_greedy expects."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "<pad>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator([CORPUS], trainer)
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", pad_token="<pad>", eos_token="</s>"
    )
    assert hf_tokenizer.eos_token_id == EOS_TOKEN_ID
    hf_tokenizer.save_pretrained(folder)
    return hf_tokenizer


def _is_norm(name: str) -> bool:
    return "layer_norm" in name or ".ln_" in name


def randomize_weights(model, seed: int, std: float = 0.15) -> None:
    """Weights and biases ~ N(0, std); LayerNorm scales ~ N(1, 0.2), their biases ~ N(0, 0.1).
    HF's init (std 0.02, zero biases, unit norms) would repeat one token and leave biases
    and norm weights untested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if _is_norm(name) and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif _is_norm(name):
                param.copy_(0.1 * noise)
            else:
                param.copy_(std * noise)


_TINY_OPT = dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512)
_TINY_GPT2 = dict(n_embd=64, n_layer=2, n_head=4, n_positions=512)
_TOKENS = dict(bos_token_id=0, pad_token_id=1, eos_token_id=EOS_TOKEN_ID)

VARIANTS = {
    # opt-125m's layout: pre-LN, final LayerNorm, tied head.
    "opt-pre-ln": (OPTConfig, OPTForCausalLM, dict(_TINY_OPT)),
    # opt-350m's: post-LN, no final LayerNorm, word embeddings narrower than the model.
    "opt-post-ln-project": (
        OPTConfig,
        OPTForCausalLM,
        dict(_TINY_OPT, do_layer_norm_before=False, word_embed_proj_dim=32),
    ),
    # Pre-LN with project_in/out, no biases, no final LayerNorm, gelu, an untied head.
    "opt-pre-ln-project-untied": (
        OPTConfig,
        OPTForCausalLM,
        dict(
            _TINY_OPT,
            word_embed_proj_dim=48,
            enable_bias=False,
            _remove_final_layer_norm=True,
            activation_function="gelu",
            tie_word_embeddings=False,
        ),
    ),
    # gpt2's layout: gelu_new (tanh), 4x MLP, tied head.
    "gpt2": (GPT2Config, GPT2LMHeadModel, dict(_TINY_GPT2)),
    # Scores divided by layer index + 1, upcast attention, exact gelu, n_inner, untied head.
    "gpt2-inverse-layer-scale-untied": (
        GPT2Config,
        GPT2LMHeadModel,
        dict(
            _TINY_GPT2,
            n_inner=96,
            activation_function="gelu",
            scale_attn_by_inverse_layer_idx=True,
            reorder_and_upcast_attn=True,
            tie_word_embeddings=False,
        ),
    ),
}


def save_tiny_model(name: str, folder: str, seed: int) -> str:
    config_cls, model_cls, overrides = VARIANTS[name]
    tokenizer = save_tokenizer(folder)
    config = config_cls(vocab_size=len(tokenizer), **_TOKENS, **overrides)
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    randomize_weights(model, seed)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("opt-gpt2")
    return {name: save_tiny_model(name, str(root / name), seed=i) for i, name in enumerate(VARIANTS)}


def greedy(max_tokens=MAX_TOKENS, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kwargs)


def generate(llm: LLM, prompt_ids, params: SamplingParams):
    return llm.generate([{"prompt_token_ids": list(ids)} for ids in prompt_ids], params, use_tqdm=False)


def prompt_ids(folder: str, prompts=PROMPTS) -> list[list[int]]:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    return [tokenizer(p).input_ids for p in prompts]


def assert_equal_to_hf(folder: str, outputs, with_logprobs: bool = False, atol: float = 1e-4) -> None:
    """Greedy ids and text equal to HF's float32 generate; where asked, every step's top-k
    logprobs equal to HF's log_softmax within atol."""
    hf = load_hf_model(folder)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    reference = hf_greedy(
        hf, tokenizer, [o.prompt_token_ids for o in outputs], MAX_TOKENS, NUM_LOGPROBS if with_logprobs else None
    )
    check_outputs_equal(
        outputs_0_lst=[(r.token_ids, r.text) for r in reference],
        outputs_1_lst=[(list(o.outputs[0].token_ids), o.outputs[0].text) for o in outputs],
        name_0="hf",
        name_1="jllm",
    )
    if not with_logprobs:
        return
    for r, o in zip(reference, outputs):
        for step, (hf_top, jllm_top) in enumerate(zip(r.logprobs, o.outputs[0].logprobs)):
            assert set(jllm_top) == set(hf_top), (step, jllm_top, hf_top)
            for token_id, lp in jllm_top.items():
                assert abs(lp.logprob - hf_top[token_id]) <= atol, (step, token_id, lp.logprob, hf_top[token_id])


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
    [(opt, OPTConfig(**_TINY_OPT)), (gpt2, GPT2Config(**_TINY_GPT2))],
)
def test_generators_refuse_pooling_heads(module, config):
    with pytest.raises(ValueError, match="only generates"):
        module.build_spec(config, ModelHead.EMBED)


def test_tokenizer_round_trips_corpus(tmp_path):
    tokenizer = save_tokenizer(str(tmp_path))
    assert 300 <= len(tokenizer) <= 400
    assert tokenizer.decode(tokenizer(CORPUS).input_ids) == CORPUS
    assert os.path.exists(tmp_path / "tokenizer.json")
