"""AWQ and GPTQ checkpoints kept quantized: jllm's greedy tokens equal HF float32 running the
dequantized weights, token for token.

tests/quantized_checkpoints.py writes each checkpoint from a tiny random-weight HF model
(AutoAWQ's GEMM packing, AutoGPTQ's / GPTQModel's packing) and overwrites the HF model's
Linear weights with the values the checkpoint holds. Prompts are token ids (no tokenizer);
both sides generate exactly MAX_TOKENS tokens. About 8 s a case on two CPU cores.
"""

from __future__ import annotations

import pytest
import torch

from hf_models import TINY_MODELS, randomize_weights
from jllm import LLM, SamplingParams
from quantized_checkpoints import quantize_and_save
from tiny_model import ENGINE_ARGS

MAX_TOKENS = 12
PROMPTS = [list(range(100, 117)), [5, 900, 31, 7000, 12, 44, 45000, 3]]


def _build(tmp_path, name: str, method: str, **quant):
    spec = TINY_MODELS[name]
    torch.manual_seed(0)
    model = spec.model_cls(spec.config()).to(torch.float32).eval()
    randomize_weights(model, seed=0)
    folder = str(tmp_path / f"{name}-{method}")
    quantize_and_save(model, folder, method, **quant)
    return model, folder


@torch.no_grad()
def _hf_greedy(model) -> list[list[int]]:
    outputs = []
    for ids in PROMPTS:
        input_ids = torch.tensor([ids])
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=MAX_TOKENS,
            min_new_tokens=MAX_TOKENS,
            do_sample=False,
        )
        outputs.append(out[0, len(ids) :].tolist())
    return outputs


def _jllm_greedy(folder: str, **engine) -> list[list[int]]:
    llm = LLM(model=folder, dtype="float32", skip_tokenizer_init=True, **{**ENGINE_ARGS, **engine})
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in PROMPTS], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


CASES = {
    "awq-llama-g64": ("llama3-rope", "awq", dict(group_size=64), {}),
    "gptq-qwen2-4bit-desc-act": ("qwen2-qkv-bias", "gptq", dict(group_size=32, desc_act=True), {}),
    "gptq-llama-8bit-sym-v2": (
        "llama3-rope",
        "gptq",
        dict(bits=8, group_size=-1, sym=True, checkpoint_format="gptq_v2"),
        {},
    ),
    "awq-qwen2-g32-tp2": ("qwen2-qkv-bias", "awq", dict(group_size=32), dict(tensor_parallel_size=2)),
}


@pytest.mark.parametrize("case", CASES)
def test_quantized_greedy_equals_hf_dequantized_float32(tmp_path, case):
    name, method, quant, engine = CASES[case]
    model, folder = _build(tmp_path, name, method, **quant)
    expected = _hf_greedy(model)
    assert len({t for out in expected for t in out}) > 3, "outputs should vary"
    assert _jllm_greedy(folder, **engine) == expected


def test_dummy_weights_give_valid_quantized_tensors(tmp_path):
    _, folder = _build(tmp_path, "llama3-rope", "gptq", group_size=32, desc_act=True)
    outputs = _jllm_greedy(folder, load_format="dummy")
    assert all(len(out) == MAX_TOKENS for out in outputs)


def test_tensor_parallel_size_that_splits_a_group_is_refused(tmp_path):
    # o_proj's 64 input features over 2 devices: 32 per device, half a group of 64.
    _, folder = _build(tmp_path, "llama3-rope", "awq", group_size=64)
    with pytest.raises(ValueError, match="would split a quantization group of o_proj"):
        _jllm_greedy(folder, tensor_parallel_size=2)


def test_quantization_argument_must_match_the_checkpoint(tmp_path):
    _, folder = _build(tmp_path, "llama3-rope", "gptq", group_size=64)
    with pytest.raises(ValueError, match=r"model config \(gptq\) does not match .* argument \(awq\)"):
        _jllm_greedy(folder, quantization="awq")


def test_orbax_conversion_keeps_the_packed_weights(tmp_path):
    """`jllm convert` saves the device layout (at TP 2 here) and a TP 1 engine restores it."""
    from jllm.entrypoints.convert import convert

    model, folder = _build(tmp_path, "llama3-rope", "gptq", group_size=32, desc_act=True)
    converted = convert(folder, str(tmp_path / "orbax"), tensor_parallel_size=2, dtype="float32")
    assert _jllm_greedy(converted) == _hf_greedy(model)
