"""Paged attention for one layer: write this step's K/V into the pages, then attend.

`AttentionBackend` picks the implementation from `pallas_kernels/`: the Pallas kernel
(GPU) or its plain-jnp reference (the CPU, and what `attention_backend="reference"`
forces on GPU). Every backend computes the same function: token t of
sequence s attends causally to cache positions [0, positions[t]] of s (within the
sliding window when one is set), after the step's own K/V have been written.
"""
from __future__ import annotations

import enum

from jllm.layers.attention_metadata import AttentionMetadata
from pallas_kernels import ragged_paged_attention, ragged_paged_attention_reference, write_kv_reference


class AttentionBackend(str, enum.Enum):
    REFERENCE = "reference"
    PALLAS = "pallas"


def paged_attention(
    q, k, v, k_cache, v_cache, md: AttentionMetadata, *, scale: float, backend: AttentionBackend,
    sliding_window: int | None = None, soft_cap: float | None = None,
):
    """Returns (output [T, N, H], k_cache, v_cache)."""
    # An in-place scatter on the donated pages (padding slots -1 are dropped).
    k_cache, v_cache = write_kv_reference(k_cache, v_cache, k, v, md.slot_mapping)
    attend = ragged_paged_attention if backend == AttentionBackend.PALLAS else ragged_paged_attention_reference
    out = attend(
        q, k_cache, v_cache, md.query_start_loc, md.seq_lens, md.block_tables, scale=scale,
        sliding_window=sliding_window, soft_cap=soft_cap,
    )
    return out, k_cache, v_cache
