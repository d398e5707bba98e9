"""The one place that lists the architectures jllm runs: HF `architectures` name ->
(family file under jllm/models/, the head the checkpoint carries).

The head says what the architecture is natively: "lm" generates; "embed",
"classify" and "reward" are pooling models (jllm/engine/task_config.py turns that,
and the user's runner/convert/task, into what the engine runs).
"""

from __future__ import annotations

import importlib

from jllm.models.interface import ModelFamily, ModelHead

_MODELS: dict[str, tuple[str, ModelHead]] = {
    "LlamaForCausalLM": ("llama", ModelHead.LM),
    "MistralForCausalLM": ("llama", ModelHead.LM),
    "Qwen2ForCausalLM": ("llama", ModelHead.LM),
    "Qwen3ForCausalLM": ("llama", ModelHead.LM),
    "LlamaModel": ("llama", ModelHead.EMBED),
    "Qwen2Model": ("llama", ModelHead.EMBED),
    "Qwen3Model": ("llama", ModelHead.EMBED),
    "LlamaForSequenceClassification": ("llama", ModelHead.CLASSIFY),
    "Qwen2ForSequenceClassification": ("llama", ModelHead.CLASSIFY),
    "Qwen3ForSequenceClassification": ("llama", ModelHead.CLASSIFY),
    "Qwen2ForRewardModel": ("llama", ModelHead.REWARD),
    "OPTForCausalLM": ("opt", ModelHead.LM),
    "GPT2LMHeadModel": ("gpt2", ModelHead.LM),
    "BertModel": ("bert", ModelHead.EMBED),
    "BertForSequenceClassification": ("bert", ModelHead.CLASSIFY),
    "XLMRobertaModel": ("bert", ModelHead.EMBED),
    "XLMRobertaForSequenceClassification": ("bert", ModelHead.CLASSIFY),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def resolve_architecture(hf_config) -> tuple[str, ModelFamily, ModelHead]:
    """(the architecture, its family, its native head) for the config's first supported one."""
    architectures = list(getattr(hf_config, "architectures", None) or [])
    for arch in architectures:
        if arch in _MODELS:
            family_name, head = _MODELS[arch]
            family = importlib.import_module(f"jllm.models.{family_name}").FAMILY
            return arch, family, head
    raise ValueError(
        f"Model architectures {architectures} are not supported for now. "
        f"Supported architectures: {supported_architectures()}"
    )
