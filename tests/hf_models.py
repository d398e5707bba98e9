"""The HF-transformers side of the parity tests (not a test module).

Tiny random-weight models of each supported architecture, saved as HF folders with the
SmolLM2 tokenizer; greedy references from `model.generate` (float32, eager attention) with
optional top-k logprobs per step; and vLLM's two comparisons, `check_outputs_equal` and
`check_logprobs_close` (tests/models/utils.py), rebuilt from their documented logic.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

# The SmolLM2 tokenizer's ids; every tiny model shares its 49152-token vocabulary.
BOS_TOKEN_ID, EOS_TOKEN_ID = 1, 2

# Small enough to build and run in seconds, large enough for GQA (4 q heads over 2 kv heads).
_TINY_DIMS = dict(
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    bos_token_id=BOS_TOKEN_ID,
    eos_token_id=EOS_TOKEN_ID,
    pad_token_id=EOS_TOKEN_ID,
)

# Sizes the tests make prompts longer than, so that each architecture's feature matters.
SLIDING_WINDOW = 32
LLAMA3_ORIGINAL_MAX_POSITIONS = 64


@dataclasses.dataclass(frozen=True)
class TinyModel:
    name: str
    config_cls: type
    model_cls: type
    overrides: dict

    def config(self):
        return self.config_cls(**{**_TINY_DIMS, **self.overrides})


TINY_MODELS = {
    m.name: m
    for m in (
        # Llama 3.x rope scaling: positions past original_max_position_embeddings see
        # rescaled low frequencies. Untied lm_head.
        TinyModel(
            "llama3-rope",
            LlamaConfig,
            LlamaForCausalLM,
            dict(
                tie_word_embeddings=False,
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": LLAMA3_ORIGINAL_MAX_POSITIONS,
                },
            ),
        ),
        # Every layer attends only to the last SLIDING_WINDOW positions. Untied lm_head.
        TinyModel(
            "mistral-sliding-window",
            MistralConfig,
            MistralForCausalLM,
            dict(
                tie_word_embeddings=False,
                sliding_window=SLIDING_WINDOW,
                rope_theta=10000.0,
            ),
        ),
        # q/k/v projections with biases. Tied embeddings.
        TinyModel(
            "qwen2-qkv-bias",
            Qwen2Config,
            Qwen2ForCausalLM,
            dict(
                tie_word_embeddings=True,
                use_sliding_window=False,
            ),
        ),
        # Per-head q/k RMSNorm and a head_dim that is not hidden_size / heads. Tied embeddings.
        TinyModel(
            "qwen3-qk-norm",
            Qwen3Config,
            Qwen3ForCausalLM,
            dict(
                tie_word_embeddings=True,
                head_dim=32,
                use_sliding_window=False,
            ),
        ),
    )
}


def randomize_weights(model: PreTrainedModel, seed: int, std: float = 0.15) -> None:
    """Every parameter (biases included) ~ N(0, std); RMSNorm scales ~ N(1, 0.2).

    HF's default init (std 0.02, norms at exactly 1, zero biases) makes greedy outputs
    repeat one token and would leave biases and norm weights untested.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(std * noise)


def save_tiny_model(spec: TinyModel, folder: str, tokenizer, seed: int = 0) -> str:
    """Builds `spec` with random weights and saves it (float32 safetensors, config,
    generation_config and tokenizer) into `folder`; returns the folder."""
    torch.manual_seed(seed)
    model = spec.model_cls(spec.config()).to(torch.float32)
    randomize_weights(model, seed)
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_hf_model(path: str, dtype: torch.dtype = torch.float32, gguf_file: str | None = None):
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager", **kwargs)
    return model.eval()


# ---------------------------------------------------------------- HF reference outputs


@dataclasses.dataclass
class HFOutput:
    token_ids: list[int]
    text: str
    # Per generated position, {token_id: logprob} of the top-k (when asked for).
    logprobs: list[dict[int, float]] | None = None


@torch.no_grad()
def hf_greedy(
    model, tokenizer, prompts_token_ids: Sequence[Sequence[int]], max_tokens: int, num_logprobs: int | None = None
) -> list[HFOutput]:
    """Greedy `generate` one prompt at a time (no padding to perturb the numerics).

    Generation stops at EOS (included in the ids), as jllm's does. Logprobs are
    log_softmax of each step's logits in float32, as vLLM's HfRunner computes them.
    """
    outputs = []
    for ids in prompts_token_ids:
        input_ids = torch.tensor([list(ids)], dtype=torch.long)
        result = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=EOS_TOKEN_ID,
            pad_token_id=EOS_TOKEN_ID,
            return_dict_in_generate=True,
            output_logits=num_logprobs is not None,
        )
        new_ids = result.sequences[0, input_ids.shape[1] :].tolist()
        logprobs = None
        if num_logprobs is not None:
            logprobs = []
            for step_logits in result.logits[: len(new_ids)]:
                lp = torch.log_softmax(step_logits[0].float(), dim=-1)
                top = torch.topk(lp, num_logprobs)
                logprobs.append({int(i): float(v) for i, v in zip(top.indices, top.values)})
        text = tokenizer.decode(new_ids, skip_special_tokens=True)
        outputs.append(HFOutput(new_ids, text, logprobs))
    return outputs


@torch.no_grad()
def hf_prompt_logprobs(model, prompt_token_ids: Sequence[int]) -> torch.Tensor:
    """[len(prompt) - 1, V] float32 logprobs of the token at position i + 1 given tokens 0..i."""
    input_ids = torch.tensor([list(prompt_token_ids)], dtype=torch.long)
    logits = model(input_ids).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


# ---------------------------------------------------------------- vLLM's comparisons


def check_outputs_equal(*, outputs_0_lst, outputs_1_lst, name_0: str, name_1: str) -> None:
    """vLLM's exact comparison: per prompt, (token_ids, text) must be equal."""
    assert len(outputs_0_lst) == len(outputs_1_lst)
    for prompt_idx, ((ids_0, str_0), (ids_1, str_1)) in enumerate(zip(outputs_0_lst, outputs_1_lst)):
        fail_msg = f"Test{prompt_idx}:\n{name_0}:\t{str_0!r}\t{list(ids_0)}\n{name_1}:\t{str_1!r}\t{list(ids_1)}"
        assert list(ids_0) == list(ids_1), fail_msg
        assert str_0 == str_1, fail_msg


def check_logprobs_close(
    *,
    outputs_0_lst,
    outputs_1_lst,
    name_0: str,
    name_1: str,
    num_outputs_0_skip_tokens: int = 0,
    warn_on_mismatch: bool = True,
    always_check_logprobs: bool = False,
) -> None:
    """vLLM's closeness test for runs whose numerics differ (dtype, kernels).

    Each output is (ids, text, logprobs) or (ids, text, logprobs, prompt_logprobs), where
    logprobs holds one {token_id: logprob} per generated token. Walking the ids together,
    at the first position where they differ each side's token must be in the other's
    top-k there; after that the sequences legitimately diverge, so checking stops. Where
    prompt logprobs are given, every prompt position must name the same token ids.
    """
    assert len(outputs_0_lst) == len(outputs_1_lst)
    for prompt_idx, (outputs_0, outputs_1) in enumerate(zip(outputs_0_lst, outputs_1_lst)):
        assert len(outputs_0) == len(outputs_1)
        ids_0, str_0, logprobs_0 = outputs_0[:3]
        ids_1, str_1, logprobs_1 = outputs_1[:3]
        if len(outputs_0) == 4:
            _check_prompt_logprobs_match(prompt_idx, outputs_0[3], outputs_1[3], name_0, name_1)
        ids_0 = list(ids_0)[num_outputs_0_skip_tokens:]
        logprobs_0 = list(logprobs_0)[num_outputs_0_skip_tokens:]
        for idx, (id_0, id_1) in enumerate(zip(ids_0, ids_1)):
            mismatch = id_0 != id_1
            if mismatch or always_check_logprobs:
                elem_0, elem_1 = logprobs_0[idx], logprobs_1[idx]
                fail_msg = (
                    f"Test{prompt_idx}:\nMatched tokens:\t{ids_0[:idx]}\n"
                    f"{name_0}:\t{str_0!r}\t{elem_0}\n{name_1}:\t{str_1!r}\t{elem_1}"
                )
                assert elem_0 is not None and elem_1 is not None, fail_msg
                assert id_0 in elem_1, fail_msg
                assert id_1 in elem_0, fail_msg
            if mismatch:
                if warn_on_mismatch:
                    warnings.warn(
                        f"Test{prompt_idx}: {name_0} and {name_1} diverge at output "
                        f"token {idx} ({id_0} vs {id_1}), each within the other's top-k.",
                        stacklevel=2,
                    )
                break
        else:
            if str_0 != str_1 and warn_on_mismatch:
                warnings.warn(
                    f"Test{prompt_idx}: same token ids but texts differ: {name_0}={str_0!r} {name_1}={str_1!r}",
                    stacklevel=2,
                )


def _check_prompt_logprobs_match(prompt_idx, prompt_logprobs_0, prompt_logprobs_1, name_0, name_1):
    if prompt_logprobs_0 is None or prompt_logprobs_1 is None:
        return
    for idx, (elem_0, elem_1) in enumerate(zip(prompt_logprobs_0, prompt_logprobs_1)):
        fail_msg = f"Prompt logprobs test{prompt_idx}, position {idx}:\n{name_0}:\t{elem_0}\n{name_1}:\t{elem_1}"
        if elem_0 is None:
            assert elem_1 is None, fail_msg
        else:
            assert elem_1 is not None, fail_msg
            assert set(elem_0) == set(elem_1), fail_msg
