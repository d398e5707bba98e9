"""A sentence-transformers folder's own settings: its pooling module and its max length.

sentence-transformers saves `modules.json` (the pipeline: Transformer, Pooling, maybe
Normalize), `1_Pooling/config.json` (which pooling) and `sentence_bert_config.json`
(`max_seq_length`, the length it truncates to). vLLM reads the same files to pool as
sentence-transformers does.
"""

from __future__ import annotations

import os
from typing import Any

from jllm.transformers_utils.config import read_json

_POOLING_MODULE = "sentence_transformers.models.Pooling"
_NORMALIZE_MODULE = "sentence_transformers.models.Normalize"
# 1_Pooling/config.json's switches, in the order sentence-transformers concatenates them.
_POOLING_MODES = {
    "pooling_mode_cls_token": "CLS",
    "pooling_mode_mean_tokens": "MEAN",
    "pooling_mode_lasttoken": "LAST",
}


def is_sentence_transformers_folder(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "modules.json"))


def get_pooling_config(folder: str) -> dict[str, Any] | None:
    """{"pooling_type", "normalize"} as the folder's modules say, or None when it has none.

    A Pooling module that combines several modes, or uses one jllm does not run (max,
    weighted mean), is an error rather than a silently different embedding."""
    modules = read_json(os.path.join(folder, "modules.json")) if os.path.isdir(folder) else None
    if not modules:
        return None
    kinds = {m.get("type"): m for m in modules}
    pooling = kinds.get(_POOLING_MODULE)
    if pooling is None:
        return None
    config = read_json(os.path.join(folder, pooling.get("path", ""), "config.json")) or {}
    chosen = [name for key, name in _POOLING_MODES.items() if config.get(key)]
    others = sorted(k for k, v in config.items() if k.startswith("pooling_mode_") and v and k not in _POOLING_MODES)
    if len(chosen) != 1 or others:
        raise ValueError(
            f"The sentence-transformers pooling of {folder!r} ({sorted(k for k, v in config.items() if v is True)}) "
            "is not supported: jllm pools by exactly one of CLS, MEAN or LAST."
        )
    return {"pooling_type": chosen[0], "normalize": _NORMALIZE_MODULE in kinds}


def get_sentence_transformer_config(folder: str) -> dict[str, Any] | None:
    """sentence_bert_config.json (max_seq_length, do_lower_case), if the folder has one."""
    if not os.path.isdir(folder):
        return None
    return read_json(os.path.join(folder, "sentence_bert_config.json"))
