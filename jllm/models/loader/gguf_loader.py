"""Load a llama.cpp GGUF file as HF-named float32 weights, an HF config and an HF tokenizer.

The goal is parity with transformers' own GGUF loading (`from_pretrained(..., gguf_file=...)`):
the same names, the same [out, in] layouts and bit-identical float32 values. Unlike transformers
it needs no torch: the metadata and tensors are read with the `gguf` package directly.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from typing import Any

import numpy as np
from gguf import GGUFReader, dequantize
from tqdm.auto import tqdm
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

# general.architecture -> (HF model_type, HF architecture class name).
SUPPORTED_ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),  # llama.cpp also writes Mistral and SmolLM2 as llama
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}

_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

# llama.cpp's special-token names -> transformers' (`tokenizer.ggml.unknown_token_id` -> unk_token_id).
_SPECIAL_TOKENS = {"bos": "bos", "eos": "eos", "unknown": "unk", "padding": "pad"}

_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_TOP_TENSOR = re.compile(r"^(\w+)\.(weight|bias)$")


def is_gguf_file(path: str) -> bool:
    return path.endswith(".gguf") and os.path.isfile(path)


def hf_tensor_name(gguf_name: str) -> str | None:
    """The transformers name of a llama.cpp tensor, or None for tensors HF models have no use for."""
    if m := _LAYER_TENSOR.match(gguf_name):
        layer, leaf, kind = m.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[leaf]}.{kind}" if leaf in _LAYER_NAMES else None
    if m := _TOP_TENSOR.match(gguf_name):
        leaf, kind = m.groups()
        return f"{_TOP_LEVEL_NAMES[leaf]}.{kind}" if leaf in _TOP_LEVEL_NAMES else None
    return None


def read_gguf_metadata(path: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    """(metadata as plain Python values, tensor names); cached and shared, so never modify it.

    Cached because parsing the vocabulary takes seconds and config, tokenizer and weights all ask.
    """
    stat = os.stat(path)
    return _read_gguf_metadata(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _read_gguf_metadata(path: str, mtime_ns: int, size: int) -> tuple[dict[str, Any], tuple[str, ...]]:
    reader = GGUFReader(path)
    metadata = {key: field.contents() for key, field in reader.fields.items()}
    return metadata, tuple(tensor.name for tensor in reader.tensors)


def gguf_architecture(metadata: dict[str, Any]) -> str:
    arch = metadata["general.architecture"]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; jllm loads {sorted(SUPPORTED_ARCHITECTURES)}.")
    return arch


def gguf_config_dict(metadata: dict[str, Any], tensor_names: tuple[str, ...]) -> dict[str, Any]:
    """The transformers config kwargs that the GGUF metadata states (llama.cpp key names)."""
    arch = gguf_architecture(metadata)
    model_type, hf_arch = SUPPORTED_ARCHITECTURES[arch]
    key = lambda name, default=None: metadata.get(f"{arch}.{name}", default)  # noqa: E731
    hidden_size, num_heads = key("embedding_length"), key("attention.head_count")
    config = {
        "model_type": model_type,
        "architectures": [hf_arch],
        "hidden_size": hidden_size,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": key("attention.head_count_kv", num_heads),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": key("context_length"),
        # Older files state no vocab_size; the vocabulary itself is authoritative.
        "vocab_size": key("vocab_size") or len(metadata["tokenizer.ggml.tokens"]),
        # llama.cpp writes the output projection only when it is not the embedding matrix.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        # key_length is the true head size (Qwen3's differs from hidden/heads); for llama,
        # transformers reads the rotary width, which equals it there.
        "head_dim": key("attention.key_length")
        or (key("rope.dimension_count") if arch == "llama" else None)
        or hidden_size // num_heads,
    }
    if (rope_theta := key("rope.freq_base")) is not None:
        config["rope_theta"] = rope_theta
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    for gguf_name, hf_name in _SPECIAL_TOKENS.items():
        if (token_id := metadata.get(f"tokenizer.ggml.{gguf_name}_token_id")) is not None:
            config[f"{hf_name}_token_id"] = token_id
    if key("rope.scaling.type", "none") != "none":
        # transformers' GGUF loader drops these as well; say so rather than run silently off.
        logger.warning("GGUF rope scaling (%s) is ignored, as by transformers.", key("rope.scaling.type"))
    return config


def load_gguf_config(path: str) -> PretrainedConfig:
    """An HF config (LlamaConfig, Qwen2Config, ...) built from the file's metadata."""
    metadata, tensor_names = read_gguf_metadata(path)
    config_dict = gguf_config_dict(metadata, tensor_names)
    config = AutoConfig.for_model(**config_dict)
    config.name_or_path = path
    return config


def load_gguf_weights(path: str, use_tqdm: bool = True) -> dict[str, np.ndarray]:
    """{hf_name: float32 array in HF layout} for every tensor an HF model of this file would load."""
    metadata, _ = read_gguf_metadata(path)
    arch = gguf_architecture(metadata)
    num_heads = metadata[f"{arch}.attention.head_count"]
    num_kv_heads = metadata.get(f"{arch}.attention.head_count_kv", num_heads)
    reader = GGUFReader(path)
    weights, skipped = {}, []
    for tensor in tqdm(reader.tensors, desc="Dequantizing GGUF tensors", disable=not use_tqdm):
        name = hf_tensor_name(tensor.name)
        if name is None:
            skipped.append(tensor.name)
            continue
        # GGUF lists dims fastest-first (ggml's ne); reversed they are numpy's [out, in].
        shape = tuple(reversed(tensor.shape.tolist()))
        array = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        if arch == "llama" and ".attn_q." in tensor.name:
            array = reverse_permute_qk(array, num_heads)
        elif arch == "llama" and ".attn_k." in tensor.name:
            array = reverse_permute_qk(array, num_kv_heads)
        # A copy in any case: F32 tensors come back as views into the file's memory map.
        weights[name] = np.array(array, dtype=np.float32)
    if skipped:
        logger.warning("Skipped GGUF tensors with no transformers counterpart: %s", skipped)
    return weights


def reverse_permute_qk(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation for its interleaved rotary embedding.

    convert_hf_to_gguf.py reorders each head's rows from HF's "rotate half" layout (first half,
    second half) to adjacent pairs (x0, y0, x1, y1, ...), which ggml's rope rotates. Swapping the
    pair axis back gives HF's layout; this is transformers' `_reverse_permute_weights`, op for op.
    """
    half_head_dim = weights.shape[0] // num_heads // 2
    per_head = weights.reshape(num_heads, half_head_dim, 2, *weights.shape[1:])
    return per_head.swapaxes(2, 1).reshape(weights.shape)


def load_gguf_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """The tokenizer the file's metadata describes, with its chat template, as transformers builds it.

    transformers' own path (`AutoTokenizer.from_pretrained(..., gguf_file=...)`) reads the file
    through torch; this feeds the same converter from metadata read by the `gguf` package.
    """
    # Imported on use: it pulls in several of transformers' tokenizer classes.
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    metadata, _ = read_gguf_metadata(path)
    tokenizer_dict, tokenizer_config = (
        {name: metadata[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in metadata}
        for renames in (GGUF_TOKENIZER_MAPPING["tokenizer"], GGUF_TOKENIZER_MAPPING["tokenizer_config"])
    )
    # As transformers' get_gguf_tokenizer: llama.cpp adds BOS to a sentencepiece vocabulary
    # that does not say otherwise.
    if tokenizer_dict.get("tokenizer_type") == "llama":
        tokenizer_config.setdefault("add_bos_token", True)
    for gguf_name, hf_name in _SPECIAL_TOKENS.items():
        token_id = metadata.get(f"tokenizer.ggml.{gguf_name}_token_id")
        token = tokenizer_dict["tokens"][token_id] if token_id is not None else None
        tokenizer_config[f"{hf_name}_token"] = token
    backend, extra_kwargs = convert_gguf_tokenizer(metadata["general.architecture"], tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, name_or_path=path, **tokenizer_config, **extra_kwargs)


# generation_config.json keys -> the general.sampling.* keys llama.cpp's converter writes them to.
_GENERATION_KEYS = {
    "temperature": "temp",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "repetition_penalty": "penalty_repeat",
}


def gguf_generation_config(path: str) -> dict[str, Any] | None:
    """What a generation_config.json would say, from the file's token ids and sampling defaults."""
    metadata, _ = read_gguf_metadata(path)
    generation_config = {
        f"{hf_name}_token_id": metadata[f"tokenizer.ggml.{gguf_name}_token_id"]
        for gguf_name, hf_name in _SPECIAL_TOKENS.items()
        if hf_name in ("bos", "eos", "pad") and f"tokenizer.ggml.{gguf_name}_token_id" in metadata
    }
    for hf_key, gguf_key in _GENERATION_KEYS.items():
        if (value := metadata.get(f"general.sampling.{gguf_key}")) is not None:
            generation_config[hf_key] = value
    return generation_config or None
