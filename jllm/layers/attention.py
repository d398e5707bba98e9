"""Paged attention for one layer: write this step's K/V into the pages, then attend.

`AttentionBackend` picks the implementation from `pallas_kernels/`: the Pallas kernels
(the GPU's default; on the CPU they run in Pallas interpret mode, for tests) or their
plain-jnp references (the CPU's default, and what `attention_backend="reference"` forces
on GPU). Every backend computes the same function: token t of sequence s attends
causally to cache positions [0, positions[t]] of s (within the sliding window when one
is set), after the step's own K/V have been written.
"""
from __future__ import annotations

import enum
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jllm.layers.attention_metadata import AttentionMetadata
from pallas_kernels import (
    new_decode_tickets,
    paged_decode_attention,
    ragged_paged_attention,
    ragged_paged_attention_reference,
    write_kv,
    write_kv_reference,
)


class KVCache(NamedTuple):
    """One layer's state on the device, threaded (donated) through every jitted step."""
    k: jax.Array  # [num_kv_heads, num_blocks, block_size, head_dim]
    v: jax.Array
    # [num_kv_heads, max_num_seqs] int32, zero between steps: the decode kernel's split
    # tickets, which it leaves zeroed, so no step pays a memset for them (one per layer).
    decode_tickets: jax.Array


def allocate_kv_cache(num_kv_heads: int, num_blocks: int, block_size: int, head_dim: int,
                      max_num_seqs: int, dtype) -> KVCache:
    shape = (num_kv_heads, num_blocks, block_size, head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   new_decode_tickets(num_kv_heads, max_num_seqs))


class AttentionBackend(str, enum.Enum):
    REFERENCE = "reference"
    PALLAS = "pallas"


def default_attention_backend(platform: str) -> AttentionBackend:
    """The kernels on accelerators; the plain-jnp reference on the CPU, where the
    kernels would run interpreted."""
    return AttentionBackend.REFERENCE if platform == "cpu" else AttentionBackend.PALLAS


def paged_attention(
    q, k, v, cache: KVCache, md: AttentionMetadata, *, scale: float, backend: AttentionBackend,
    sliding_window: int | None = None, soft_cap: float | None = None,
):
    """Returns (output [T, N, H], the layer's updated cache)."""
    kwargs = dict(scale=scale, sliding_window=sliding_window, soft_cap=soft_cap)
    tickets = cache.decode_tickets
    if backend == AttentionBackend.REFERENCE:
        # An in-place scatter on the donated pages (padding slots -1 are dropped).
        k_cache, v_cache = write_kv_reference(cache.k, cache.v, k, v, md.slot_mapping)
        out = ragged_paged_attention_reference(
            q, k_cache, v_cache, md.query_start_loc, md.seq_lens, md.block_tables, **kwargs)
        return out, KVCache(k_cache, v_cache, tickets)
    interpret = jax.default_backend() == "cpu"
    # The kernel writes the rows in place (aliased pages): 2-5x XLA's scatter on the
    # H200 (scripts/results/kernels_*.json).
    k_cache, v_cache = write_kv(cache.k, cache.v, k, v, md.slot_mapping, interpret=interpret)
    kwargs["interpret"] = interpret
    if md.fresh_prefill and soft_cap is None:
        out = fresh_prefill_attention(q, k, v, md.query_start_loc[1], scale=scale, sliding_window=sliding_window)
    elif md.decode_only:
        # Token i is sequence i's query (S <= T); the tokens past S are padding.
        num_seqs = md.seq_lens.shape[0]
        out, tickets = paged_decode_attention(
            q[:num_seqs], k_cache, v_cache, md.seq_lens, md.block_tables,
            config=md.decode_config, decode_tickets=tickets, **kwargs)
        out = jnp.pad(out, ((0, q.shape[0] - num_seqs), (0, 0), (0, 0)))
    else:
        out = ragged_paged_attention(
            q, k_cache, v_cache, md.query_start_loc, md.seq_lens, md.block_tables, **kwargs)
    return out, KVCache(k_cache, v_cache, tickets)


def fresh_prefill_attention(q, k, v, num_tokens, *, scale: float, sliding_window: int | None = None):
    """Causal self-attention of one sequence's first `num_tokens` tokens (q/k/v [T, heads,
    H], the rest padding) through `jax.nn.dot_product_attention`: cuDNN's flash attention
    on the GPU for 16-bit inputs, XLA's otherwise. Padding rows come back as zeros."""
    use_cudnn = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
    # The kernels' window (keys > position - W) is cuDNN's left window of W - 1.
    window = None if sliding_window is None else (sliding_window - 1, 0)
    # No sequence lengths: under the causal mask a real token never sees the padding
    # after it, and cuDNN's plain causal mask is faster than its padded one.
    out = jax.nn.dot_product_attention(
        q[None], k[None], v[None], scale=scale, is_causal=True, local_window_size=window,
        implementation="cudnn" if use_cudnn else "xla")[0]
    real = jnp.arange(q.shape[0]) < num_tokens
    return jnp.where(real[:, None, None], out, jnp.zeros((), out.dtype))
