"""Load the model's tokenizer (an HF fast tokenizer) from a local folder, a GGUF file or the HF cache.

Mirrors vLLM's `get_tokenizer`, minus everything that needs the network or a repo's own code.
"""

from __future__ import annotations

import os

from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

from jllm.models.loader.gguf_loader import is_gguf_file, load_gguf_tokenizer
from jllm.models.loader.hf_cache import resolve_model_path
from jllm.transformers_utils.config import read_json, remote_code_error

TOKENIZER_MODES = ("auto", "slow", "mistral")


def get_tokenizer(
    model: str,
    tokenizer: str | None = None,
    tokenizer_mode: str = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> PreTrainedTokenizerBase:
    """The tokenizer at `tokenizer` (default: `model`): a folder, a .gguf file or a cached repo id.

    tokenizer_mode "slow" asks for the Python tokenizer (transformers 5 may still give the fast
    one); "mistral" (mistral_common) is not supported. `trust_remote_code` never runs a repo's
    code: a tokenizer that needs it is an error.
    """
    if tokenizer_mode not in TOKENIZER_MODES:
        raise ValueError(f"Unknown tokenizer_mode {tokenizer_mode!r}; choose one of {TOKENIZER_MODES}.")
    if tokenizer_mode == "mistral":
        raise ValueError(
            "tokenizer_mode='mistral' (mistral_common tokenizers) is not supported by jllm; "
            "use tokenizer_mode='auto' with a model folder that has a tokenizer.json."
        )
    path = resolve_model_path(tokenizer or model, revision)
    if is_gguf_file(path):
        # A GGUF holds only what the fast tokenizer is built from, so there is no slow variant.
        return load_gguf_tokenizer(path)
    _refuse_remote_tokenizer_code(path)
    return AutoTokenizer.from_pretrained(
        path, use_fast=tokenizer_mode != "slow", local_files_only=True, trust_remote_code=False
    )


def _refuse_remote_tokenizer_code(folder: str) -> None:
    tokenizer_config = read_json(os.path.join(folder, "tokenizer_config.json")) or {}
    config = read_json(os.path.join(folder, "config.json")) or {}
    auto_map = tokenizer_config.get("auto_map") or (config.get("auto_map") or {}).get("AutoTokenizer")
    if isinstance(auto_map, dict):
        auto_map = auto_map.get("AutoTokenizer")
    if not auto_map:
        return
    # Named in the legacy list form: [slow class, fast class] as "module.Class" references.
    references = [auto_map] if isinstance(auto_map, str) else [ref for ref in auto_map if ref]
    # A tokenizer_class transformers ships makes the repo's code unused, as transformers decides.
    native_class = tokenizer_config.get("tokenizer_class")
    if native_class and tokenizer_class_from_name(native_class) is not None:
        return
    raise remote_code_error(folder, "tokenizer", ", ".join(references))
