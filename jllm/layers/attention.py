"""Paged attention for one layer: write this step's K/V into the pages, then attend.

`AttentionBackend` picks the implementation: the plain-jnp reference here (CPU, and
the fallback that `attention_backend="reference"` forces on GPU) or the Pallas kernels
in `pallas_kernels/` on GPU. Every backend computes the same function: token t of
sequence s attends causally to cache positions [0, positions[t]] of s (within the
sliding window when one is set), after the step's own K/V have been written.
"""
from __future__ import annotations

import enum

import jax
import jax.numpy as jnp

from jllm.layers.attention_metadata import AttentionMetadata


class AttentionBackend(str, enum.Enum):
    REFERENCE = "reference"
    PALLAS = "pallas"


def write_kv(k_cache, v_cache, k, v, slot_mapping):
    """Scatter k, v [T, K, H] into caches [K, num_blocks, block_size, H] at flat slots.

    Padding tokens carry slot -1, which maps past the end and is dropped, so the
    update stays in place on the donated buffers.
    """
    num_kv_heads, num_blocks, block_size, head_dim = k_cache.shape
    total = num_blocks * block_size
    slots = jnp.where(slot_mapping < 0, total, slot_mapping)
    flat_k = k_cache.reshape(num_kv_heads, total, head_dim)
    flat_v = v_cache.reshape(num_kv_heads, total, head_dim)
    flat_k = flat_k.at[:, slots].set(k.transpose(1, 0, 2).astype(k_cache.dtype), mode="drop")
    flat_v = flat_v.at[:, slots].set(v.transpose(1, 0, 2).astype(v_cache.dtype), mode="drop")
    return flat_k.reshape(k_cache.shape), flat_v.reshape(v_cache.shape)


def reference_ragged_paged_attention(
    q, k_cache, v_cache, md: AttentionMetadata, *, scale: float, sliding_window: int | None = None,
    soft_cap: float | None = None,
):
    """Plain-jnp attention of ragged queries q [T, N, H] over each sequence's pages.

    Gathers each token's sequence pages, so memory grows with T x context: fine for the
    CPU and as a GPU correctness reference, not as the fast path.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, _, block_size, _ = k_cache.shape
    group = num_heads // num_kv_heads
    pages = md.block_tables[md.token_to_seq]  # [T, P]
    context = pages.shape[1] * block_size
    k = k_cache[:, pages].reshape(num_kv_heads, num_tokens, context, head_dim)
    v = v_cache[:, pages].reshape(num_kv_heads, num_tokens, context, head_dim)
    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    scores = jnp.einsum("TKGH,KTCH->TKGC", qg, k, preferred_element_type=jnp.float32) * scale
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    key_pos = jnp.arange(context)[None, :]
    query_pos = md.positions[:, None]
    mask = key_pos <= query_pos
    if sliding_window is not None:
        mask &= key_pos > query_pos - sliding_window
    scores = jnp.where(mask[:, None, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("TKGC,KTCH->TKGH", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


def paged_attention(
    q, k, v, k_cache, v_cache, md: AttentionMetadata, *, scale: float, backend: AttentionBackend,
    sliding_window: int | None = None, soft_cap: float | None = None,
):
    """Returns (output [T, N, H], k_cache, v_cache)."""
    k_cache, v_cache = write_kv(k_cache, v_cache, k, v, md.slot_mapping)
    if backend == AttentionBackend.PALLAS:
        from pallas_kernels import ragged_paged_attention  # GPU only; imported lazily

        out = ragged_paged_attention(
            q, k_cache, v_cache, md.query_start_loc, md.seq_lens, md.block_tables, scale=scale,
            sliding_window=sliding_window, soft_cap=soft_cap,
        )
    else:
        out = reference_ragged_paged_attention(
            q, k_cache, v_cache, md, scale=scale, sliding_window=sliding_window, soft_cap=soft_cap
        )
    return out, k_cache, v_cache
