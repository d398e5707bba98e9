"""The model's HF config and generation defaults, from a local folder, a GGUF file or the HF cache.

Everything is read from local files: AutoConfig runs with `local_files_only=True`, and model
code shipped with a repo (`auto_map`) is never executed, whatever `trust_remote_code` says.
"""

from __future__ import annotations

import json
import os
from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from jllm.models.loader.gguf_loader import gguf_generation_config, is_gguf_file, load_gguf_config
from jllm.models.loader.hf_cache import resolve_model_path


def get_config(
    model: str,
    hf_overrides: dict[str, Any] | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> PretrainedConfig:
    """The HF config of `model` (folder, .gguf file or cached repo id), with `hf_overrides` applied.

    `trust_remote_code` is accepted for vLLM compatibility but never runs a repo's code: a config
    that needs it is an error.
    """
    path = resolve_model_path(model, revision)
    if is_gguf_file(path):
        config = load_gguf_config(path)
    else:
        _refuse_remote_config_code(path)
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    if hf_overrides:
        config.update(hf_overrides)
    return config


def get_generation_config(model: str, revision: str | None = None) -> dict[str, Any] | None:
    """generation_config.json as a dict (or, for a GGUF, the ids and sampling defaults it states)."""
    path = resolve_model_path(model, revision)
    if is_gguf_file(path):
        return gguf_generation_config(path)
    return read_json(os.path.join(path, "generation_config.json"))


# generation_config.json keys that become SamplingParams defaults, as SamplingParams
# names (vLLM's list).
_GENERATION_CONFIG_FIELDS = {
    "repetition_penalty": "repetition_penalty",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "max_new_tokens": "max_tokens",
}


def get_diff_sampling_param(generation_config: dict[str, Any] | None) -> dict[str, Any]:
    """The SamplingParams defaults a model's generation config sets (vLLM's
    ModelConfig.get_diff_sampling_param); empty when there is none (generation_config="vllm")."""
    gen = generation_config or {}
    return {ours: gen[theirs] for theirs, ours in _GENERATION_CONFIG_FIELDS.items() if gen.get(theirs) is not None}


def read_json(path: str) -> dict[str, Any] | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def remote_code_error(path: str, what: str, reference: str) -> ValueError:
    return ValueError(
        f"{path!r} needs custom code from its repository ({reference}) to load its {what}. "
        "jllm never runs remote code, even with trust_remote_code=True; use a model whose "
        "architecture and tokenizer transformers supports natively."
    )


def _refuse_remote_config_code(folder: str) -> None:
    config = read_json(os.path.join(folder, "config.json")) or {}
    reference = (config.get("auto_map") or {}).get("AutoConfig")
    # A model_type transformers knows loads with its own class; the repo's code is then unused.
    if reference and config.get("model_type") not in CONFIG_MAPPING:
        raise remote_code_error(folder, "config", reference)
