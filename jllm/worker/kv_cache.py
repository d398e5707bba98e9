"""Sizing and allocating the paged KV pool on the device.

Per layer the pool is two arrays [num_kv_heads, num_blocks, block_size, head_dim]
(JAX's paged-attention layout: one head's page is contiguous), kept with the decode
kernel's split tickets in a `KVCache`, and split by kv head over the tensor-parallel
mesh (each device holds its heads' pages; a kv head is replicated where there are fewer
than devices). The number of
blocks comes from the memory the device has left once weights and the largest
step's activations are accounted for (vLLM's gpu_memory_utilization rule), from
an explicit byte budget, or from an override.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from jllm.config import SchedulerConfig
from jllm.distributed.mesh import num_kv_cache_heads
from jllm.layers.attention import KV_CACHE_SPEC, KVCache, allocate_kv_cache
from jllm.models.llama import DecoderSpec

logger = logging.getLogger(__name__)

# Without a device allocator to ask (the CPU), the pool gets this much unless told.
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30
_GiB = float(1 << 30)


def bytes_per_block(spec: DecoderSpec, block_size: int, dtype, mesh: Mesh) -> int:
    """One page's bytes on each device of the mesh (its share of the kv heads)."""
    itemsize = jnp.dtype(dtype).itemsize
    heads_per_device = num_kv_cache_heads(spec.num_key_value_heads, mesh) // mesh.size
    return 2 * spec.num_hidden_layers * heads_per_device * block_size * spec.head_dim * itemsize


def available_kv_cache_bytes(gpu_memory_utilization: float, activation_bytes: int, mesh: Mesh) -> int | None:
    """Bytes the pool may take on each accelerator of the mesh (the least any of them has
    left), or None where the devices report no limit."""
    budgets = []
    for device in mesh.devices.flat:
        stats = (
            device.memory_stats() if device.platform != "cpu" and device.process_index == jax.process_index() else None
        )
        if not stats or "bytes_limit" not in stats:
            continue
        budget = int(stats["bytes_limit"] * gpu_memory_utilization)
        budgets.append(budget - int(stats.get("bytes_in_use", 0)) - activation_bytes)
    return min(budgets) if budgets else None


def activation_bytes(spec: DecoderSpec, sched: SchedulerConfig, dtype, prefix_gather_tokens: int = 0) -> int:
    """A bound on the largest step's live activations: the widest intermediate per
    token plus the float32 logits of every sequence, with 2x headroom for XLA's temps;
    with `prefix_gather_tokens`, also a prefix-prefill step's gathered K/V of that many
    tokens and its three float32 [tokens, q heads, head_dim] outputs to merge."""
    itemsize = jnp.dtype(dtype).itemsize
    per_token = (
        3 * spec.hidden_size
        + 2 * spec.intermediate_size
        + (spec.num_attention_heads + 2 * spec.num_key_value_heads) * spec.head_dim
    ) * itemsize
    logits = min(sched.max_num_seqs, sched.max_num_batched_tokens) * spec.vocab_size * 4 * 3
    prefix = 0
    if prefix_gather_tokens:
        gather = 2 * prefix_gather_tokens * spec.num_key_value_heads * spec.head_dim * itemsize
        merge = 3 * sched.max_num_batched_tokens * spec.num_attention_heads * spec.head_dim * 4
        prefix = gather + merge
    return 2 * (sched.max_num_batched_tokens * per_token + logits + prefix)


def determine_num_blocks(
    spec: DecoderSpec,
    *,
    block_size: int,
    dtype,
    max_model_len: int,
    gpu_memory_utilization: float,
    kv_cache_memory_bytes: int | None,
    num_gpu_blocks_override: int | None,
    activation_bytes: int,
    mesh: Mesh,
) -> int:
    """Pages that fit each device's budget (kv_cache_memory_bytes is per device too)."""
    per_block = bytes_per_block(spec, block_size, dtype, mesh)
    if num_gpu_blocks_override is not None:
        num_blocks = num_gpu_blocks_override
        available = num_blocks * per_block
    else:
        available = kv_cache_memory_bytes
        if available is None:
            available = available_kv_cache_bytes(gpu_memory_utilization, activation_bytes, mesh)
        if available is None:
            available = DEFAULT_CPU_KV_CACHE_BYTES
        if available <= 0:
            raise ValueError(
                "No available memory for the cache blocks. Try increasing "
                "`gpu_memory_utilization` when initializing the engine."
            )
        num_blocks = available // per_block
    blocks_needed = -(-max_model_len // block_size)
    if num_blocks < blocks_needed:
        needed = blocks_needed * per_block
        estimated_max_len = num_blocks * block_size
        raise ValueError(
            f"To serve at least one request with the models's max seq len ({max_model_len}), "
            f"({needed / _GiB:.2f} GiB KV cache is needed, which is larger than the available KV "
            f"cache memory ({available / _GiB:.2f} GiB). Based on the available memory, the "
            f"estimated maximum model length is {estimated_max_len}. Try increasing "
            "`gpu_memory_utilization` or decreasing `max_model_len` when initializing the engine."
        )
    return int(num_blocks)


def allocate_kv_caches(
    spec: DecoderSpec, num_blocks: int, block_size: int, dtype, max_num_seqs: int, mesh: Mesh
) -> list[KVCache]:
    """A zeroed KVCache per layer, split by kv head over the mesh and zeroed in place on
    each device; its decode tickets serve steps of up to `max_num_seqs` sequences (4 bytes
    per kv head and sequence, left out of the page budget)."""
    heads = num_kv_cache_heads(spec.num_key_value_heads, mesh)
    allocate = jax.jit(
        lambda: allocate_kv_cache(heads, num_blocks, block_size, spec.head_dim, max_num_seqs, dtype),
        out_shardings=KVCache(*(NamedSharding(mesh, part) for part in KV_CACHE_SPEC)),
    )
    return [allocate() for _ in range(spec.num_hidden_layers)]
