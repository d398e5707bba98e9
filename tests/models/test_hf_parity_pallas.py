"""jllm through the Pallas kernels (interpret mode on the CPU) against HF transformers.

The fast sibling of test_hf_parity.py, which runs the default (reference) backend on the
CPU: a tiny random-weight GQA Llama with llama3 rope scaling, float32, through
`LLM(..., attention_backend="pallas")`; greedy tokens must equal HF `generate` (eager
attention) exactly and logprobs agree closely. One prompt spans ten KV pages, is
prefilled in 64-token chunks (the ragged kernel), and decodes on the decode kernel.
"""

import types

import numpy as np
import pytest
import torch

from hf_models import (
    EOS_TOKEN_ID,
    LLAMA3_ORIGINAL_MAX_POSITIONS,
    TINY_MODELS,
    hf_greedy,
    load_hf_model,
    randomize_weights,
)
from jllm import LLM, SamplingParams
from tiny_model import ENGINE_ARGS

BLOCK_SIZE = 16
MAX_TOKENS = 12
NUM_LOGPROBS = 5
# The long prompt: ten pages, past llama3's original context, three 64-token chunks at most.
LONG_PROMPT_LEN = 150
# The model is saved without a tokenizer, so texts are not compared, only token ids.
NO_TEXT = types.SimpleNamespace(decode=lambda ids, **kwargs: "")


@pytest.fixture(scope="module")
def tiny_llama3_folder(tmp_path_factory) -> str:
    """tests/hf_models.py's llama3-rope model (3 layers, 4 q heads over 2 kv heads,
    head_dim 16), saved without a tokenizer: the prompts are token ids."""
    spec = TINY_MODELS["llama3-rope"]
    torch.manual_seed(0)
    model = spec.model_cls(spec.config()).to(torch.float32)
    randomize_weights(model, seed=0)
    folder = str(tmp_path_factory.mktemp("tiny-llama3-pallas"))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = np.random.default_rng(11)
    return [rng.integers(100, 40000, size=n).tolist() for n in (5, LONG_PROMPT_LEN)]


def run_pallas(folder: str, prompts):
    """jllm's outputs, and the shapes of the steps the engine compiled."""
    llm = LLM(
        model=folder,
        dtype="float32",
        attention_backend="pallas",
        skip_tokenizer_init=True,
        block_size=BLOCK_SIZE,
        **ENGINE_ARGS,
    )
    assert llm.llm_engine.model_config.attention_backend == "pallas"
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=NUM_LOGPROBS)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return outputs, llm.llm_engine.runner.seen_shapes


def test_pallas_greedy_tokens_equal_hf_and_logprobs_are_close(tiny_llama3_folder, prompts):
    outputs, shapes = run_pallas(tiny_llama3_folder, prompts)
    reference = hf_greedy(load_hf_model(tiny_llama3_folder), NO_TEXT, prompts, MAX_TOKENS, num_logprobs=NUM_LOGPROBS)

    assert LONG_PROMPT_LEN > 8 * BLOCK_SIZE and LONG_PROMPT_LEN > 2 * LLAMA3_ORIGINAL_MAX_POSITIONS
    # The long prompt is prefilled in chunks (64 tokens a step); then decode-only steps ran
    # the decode kernel and mixed steps the ragged kernel.
    assert ENGINE_ARGS["max_num_batched_tokens"] * 2 < LONG_PROMPT_LEN
    assert any(s.decode_only for s in shapes) and not all(s.decode_only for s in shapes), shapes

    for i, (out, ref) in enumerate(zip(outputs, reference)):
        got_ids = list(out.outputs[0].token_ids)
        assert got_ids == ref.token_ids, f"prompt {i}: jllm {got_ids} hf {ref.token_ids}"
        # Agreement on varied text, not on one repeated token or an early EOS.
        assert len(got_ids) == MAX_TOKENS and EOS_TOKEN_ID not in got_ids, got_ids
        assert len(set(got_ids)) > MAX_TOKENS // 3, got_ids
        for step, (got_lps, ref_lps) in enumerate(zip(out.outputs[0].logprobs, ref.logprobs)):
            assert set(ref_lps) <= set(got_lps), (i, step, got_lps, ref_lps)
            for token_id, ref_lp in ref_lps.items():
                assert abs(got_lps[token_id].logprob - ref_lp) < 1e-4, (i, step, token_id)
