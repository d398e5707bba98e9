"""EngineArgs: every engine argument, its vLLM default, and its --kebab-case flag.

Config flows one way: EngineArgs -> frozen config records (jllm/config.py) -> parts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from jllm.config import CONVERT_TYPES, RUNNER_TYPES, TASKS, ParallelConfig, PoolerConfig
from jllm.core.block_hash import PREFIX_CACHING_HASH_ALGOS

_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
_ATTENTION_BACKENDS = ("reference", "pallas")
_LOAD_FORMATS = ("auto", "safetensors", "gguf", "orbax", "dummy")
_TOKENIZER_MODES = ("auto", "slow", "mistral")

_HELP = {
    "model": "Name or path of the model: an HF folder, a .gguf file, or a repo id in the local HF cache.",
    "tokenizer": "Name or path of the tokenizer; defaults to the model.",
    "tokenizer_mode": "'auto' uses the fast tokenizer, 'slow' the Python one.",
    "skip_tokenizer_init": "Skip the tokenizer; prompts must then be token ids.",
    "trust_remote_code": "Accepted for compatibility; jllm never runs remote code.",
    "dtype": "Weights and activations dtype. 'auto': the checkpoint's dtype, except that float32 "
    "checkpoints run in bfloat16 on GPU.",
    "seed": "Random seed of the engine.",
    "revision": "Model revision (a ref or commit in the local HF cache).",
    "max_model_len": "Context length; defaults to the model's.",
    "hf_overrides": "JSON dict of values that override the HF config.",
    "load_format": "'auto' reads what the model folder holds (a `jllm convert` folder restores shard by shard); "
    "'dummy' loads random weights at the real shapes (benchmarks).",
    "block_size": "Tokens per KV-cache page.",
    "enable_prefix_caching": "Reuse KV pages of identical prompt prefixes.",
    "prefix_caching_hash_algo": "How a page's prefix is hashed: 'sha256' (a canonical encoding) or 'sha256_cbor' "
    "(canonical CBOR, reproducible in other languages).",
    "gpu_memory_utilization": "Fraction of accelerator memory the engine may use.",
    "kv_cache_memory_bytes": "Bytes for the KV cache, instead of gpu_memory_utilization.",
    "num_gpu_blocks_override": "Number of KV pages, overriding the memory-based size.",
    "max_num_batched_tokens": "Tokens per engine step.",
    "max_num_seqs": "Sequences per engine step.",
    "enable_chunked_prefill": "Split long prompts across steps.",
    "enforce_eager": "Compile shapes lazily on first use; no warm-up (default on the CPU).",
    "max_seq_len_to_capture": "Context length up to which decode shapes are precompiled.",
    "compilation_config": "JSON dict: cudagraph_capture_sizes, token_buckets, cache_dir.",
    "max_logprobs": "The most logprobs a request may ask for (-1: no limit).",
    "generation_config": "'auto' reads generation_config.json, 'vllm' ignores it, or a folder.",
    "attention_backend": "'reference' (plain jnp) or 'pallas' (GPU kernels); default by platform.",
    "disable_log_stats": "Do not log engine statistics.",
    "served_model_name": "The model name reported in outputs and the API.",
    "runner": "'generate' (text generation), 'pooling' (embeddings, classification, scores, rewards), or 'auto': "
    "by the architecture.",
    "convert": "How a generative model is used for pooling: 'embed', 'classify', 'reward', 'none', or 'auto'.",
    "task": "The older way to say runner and convert: 'generate', 'embed', 'classify', 'score', 'reward' or 'auto'.",
    "pooler_config": "JSON dict overriding the pooler: pooling_type (CLS, MEAN, LAST, ALL), normalize, dimensions, "
    "use_activation.",
    "override_pooler_config": "The older name of pooler_config.",
    "tensor_parallel_size": "Devices each model's weights and KV pages are split over (heads, ffn columns, "
    "vocabulary).",
    "pipeline_parallel_size": "Pipeline stages; not supported yet (1 only).",
    "data_parallel_size": "Engine replicas, each on its own tensor_parallel_size devices; requests are spread "
    "over them.",
    "data_parallel_rank": "Which replica this engine is (its devices are the rank-th group); set by jllm itself "
    "when it starts data_parallel_size replicas.",
    "nnodes": "Processes (hosts) of a multi-host run; each runs the same command with its own --node-rank, "
    "and process 0 serves.",
    "node_rank": "This process's rank in a multi-host run; default: from the cluster environment "
    "(SLURM, Open MPI, Kubernetes JobSet), as jax.distributed reads it.",
    "master_addr": "Host of process 0 (jax.distributed's coordinator); default: from the cluster environment.",
    "master_port": "Coordinator port on master_addr (default 29501).",
    "distributed_executor_backend": "vLLM's executor for several devices. jllm drives every local device from "
    "one process ('mp' and 'uni' are accepted as that) and other hosts through jax.distributed.",
    "quantization": "Quantization method of the weights: 'awq' or 'gptq' (default: the checkpoint's "
    "quantization_config); the weights stay quantized on the device.",
    "kv_cache_dtype": "KV cache dtype; 'auto' (the model's dtype) only, for now.",
    "swap_space": "GiB of CPU swap per GPU. As in vLLM's V1 engine, preemption recomputes and never swaps, "
    "so the value is checked and has no effect.",
    "cpu_offload_gb": "GiB of weights kept in CPU memory; 0 only, for now.",
    "speculative_config": "JSON dict for speculative decoding; not supported yet.",
    "enable_lora": "Serve LoRA adapters; not supported yet.",
    "scheduling_policy": "'fcfs' (first come, first served) only, for now.",
    "enable_sleep_mode": "Allow the engine to release its memory while asleep; not supported yet.",
    "async_scheduling": "Schedule step t+1 while step t runs; not supported yet.",
}

# vLLM arguments jllm takes so that vLLM's programs run, but honours only at the values
# listed: anything else is refused by name (never a TypeError, never ignored).
_ONLY_AT = {
    "pipeline_parallel_size": (
        (1,),
        "pipeline parallelism is not supported yet; use tensor_parallel_size to split a model over devices",
    ),
    "distributed_executor_backend": (
        (None, "uni", "mp"),
        "jllm drives the local devices from one process and other hosts through jax.distributed, never Ray",
    ),
    "quantization": ((None, "awq", "gptq"), "only AWQ and GPTQ checkpoints are supported so far"),
    "kv_cache_dtype": (("auto",), "the KV cache is kept in the model's dtype for now"),
    "cpu_offload_gb": ((0,), "weights are not offloaded to the CPU"),
    "speculative_config": ((None,), "speculative decoding is not supported yet"),
    "enable_lora": ((False,), "LoRA adapters are not supported yet"),
    "scheduling_policy": (("fcfs",), "only first-come-first-served scheduling exists for now"),
    "enable_sleep_mode": ((False,), "sleep mode is not supported yet"),
    "async_scheduling": ((False, None), "async scheduling is not supported yet"),
}


@dataclass
class EngineArgs:
    model: str | None = None
    tokenizer: str | None = None
    tokenizer_mode: str = "auto"
    skip_tokenizer_init: bool = False
    trust_remote_code: bool = False
    dtype: str = "auto"
    seed: int = 0
    revision: str | None = None
    max_model_len: int | None = None
    hf_overrides: dict[str, Any] | None = None
    load_format: str = "auto"
    block_size: int = 16
    enable_prefix_caching: bool = True
    prefix_caching_hash_algo: str = "sha256"
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None
    num_gpu_blocks_override: int | None = None
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    enable_chunked_prefill: bool = True
    # None: False on an accelerator, True on the CPU (engine_setup).
    enforce_eager: bool | None = None
    max_seq_len_to_capture: int = 8192
    compilation_config: dict[str, Any] | None = None
    max_logprobs: int = 20
    generation_config: str = "auto"
    attention_backend: str | None = None
    disable_log_stats: bool = True
    served_model_name: str | None = None
    runner: str = "auto"
    convert: str = "auto"
    task: str = "auto"
    pooler_config: dict[str, Any] | PoolerConfig | None = None
    override_pooler_config: dict[str, Any] | PoolerConfig | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    data_parallel_rank: int | None = None
    nnodes: int = 1
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    distributed_executor_backend: str | None = None
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    swap_space: float = 4
    cpu_offload_gb: float = 0
    speculative_config: dict[str, Any] | None = None
    enable_lora: bool = False
    scheduling_policy: str = "fcfs"
    enable_sleep_mode: bool = False
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """vLLM's messages for out-of-range engine arguments."""
        if self.dtype not in _DTYPES:
            raise ValueError(f"Unknown dtype: {self.dtype!r}. Supported: {list(_DTYPES)}")
        if self.tokenizer_mode not in _TOKENIZER_MODES:
            raise ValueError(f"Unknown tokenizer mode: {self.tokenizer_mode}. Must be one of {list(_TOKENIZER_MODES)}.")
        if self.load_format not in _LOAD_FORMATS:
            raise ValueError(f"Unknown load_format: {self.load_format!r}. Supported: {list(_LOAD_FORMATS)}")
        if self.prefix_caching_hash_algo not in PREFIX_CACHING_HASH_ALGOS:
            raise ValueError(
                f"Unknown prefix_caching_hash_algo: {self.prefix_caching_hash_algo!r}. "
                f"Supported: {list(PREFIX_CACHING_HASH_ALGOS)}"
            )
        if self.attention_backend is not None and self.attention_backend not in _ATTENTION_BACKENDS:
            raise ValueError(
                f"Unknown attention_backend: {self.attention_backend!r}. Supported: {list(_ATTENTION_BACKENDS)}"
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"GPU memory utilization must be within (0, 1]. Got {self.gpu_memory_utilization}.")
        if self.block_size not in (1, 8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of [1, 8, 16, 32, 64, 128], got {self.block_size}.")
        for name in (
            "max_model_len",
            "max_num_batched_tokens",
            "max_num_seqs",
            "num_gpu_blocks_override",
            "kv_cache_memory_bytes",
        ):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value}.")
        if self.max_logprobs < -1:
            raise ValueError(f"max_logprobs must be non-negative or -1, got {self.max_logprobs}.")
        if self.swap_space < 0:
            raise ValueError(f"swap_space must be non-negative, got {self.swap_space}.")
        for name, (allowed, reason) in _ONLY_AT.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not supported: {reason} (allowed: {list(allowed)}).")
        self.parallel_config()
        if self.nnodes < 1:
            raise ValueError(f"nnodes must be a positive integer, got {self.nnodes}.")
        if self.node_rank is not None and not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, {self.nnodes}), got {self.node_rank}.")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise ValueError(f"master_port must be in [1, 65535], got {self.master_port}.")
        if self.nnodes > 1 and self.data_parallel_size > 1:
            raise ValueError(
                "data_parallel_size > 1 with nnodes > 1 is not supported yet: a multi-host run is one "
                "tensor-parallel engine over every host's devices."
            )
        if self.max_seq_len_to_capture <= 0:
            raise ValueError(f"max_seq_len_to_capture must be positive, got {self.max_seq_len_to_capture}.")
        for name, allowed in (("runner", RUNNER_TYPES), ("convert", CONVERT_TYPES), ("task", TASKS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}.")
        self.resolved_pooler_config()

    def parallel_config(self) -> ParallelConfig:
        """This engine's parallel sizes and replica rank (the first, where none is given)."""
        return ParallelConfig(
            tensor_parallel_size=self.tensor_parallel_size,
            data_parallel_size=self.data_parallel_size,
            data_parallel_rank=self.data_parallel_rank or 0,
        )

    def resolved_pooler_config(self) -> PoolerConfig | None:
        """pooler_config (or the older override_pooler_config) as a PoolerConfig."""
        value = self.pooler_config if self.pooler_config is not None else self.override_pooler_config
        if value is None or isinstance(value, PoolerConfig):
            return value
        fields = {f.name for f in dataclasses.fields(PoolerConfig)}
        value = dict(value)
        # vLLM's older names for use_activation.
        for old in ("activation", "softmax"):
            if old in value:
                value.setdefault("use_activation", value.pop(old))
        unknown = sorted(set(value) - fields)
        if unknown:
            raise ValueError(f"Unknown pooler_config keys {unknown}; supported: {sorted(fields)}.")
        return PoolerConfig(**value)

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        for f in dataclasses.fields(EngineArgs):
            flag = "--" + f.name.replace("_", "-")
            short = {
                "tensor_parallel_size": "-tp",
                "pipeline_parallel_size": "-pp",
                "data_parallel_size": "-dp",
                "quantization": "-q",
            }.get(f.name)
            flags = (short, flag) if short else (flag,)
            default = f.default
            if f.type in ("bool", bool, "bool | None"):
                parser.add_argument(
                    *flags, action=argparse.BooleanOptionalAction, default=default, help=_HELP.get(f.name)
                )
            elif f.name in (
                "hf_overrides",
                "compilation_config",
                "speculative_config",
                "pooler_config",
                "override_pooler_config",
            ):
                parser.add_argument(*flags, type=json.loads, default=None, help=_HELP.get(f.name))
            else:
                kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
                if "float" in str(f.type):
                    kind = float
                elif "int" in str(f.type):
                    kind = int
                choices = {
                    "dtype": _DTYPES,
                    "load_format": _LOAD_FORMATS,
                    "tokenizer_mode": _TOKENIZER_MODES,
                    "attention_backend": _ATTENTION_BACKENDS,
                    "prefix_caching_hash_algo": PREFIX_CACHING_HASH_ALGOS,
                    "runner": RUNNER_TYPES,
                    "convert": CONVERT_TYPES,
                    "task": TASKS,
                }.get(f.name)
                parser.add_argument(*flags, type=kind, default=default, choices=choices, help=_HELP.get(f.name))
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: getattr(args, n) for n in names if hasattr(args, n)})


@dataclass
class AsyncEngineArgs(EngineArgs):
    """EngineArgs for the AsyncLLMEngine, as vLLM's: the same arguments plus request logging."""

    enable_log_requests: bool = False
