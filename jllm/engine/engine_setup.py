"""Builds an engine's parts from EngineArgs, in named steps: configuration, loading
(tokenizer and weights), memory planning (the KV pool), the runner, and warm-up.

The start-up log says what was loaded, the dtype, the KV pool in pages and tokens,
and the buckets compiled.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jllm.config import CacheConfig, CompilationConfig, ModelConfig, ParallelConfig, SchedulerConfig
from jllm.distributed.initialize import initialize_distributed
from jllm.distributed.mesh import make_mesh, num_kv_cache_heads, verify_tensor_parallel
from jllm.engine.arg_utils import EngineArgs
from jllm.engine.engine_config import (
    compilation_config_from,
    enable_compilation_cache,
    fresh_prefill_min_tokens,
    resolve_dtype,
    resolve_max_model_len,
    scheduler_config_from,
)
from jllm.engine.task_config import ModelTask, resolve_model_task
from jllm.layers.attention import AttentionBackend, default_attention_backend
from jllm.layers.quantization import get_quantization_config
from jllm.models.interface import ModelFamily, ModelShape
from jllm.models.registry import resolve_architecture
from jllm.worker.buckets import pick_bucket, pow2_buckets
from jllm.worker.kv_cache import activation_bytes, allocate_kv_caches, determine_num_blocks
from jllm.worker.model_runner import ModelRunner
from jllm.worker.pooling_runner import PoolingModelRunner

logger = logging.getLogger("jllm")


@dataclass
class EngineParts:
    model_config: ModelConfig
    scheduler_config: SchedulerConfig
    cache_config: CacheConfig
    compilation_config: CompilationConfig
    parallel_config: ParallelConfig
    hf_config: object
    spec: ModelShape
    tokenizer: object | None
    generation_config: dict | None
    eos_token_id: int | None
    runner: ModelRunner | PoolingModelRunner


@dataclass(frozen=True)
class _Configs:
    """What the configuration step resolves before anything is loaded."""

    model_config: ModelConfig
    scheduler_config: SchedulerConfig
    compilation_config: CompilationConfig
    parallel_config: ParallelConfig
    hf_config: object
    family: ModelFamily
    task: ModelTask
    spec: ModelShape
    backend: AttentionBackend
    # This replica's devices, the tensor-parallel axis.
    mesh: Mesh

    @property
    def dtype(self):
        return jnp.dtype(self.model_config.dtype)

    @property
    def fresh_prefill_min_tokens(self) -> int | None:
        return fresh_prefill_min_tokens(self.backend, self.dtype)

    @property
    def pooling(self) -> bool:
        return self.task.pooling


def build_engine_parts(args: EngineArgs) -> EngineParts:
    """The engine's parts. In a multi-host run, only process 0 returns: the others replay
    its device steps until it shuts down, then exit (`follow_leader`)."""
    t0 = time.perf_counter()
    initialize_distributed(args.nnodes, args.node_rank, args.master_addr, args.master_port)
    configs = create_configs(args)
    tokenizer, generation_config = load_tokenizer(args, configs)
    model, params, constants = load_model(args, configs)
    logger.info(
        "Loaded %s (%s, %.1fM parameters) in %s in %.1f s; attention backend %s.",
        configs.model_config.model,
        ",".join(getattr(configs.hf_config, "architectures", []) or []),
        sum(x.size for x in jax.tree.leaves(params)) / 1e6,
        configs.model_config.dtype,
        time.perf_counter() - t0,
        configs.backend.value,
    )
    cache_config = plan_kv_cache(args, configs)
    runner = create_runner(configs, cache_config, model, params, constants)
    if not configs.compilation_config.enforce_eager:
        warm_up(runner, configs)
    if jax.process_index() != 0:
        follow_leader(runner)
    eos = _eos_token_id(configs.hf_config, tokenizer, generation_config)
    # As vLLM does after start-up: the objects alive now (JAX, transformers, the model's
    # host copies) live as long as the engine, and the collector's full passes over them
    # took most of the host time of admitting thousands of requests (BUILD_NOTES.md).
    gc.collect()
    gc.freeze()
    return EngineParts(
        configs.model_config,
        configs.scheduler_config,
        cache_config,
        configs.compilation_config,
        configs.parallel_config,
        configs.hf_config,
        configs.spec,
        tokenizer,
        generation_config,
        eos,
        runner,
    )


def follow_leader(runner: ModelRunner | PoolingModelRunner) -> None:
    """A process other than 0 of a multi-host run: replays process 0's steps, then exits
    with it (vLLM's headless nodes)."""
    logger.info("Process %d runs process 0's engine steps until it shuts down.", jax.process_index())
    runner.follow()
    raise SystemExit(0)


def create_configs(args: EngineArgs) -> _Configs:
    """Step 1: the model's source and HF config, and the frozen configs resolved from them."""
    from jllm.models.model_loader import resolve_model_source
    from jllm.transformers_utils.config import get_config

    if args.trust_remote_code:
        logger.warning(
            "trust_remote_code=True: jllm never runs code from a model repository; only built-in architectures load."
        )
    model_path = resolve_model_source(args.model, args.revision)
    hf_config = get_config(
        model_path, hf_overrides=args.hf_overrides, revision=args.revision, trust_remote_code=args.trust_remote_code
    )
    architecture, family, native_head = resolve_architecture(hf_config)
    task = resolve_model_task(
        architecture=architecture,
        family=family,
        native_head=native_head,
        hf_config=hf_config,
        model_path=model_path,
        runner=args.runner,
        convert=args.convert,
        task=args.task,
        pooler_config=args.resolved_pooler_config(),
    )
    spec = family.build_spec(hf_config, task.head)
    quant_config = get_quantization_config(hf_config, args.quantization)
    if quant_config is not None:
        if "quant_config" not in {f.name for f in dataclasses.fields(spec)}:
            raise ValueError(f"{architecture} does not support {quant_config.get_name()} quantization yet.")
        spec = dataclasses.replace(spec, quant_config=quant_config)
    parallel_config = args.parallel_config()
    verify_tensor_parallel(spec.num_attention_heads, spec.num_key_value_heads, args.tensor_parallel_size)
    mesh = make_mesh(parallel_config)
    dtype = resolve_dtype(args.dtype, hf_config, model_path.endswith(".gguf"))
    max_model_len = resolve_max_model_len(args.max_model_len, hf_config, _max_positions(family, hf_config, model_path))
    backend = (
        AttentionBackend(args.attention_backend)
        if args.attention_backend
        else default_attention_backend(jax.default_backend())
    )
    model_config = ModelConfig(
        model=model_path,
        tokenizer=args.tokenizer or model_path,
        tokenizer_mode=args.tokenizer_mode,
        skip_tokenizer_init=args.skip_tokenizer_init,
        dtype=dtype,
        max_model_len=max_model_len,
        seed=args.seed,
        load_format=args.load_format,
        max_logprobs=args.max_logprobs,
        generation_config=args.generation_config,
        attention_backend=backend.value,
        revision=args.revision,
        served_model_name=args.served_model_name or args.model,
        runner_type=task.runner_type,
        convert_type=task.convert_type,
        supported_tasks=task.supported_tasks,
        pooler_config=task.pooler_config,
        architecture=architecture,
        is_cross_encoder=task.is_cross_encoder,
        num_labels=task.num_labels,
        is_matryoshka=bool(
            getattr(hf_config, "is_matryoshka", False) or getattr(hf_config, "matryoshka_dimensions", None)
        ),
        matryoshka_dimensions=tuple(getattr(hf_config, "matryoshka_dimensions", None) or ()) or None,
    )
    # A pooling request runs whole in one step and keeps nothing afterwards: no chunking,
    # nothing to share through the prefix cache (vLLM's settings for pooling models).
    scheduler_config = scheduler_config_from(
        args, max_model_len, chunked_prefill=not task.pooling and args.enable_chunked_prefill
    )
    compilation_config = compilation_config_from(args, scheduler_config)
    enable_compilation_cache(compilation_config.cache_dir)
    return _Configs(
        model_config,
        scheduler_config,
        compilation_config,
        parallel_config,
        hf_config,
        family,
        task,
        spec,
        backend,
        mesh,
    )


def _max_positions(family: ModelFamily, hf_config, model_path: str) -> int | None:
    """The longest input the model takes where its config's max_position_embeddings does not
    say it: the family's own rule, or a sentence-transformers folder's max_seq_length (the
    length sentence-transformers truncates to, as vLLM reads it)."""
    from jllm.transformers_utils.sentence_transformers import get_sentence_transformer_config

    st_config = get_sentence_transformer_config(model_path) or {}
    limits = [n for n in (family.max_positions(hf_config), st_config.get("max_seq_length")) if n]
    return min(limits) if limits else None


def load_tokenizer(args: EngineArgs, configs: _Configs) -> tuple[object | None, dict | None]:
    """Step 2a: the tokenizer (None with skip_tokenizer_init) and the generation config."""
    from jllm.transformers_utils.config import get_generation_config
    from jllm.transformers_utils.tokenizer import get_tokenizer

    model_config = configs.model_config
    tokenizer = None
    if not args.skip_tokenizer_init:
        tokenizer = get_tokenizer(
            model_config.tokenizer,
            tokenizer_mode=args.tokenizer_mode,
            trust_remote_code=args.trust_remote_code,
            revision=args.revision,
        )
    generation_config = None
    if args.generation_config != "vllm":
        source = model_config.model if args.generation_config == "auto" else args.generation_config
        generation_config = get_generation_config(source)
    return tokenizer, generation_config


def load_model(args: EngineArgs, configs: _Configs):
    """Step 2b: the Flax model, its weights on the device, and the family's constant tables."""
    from jllm.models.model_loader import load_checkpoint

    family = configs.family
    model = family.module(configs.spec, configs.dtype, configs.backend, mesh=configs.mesh)
    constants = family.constants(configs.spec, configs.hf_config, configs.model_config.max_model_len)
    params = load_checkpoint(
        family,
        model,
        configs.spec,
        constants,
        configs.model_config.model,
        args.load_format,
        configs.dtype,
        args.seed,
        configs.mesh,
    )
    return model, params, constants


def plan_kv_cache(args: EngineArgs, configs: _Configs) -> CacheConfig:
    """Step 3: how many KV pages fit beside the weights and the largest step's activations.

    A pooling model keeps no KV cache: its pages are only the scheduler's count of a step's
    tokens (enough for a full step of whole prompts), with no device memory behind them."""
    block_size = args.block_size
    max_model_len = configs.model_config.max_model_len
    if configs.pooling:
        sched = configs.scheduler_config
        return CacheConfig(
            block_size=block_size,
            num_gpu_blocks=-(-sched.max_num_batched_tokens // block_size) + sched.max_num_seqs,
            enable_prefix_caching=False,
            prefix_caching_hash_algo=args.prefix_caching_hash_algo,
        )
    # Where lone prompt chunks run cuDNN, one over a cached prefix gathers the page table's
    # whole width of K/V (prefix_prefill_attention).
    prefix_gather_tokens = (
        -(-max_model_len // block_size) * block_size if configs.fresh_prefill_min_tokens is not None else 0
    )
    num_blocks = determine_num_blocks(
        configs.spec,
        block_size=block_size,
        dtype=configs.dtype,
        max_model_len=max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        num_gpu_blocks_override=args.num_gpu_blocks_override,
        activation_bytes=activation_bytes(configs.spec, configs.scheduler_config, configs.dtype, prefix_gather_tokens),
        mesh=configs.mesh,
    )
    if jax.process_count() > 1:
        # Every process must allocate the same pool: the one the least free memory allows.
        num_blocks = int(multihost_utils.process_allgather(np.int32(num_blocks)).min())
    return CacheConfig(
        block_size=block_size,
        num_gpu_blocks=num_blocks,
        enable_prefix_caching=args.enable_prefix_caching,
        prefix_caching_hash_algo=args.prefix_caching_hash_algo,
    )


def create_runner(configs: _Configs, cache_config: CacheConfig, model, params, constants):
    """Step 4: the KV pool allocated and the runner around it, with its page buckets (or,
    for a pooling model, the pooling runner, which keeps no pool)."""
    spec, block_size = configs.spec, cache_config.block_size
    if configs.pooling:
        return PoolingModelRunner(
            model=model,
            params=params,
            spec=spec,
            constants=constants,
            max_model_len=configs.model_config.max_model_len,
            max_num_seqs=configs.scheduler_config.max_num_seqs,
            token_buckets=configs.compilation_config.token_buckets,
            pooler_config=configs.model_config.pooler_config,
            uses_token_types=configs.family.is_encoder,
            mesh=configs.mesh,
        )
    mesh = configs.mesh
    kv_caches = allocate_kv_caches(
        spec, cache_config.num_gpu_blocks, block_size, configs.dtype, configs.scheduler_config.max_num_seqs, mesh
    )
    logger.info(
        "KV cache: %d pages of %d tokens (%d tokens, %.2f GiB per device over %d).",
        cache_config.num_gpu_blocks,
        block_size,
        cache_config.num_gpu_blocks * block_size,
        sum(c.k.nbytes + c.v.nbytes for c in kv_caches) / mesh.size / (1 << 30),
        mesh.size,
    )
    return ModelRunner(
        model=model,
        params=params,
        spec=spec,
        kv_caches=kv_caches,
        block_size=block_size,
        max_logprobs=max(configs.model_config.max_logprobs, 0),
        constants=constants,
        token_buckets=configs.compilation_config.token_buckets,
        page_buckets=_page_buckets(configs.backend, -(-configs.model_config.max_model_len // block_size)),
        max_num_seqs=configs.scheduler_config.max_num_seqs,
        decode_kernel=configs.backend == AttentionBackend.PALLAS,
        fresh_prefill_min_tokens=configs.fresh_prefill_min_tokens,
        mesh=mesh,
        num_queries_per_kv=spec.num_attention_heads // num_kv_cache_heads(spec.num_key_value_heads, mesh),
    )


def _page_buckets(backend: AttentionBackend, max_blocks_per_seq: int) -> tuple[int, ...]:
    # The Pallas kernels read only each sequence's real pages, so one page-table width
    # serves every batch; the reference path's cost grows with the width, so it buckets.
    if backend == AttentionBackend.PALLAS:
        return (max_blocks_per_seq,)
    return pow2_buckets(min(4, max_blocks_per_seq), max_blocks_per_seq)


def warm_up(runner: ModelRunner | PoolingModelRunner, configs: _Configs) -> None:
    """Step 5: every step program a request can need, compiled before the first one."""
    compilation_config = configs.compilation_config
    if isinstance(runner, PoolingModelRunner):
        seconds = runner.warmup()
        logger.info(
            "Compiled %d pooling step programs (token buckets %s, length buckets %s) in %.1f s.",
            runner.num_compiled_steps,
            list(runner.token_buckets),
            list(runner.length_buckets),
            seconds,
        )
        return
    page_buckets = runner.builder.page_buckets
    capture_pages = pick_bucket(
        page_buckets,
        -(-min(compilation_config.max_seq_len_to_capture, configs.model_config.max_model_len) // runner.block_size),
    )
    shapes = [(t, p) for t in compilation_config.token_buckets for p in page_buckets if p <= capture_pages]
    seconds = runner.warmup(shapes)
    logger.info(
        "Compiled %d step programs (token buckets %s, decode-only %s, fresh- and prefix-prefill %s, "
        "page buckets %s) in %.1f s.",
        runner.num_compiled_steps,
        list(compilation_config.token_buckets),
        list(runner.planner.decode_token_buckets()),
        list(runner.planner.fresh_prefill_token_buckets()),
        [p for p in page_buckets if p <= capture_pages],
        seconds,
    )


def _eos_token_id(hf_config, tokenizer, generation_config) -> int | None:
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        return tokenizer.eos_token_id
    eos = getattr(hf_config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return eos
