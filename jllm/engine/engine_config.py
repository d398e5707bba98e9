"""The engine's configuration step: EngineArgs and the model's HF config resolved into
the frozen configs (dtype, context length, scheduler budget, compilation buckets)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from jllm.config import CompilationConfig, SchedulerConfig
from jllm.engine.arg_utils import EngineArgs
from jllm.layers.attention import AttentionBackend
from jllm.worker.buckets import pow2_buckets

_DTYPE_NAMES = {
    "half": "float16",
    "float16": "float16",
    "bfloat16": "bfloat16",
    "float": "float32",
    "float32": "float32",
}


def on_accelerator() -> bool:
    return jax.default_backend() != "cpu"


def resolve_dtype(requested: str, hf_config, is_gguf: bool) -> str:
    """vLLM's rule: "auto" keeps the checkpoint's dtype, except that float32 checkpoints run
    in bfloat16 on an accelerator. On the CPU float32 stays float32 so tests can be exact.
    GGUF weights are dequantized to float32 and follow the same rule."""
    if requested != "auto":
        return _DTYPE_NAMES[requested]
    # transformers 5 reads a config.json's torch_dtype into `dtype` (and warns on the old name).
    config_dtype = None if is_gguf else getattr(hf_config, "dtype", None)
    name = str(config_dtype).replace("torch.", "") if config_dtype is not None else "float32"
    name = _DTYPE_NAMES.get(name, "float32")
    if name == "float32" and on_accelerator():
        return "bfloat16"
    return name


def resolve_max_model_len(requested: int | None, hf_config, max_positions: int | None = None) -> int:
    """The user's max_model_len, checked against the model's, or the model's: its config's
    position limit, lowered to `max_positions` where the model takes fewer."""
    derived = None
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if getattr(hf_config, key, None):
            derived = int(getattr(hf_config, key))
            derived_key = key
            break
    if max_positions is not None and (derived is None or max_positions < derived):
        derived, derived_key = max_positions, "max_positions"
    if requested is None:
        if derived is None:
            raise ValueError("The model config has no max_position_embeddings; pass max_model_len.")
        return derived
    if derived is not None and requested > derived:
        raise ValueError(
            f"User-specified max_model_len ({requested}) is greater than the derived max_model_len "
            f"({derived_key}={derived} in model's config.json). This may lead to incorrect model outputs "
            "or CUDA errors. Decrease max_model_len, or raise the limit with "
            f"hf_overrides={{'{derived_key}': {requested}}} if you are sure."
        )
    return requested


def enable_compilation_cache(cache_dir: str | None) -> None:
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def default_compilation_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "jllm", "xla_cache")


def fresh_prefill_min_tokens(backend: AttentionBackend, dtype) -> int | None:
    """From which token bucket a lone prompt chunk runs cuDNN's flash attention (over
    its cached prefix too, if it has one): on the GPU with the kernels in 16-bit (cuDNN's
    dtypes). 512 tokens: below it the paged kernel is within a few microseconds of a
    fresh prefill; over a prefix, cuDNN led from 1024 tokens on (BUILD_NOTES.md,
    "Attention paths")."""
    if backend != AttentionBackend.PALLAS or jax.default_backend() != "gpu":
        return None
    return 512 if dtype in (jnp.bfloat16, jnp.float16) else None


def scheduler_config_from(args: EngineArgs, max_model_len: int, chunked_prefill: bool) -> SchedulerConfig:
    # vLLM's offline defaults on a GPU; a smaller token budget on the CPU keeps steps short.
    default_tokens, default_seqs = (8192, 256) if on_accelerator() else (2048, 64)
    max_num_seqs = args.max_num_seqs or default_seqs
    max_num_batched_tokens = args.max_num_batched_tokens
    if max_num_batched_tokens is None:
        max_num_batched_tokens = max(default_tokens, max_num_seqs)
        if not chunked_prefill:
            max_num_batched_tokens = max(max_num_batched_tokens, max_model_len)
    return SchedulerConfig(
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        enable_chunked_prefill=chunked_prefill,
    )


def compilation_config_from(args: EngineArgs, sched: SchedulerConfig) -> CompilationConfig:
    cc = dict(args.compilation_config or {})
    unknown = set(cc) - {"cudagraph_capture_sizes", "token_buckets", "cache_dir"}
    if unknown:
        raise ValueError(
            f"Unknown compilation_config keys {sorted(unknown)}; "
            "supported: cudagraph_capture_sizes, token_buckets, cache_dir."
        )
    token_buckets = sorted(set(cc.get("token_buckets") or ()) | set(cc.get("cudagraph_capture_sizes") or ()))
    if token_buckets:
        token_buckets = [t for t in token_buckets if t < sched.max_num_batched_tokens]
        token_buckets.append(sched.max_num_batched_tokens)
    else:
        token_buckets = list(pow2_buckets(min(16, sched.max_num_batched_tokens), sched.max_num_batched_tokens))
    return CompilationConfig(
        cudagraph_capture_sizes=tuple(cc.get("cudagraph_capture_sizes") or ()),
        token_buckets=tuple(token_buckets),
        max_seq_len_to_capture=args.max_seq_len_to_capture,
        # No CUDA graphs to stand in for on the CPU, where compiling every bucket up
        # front costs minutes: there shapes compile on first use unless asked otherwise.
        enforce_eager=(not on_accelerator()) if args.enforce_eager is None else args.enforce_eager,
        cache_dir=cc.get("cache_dir", default_compilation_cache_dir()),
    )
