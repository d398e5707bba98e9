"""Builds an engine's parts from EngineArgs: configs, tokenizer, weights, KV pool, runner.

The start-up log says what was loaded, the dtype, the KV pool in pages and tokens,
and the buckets compiled.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jllm.config import CacheConfig, CompilationConfig, ModelConfig, SchedulerConfig
from jllm.engine.arg_utils import EngineArgs
from jllm.layers.attention import AttentionBackend, default_attention_backend
from jllm.models.llama import DecoderSpec
from jllm.models.registry import resolve_model
from jllm.worker.buckets import pick_bucket, pow2_buckets
from jllm.worker.kv_cache import allocate_kv_caches, determine_num_blocks
from jllm.worker.model_runner import ModelRunner

logger = logging.getLogger("jllm")

_DTYPE_NAMES = {"half": "float16", "float16": "float16", "bfloat16": "bfloat16", "float": "float32",
                "float32": "float32"}


@dataclass
class EngineParts:
    model_config: ModelConfig
    scheduler_config: SchedulerConfig
    cache_config: CacheConfig
    compilation_config: CompilationConfig
    hf_config: object
    spec: DecoderSpec
    tokenizer: object | None
    generation_config: dict | None
    eos_token_id: int | None
    runner: ModelRunner


def on_accelerator() -> bool:
    return jax.default_backend() != "cpu"


def resolve_dtype(requested: str, hf_config, is_gguf: bool) -> str:
    """vLLM's rule: "auto" keeps the checkpoint's dtype, except that float32 checkpoints run
    in bfloat16 on an accelerator. On the CPU float32 stays float32 so tests can be exact.
    GGUF weights are dequantized to float32 and follow the same rule."""
    if requested != "auto":
        return _DTYPE_NAMES[requested]
    config_dtype = None if is_gguf else (getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None))
    name = str(config_dtype).replace("torch.", "") if config_dtype is not None else "float32"
    name = _DTYPE_NAMES.get(name, "float32")
    if name == "float32" and on_accelerator():
        return "bfloat16"
    return name


def resolve_max_model_len(requested: int | None, hf_config) -> int:
    derived = None
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if getattr(hf_config, key, None):
            derived = int(getattr(hf_config, key))
            derived_key = key
            break
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


def _enable_compilation_cache(cache_dir: str | None) -> None:
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def default_compilation_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "jllm", "xla_cache")


def build_engine_parts(args: EngineArgs) -> EngineParts:
    from jllm.models.model_loader import load_checkpoint, resolve_model_source
    from jllm.transformers_utils.config import get_config, get_generation_config
    from jllm.transformers_utils.tokenizer import get_tokenizer

    t0 = time.perf_counter()
    if args.trust_remote_code:
        logger.warning("trust_remote_code=True: jllm never runs code from a model repository; "
                       "only built-in architectures load.")
    model_path = resolve_model_source(args.model, args.revision)
    is_gguf = model_path.endswith(".gguf")
    hf_config = get_config(model_path, hf_overrides=args.hf_overrides, revision=args.revision,
                           trust_remote_code=args.trust_remote_code)
    model_cls, spec = resolve_model(hf_config)
    dtype = resolve_dtype(args.dtype, hf_config, is_gguf)
    max_model_len = resolve_max_model_len(args.max_model_len, hf_config)
    backend = (AttentionBackend(args.attention_backend) if args.attention_backend
               else default_attention_backend(jax.default_backend()))
    model_config = ModelConfig(
        model=model_path, tokenizer=args.tokenizer or model_path, tokenizer_mode=args.tokenizer_mode,
        skip_tokenizer_init=args.skip_tokenizer_init, dtype=dtype, max_model_len=max_model_len,
        seed=args.seed, load_format=args.load_format, max_logprobs=args.max_logprobs,
        generation_config=args.generation_config, attention_backend=backend.value, revision=args.revision,
        served_model_name=args.served_model_name or args.model,
    )
    tokenizer = None
    if not args.skip_tokenizer_init:
        tokenizer = get_tokenizer(model_config.tokenizer, tokenizer_mode=args.tokenizer_mode,
                                  trust_remote_code=args.trust_remote_code, revision=args.revision)
    generation_config = None
    if args.generation_config != "vllm":
        source = model_path if args.generation_config == "auto" else args.generation_config
        generation_config = get_generation_config(source)

    scheduler_config = _scheduler_config(args, max_model_len)
    compilation_config = _compilation_config(args, scheduler_config)
    _enable_compilation_cache(compilation_config.cache_dir)

    jdtype = jnp.dtype(dtype)
    model = model_cls(spec, jdtype, backend)
    params = load_checkpoint(model, spec, hf_config, model_path, args.load_format, jdtype, args.seed)
    t_load = time.perf_counter() - t0
    num_params = sum(x.size for x in jax.tree.leaves(params))
    logger.info("Loaded %s (%s, %.1fM parameters) in %s in %.1f s; attention backend %s.",
                model_path, ",".join(getattr(hf_config, "architectures", []) or []), num_params / 1e6,
                dtype, t_load, backend.value)

    block_size = args.block_size
    max_blocks_per_seq = -(-max_model_len // block_size)
    # Where lone prompt chunks run cuDNN, one over a cached prefix gathers the page table's
    # whole width of K/V (prefix_prefill_attention).
    prefix_gather_tokens = (max_blocks_per_seq * block_size
                            if _fresh_prefill_min_tokens(backend, jdtype) is not None else 0)
    activation_bytes = _activation_bytes(spec, scheduler_config, jdtype, prefix_gather_tokens)
    num_blocks = determine_num_blocks(
        spec, block_size=block_size, dtype=jdtype, max_model_len=max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        num_gpu_blocks_override=args.num_gpu_blocks_override, activation_bytes=activation_bytes,
    )
    cache_config = CacheConfig(block_size=block_size, num_gpu_blocks=num_blocks,
                               enable_prefix_caching=args.enable_prefix_caching,
                               prefix_caching_hash_algo=args.prefix_caching_hash_algo)
    kv_caches = allocate_kv_caches(spec, num_blocks, block_size, jdtype, scheduler_config.max_num_seqs)
    logger.info("KV cache: %d pages of %d tokens (%d tokens, %.2f GiB).", num_blocks, block_size,
                num_blocks * block_size,
                sum(c.k.nbytes + c.v.nbytes for c in kv_caches) / (1 << 30))

    # The Pallas kernels read only each sequence's real pages, so one page-table width
    # serves every batch; the reference path's cost grows with the width, so it buckets.
    if backend == AttentionBackend.PALLAS:
        page_buckets = (max_blocks_per_seq,)
    else:
        page_buckets = pow2_buckets(min(4, max_blocks_per_seq), max_blocks_per_seq)
    runner = ModelRunner(
        model=model, params=params, spec=spec, kv_caches=kv_caches, block_size=block_size,
        max_model_len=max_model_len, max_logprobs=max(args.max_logprobs, 0), hf_config=hf_config,
        token_buckets=compilation_config.token_buckets, page_buckets=page_buckets,
        max_num_seqs=scheduler_config.max_num_seqs, decode_kernel=backend == AttentionBackend.PALLAS,
        fresh_prefill_min_tokens=_fresh_prefill_min_tokens(backend, jdtype),
    )
    if not compilation_config.enforce_eager:
        capture_pages = pick_bucket(page_buckets, -(-min(compilation_config.max_seq_len_to_capture,
                                                          max_model_len) // block_size))
        shapes = [(t, p) for t in compilation_config.token_buckets for p in page_buckets if p <= capture_pages]
        seconds = runner.warmup(shapes)
        logger.info("Compiled %d step programs (token buckets %s, decode-only %s, fresh- and prefix-prefill %s, "
                    "page buckets %s) in %.1f s.",
                    runner.num_compiled_steps, list(compilation_config.token_buckets),
                    list(runner.builder.decode_token_buckets()), list(runner.builder.fresh_prefill_token_buckets()),
                    [p for p in page_buckets if p <= capture_pages], seconds)
    eos = _eos_token_id(hf_config, tokenizer, generation_config)
    return EngineParts(model_config, scheduler_config, cache_config, compilation_config, hf_config, spec,
                       tokenizer, generation_config, eos, runner)


def _fresh_prefill_min_tokens(backend: AttentionBackend, dtype) -> int | None:
    """From which token bucket a lone prompt chunk runs cuDNN's flash attention (over
    its cached prefix too, if it has one): on the GPU with the kernels in 16-bit (cuDNN's
    dtypes). 512 tokens: below it the paged kernel is within a few microseconds of a
    fresh prefill (scripts/results/kernels_*.json); over a prefix, cuDNN led from 1024
    tokens on (BUILD_NOTES.md, session 7)."""
    if backend != AttentionBackend.PALLAS or jax.default_backend() != "gpu":
        return None
    return 512 if dtype in (jnp.bfloat16, jnp.float16) else None


def _scheduler_config(args: EngineArgs, max_model_len: int) -> SchedulerConfig:
    # vLLM's offline defaults on a GPU; a smaller token budget on the CPU keeps steps short.
    default_tokens, default_seqs = (8192, 256) if on_accelerator() else (2048, 64)
    max_num_seqs = args.max_num_seqs or default_seqs
    max_num_batched_tokens = args.max_num_batched_tokens
    if max_num_batched_tokens is None:
        max_num_batched_tokens = max(default_tokens, max_num_seqs)
        if not args.enable_chunked_prefill:
            max_num_batched_tokens = max(max_num_batched_tokens, max_model_len)
    return SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                           max_model_len=max_model_len, enable_chunked_prefill=args.enable_chunked_prefill)


def _compilation_config(args: EngineArgs, sched: SchedulerConfig) -> CompilationConfig:
    cc = dict(args.compilation_config or {})
    unknown = set(cc) - {"cudagraph_capture_sizes", "token_buckets", "cache_dir"}
    if unknown:
        raise ValueError(f"Unknown compilation_config keys {sorted(unknown)}; "
                         "supported: cudagraph_capture_sizes, token_buckets, cache_dir.")
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


def _activation_bytes(spec: DecoderSpec, sched: SchedulerConfig, dtype, prefix_gather_tokens: int = 0) -> int:
    """A bound on the largest step's live activations: the widest intermediate per
    token plus the float32 logits of every sequence, with 2x headroom for XLA's temps;
    with `prefix_gather_tokens`, also a prefix-prefill step's gathered K/V of that many
    tokens and its three float32 [tokens, q heads, head_dim] outputs to merge."""
    itemsize = jnp.dtype(dtype).itemsize
    per_token = (3 * spec.hidden_size + 2 * spec.intermediate_size
                 + (spec.num_attention_heads + 2 * spec.num_key_value_heads) * spec.head_dim) * itemsize
    logits = min(sched.max_num_seqs, sched.max_num_batched_tokens) * spec.vocab_size * 4 * 3
    prefix = 0
    if prefix_gather_tokens:
        gather = 2 * prefix_gather_tokens * spec.num_key_value_heads * spec.head_dim * itemsize
        merge = 3 * sched.max_num_batched_tokens * spec.num_attention_heads * spec.head_dim * 4
        prefix = gather + merge
    return 2 * (sched.max_num_batched_tokens * per_token + logits + prefix)


def _eos_token_id(hf_config, tokenizer, generation_config) -> int | None:
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        return tokenizer.eos_token_id
    eos = getattr(hf_config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return eos
