"""Frozen configuration records that flow from EngineArgs to the engine's parts.

Each is hashable and immutable; a part that needs a changed value gets a new record
(`dataclasses.replace`), never a mutated one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerConfig:
    # Tokens (prefill and decode together) the model runs in one step.
    max_num_batched_tokens: int
    # Sequences in one step, and so the most requests running at once.
    max_num_seqs: int
    max_model_len: int
    # Split a prompt that does not fit the step's remaining token budget.
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be "
                f"greater than or equal to max_num_seqs ({self.max_num_seqs})."
            )
        # Without chunking a prompt runs in one step, so a longer one could never run.
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) is smaller "
                f"than max_model_len ({self.max_model_len}). This effectively limits "
                "the maximum sequence length to max_num_batched_tokens and makes "
                "jllm reject longer sequences. Please increase max_num_batched_tokens "
                "or decrease max_model_len."
            )


@dataclass(frozen=True)
class CacheConfig:
    # Tokens per KV-cache page.
    block_size: int = 16
    # Pages in the KV pool; None until the engine has measured free device memory.
    num_gpu_blocks: int | None = None
    # Share full pages of identical prefixes between requests (automatic prefix caching).
    enable_prefix_caching: bool = True
    # How a page's prefix is hashed (jllm/core/block_hash.py).
    prefix_caching_hash_algo: str = "sha256"


@dataclass(frozen=True)
class ParallelConfig:
    # Devices one engine's weights and KV pages are split over (one mesh axis).
    tensor_parallel_size: int = 1
    # Engine replicas, each on its own tensor_parallel_size devices.
    data_parallel_size: int = 1
    # Which replica this engine is: its devices are the rank-th group of jax.devices().
    data_parallel_rank: int = 0

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "data_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        if not 0 <= self.data_parallel_rank < self.data_parallel_size:
            raise ValueError(
                f"data_parallel_rank must be in [0, {self.data_parallel_size}), got {self.data_parallel_rank}."
            )


POOLING_TYPES = ("CLS", "MEAN", "LAST", "ALL")
# vLLM's runner, convert and (older) task choices: jllm/engine/task_config.py resolves them.
RUNNER_TYPES = ("auto", "generate", "pooling")
CONVERT_TYPES = ("auto", "none", "embed", "classify", "reward")
TASKS = ("auto", "generate", "embed", "classify", "score", "reward")


@dataclass(frozen=True)
class PoolerConfig:
    """How a pooling model turns hidden states into its output (vLLM's PoolerConfig).
    None fields take the model's defaults (jllm/engine/task_config.py)."""

    # "CLS" (first token), "MEAN", "LAST" or "ALL" (every token).
    pooling_type: str | None = None
    # L2-normalize embeddings.
    normalize: bool | None = None
    # Matryoshka: keep the first `dimensions` of each embedding.
    dimensions: int | None = None
    # Softmax (or sigmoid for one label) on classifier outputs.
    use_activation: bool | None = None

    def __post_init__(self) -> None:
        if self.pooling_type is not None and self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling_type must be one of {list(POOLING_TYPES)}, got {self.pooling_type!r}.")
        if self.dimensions is not None and self.dimensions < 1:
            raise ValueError("Dimensions must be greater than 0")


@dataclass(frozen=True)
class ModelConfig:
    # Resolved local path: an HF folder or a .gguf file.
    model: str
    tokenizer: str
    tokenizer_mode: str
    skip_tokenizer_init: bool
    # The jnp dtype name the weights and KV cache use ("float32", "bfloat16", "float16").
    dtype: str
    max_model_len: int
    seed: int
    load_format: str
    max_logprobs: int
    generation_config: str
    # "reference" (plain jnp) or "pallas" (GPU kernels).
    attention_backend: str
    revision: str | None = None
    # The served name: what the user passed as `model`.
    served_model_name: str | None = None
    # "generate" or "pooling" (vLLM's runner), and how a generative architecture was
    # turned into a pooling one ("none", "embed", "classify", "reward": vLLM's convert).
    runner_type: str = "generate"
    convert_type: str = "none"
    # What the loaded model can do: "generate", or pooling tasks ("embed", "token_embed",
    # "classify", "token_classify"); "score" is served by "embed" or a one-label "classify".
    supported_tasks: tuple[str, ...] = ("generate",)
    pooler_config: PoolerConfig | None = None
    # The architecture run, and whether it is a cross-encoder (a classifier scoring pairs).
    architecture: str = ""
    is_cross_encoder: bool = False
    num_labels: int = 0
    # Matryoshka embeddings: any `dimensions` may be asked for (None: all, or only these).
    is_matryoshka: bool = False
    matryoshka_dimensions: tuple[int, ...] | None = None


@dataclass(frozen=True)
class CompilationConfig:
    # Decode batch sizes precompiled at start-up (vLLM's CUDA-graph capture sizes).
    cudagraph_capture_sizes: tuple[int, ...]
    # Token-count buckets of the flat token axis.
    token_buckets: tuple[int, ...]
    # Context length up to which decode shapes are precompiled.
    max_seq_len_to_capture: int
    enforce_eager: bool = False
    # Persistent XLA compilation cache folder; None disables it.
    cache_dir: str | None = None
