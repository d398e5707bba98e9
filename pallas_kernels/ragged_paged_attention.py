"""Ragged paged attention: prefill chunks and decode tokens of many sequences at once.

The step's query tokens lie back to back on one flat axis (`query_start_loc`), and
every token attends causally to its own sequence's cache, which already holds this
step's K/V. The grid runs over (query blocks, kv heads). A query block holds up to
`block_q` consecutive tokens of one sequence, times all the query heads of one kv
head (GQA rows packed into the M side of the matmul); a sequence of n query tokens
gets cdiv(n, block_q) blocks. Block ids are laid out like vLLM's unified attention:
sequence s's blocks start at query_start_loc[s] // block_q + s, so each program finds
its sequence on the device by counting block starts below its id, and
cdiv(T, block_q) + S programs always suffice. The blocks past the last sequence
write zeros over the padding tokens. Each program runs a flash-attention loop
(online softmax, base 2) over its sequence's pages, from the sliding window's start
to the causal end of its last token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.paged_decode_attention import (
    MASK_VALUE,
    flatten_pages,
    gather_pages,
    log2_logits,
    masked_attention,
)
from pallas_kernels.tuning import RAGGED_BLOCK_KV, RAGGED_BLOCK_ROWS, RAGGED_NUM_STAGES


def _find_sequence(query_start_loc_ref, block_id, *, num_seqs: int, block_q: int):
    """Largest s in [0, num_seqs] with query_start_loc[s] // block_q + s <= block_id.

    s == num_seqs is the padding after the last sequence's tokens. One vector load
    and a count, rather than a binary search's chain of dependent scalar loads.
    """
    seqs = jnp.arange(pl.next_power_of_2(num_seqs + 1))
    starts = plgpu.load(query_start_loc_ref.at[seqs], mask=seqs <= num_seqs, other=2**30)
    first_blocks = starts // block_q + seqs
    return jnp.sum((first_blocks <= block_id).astype(jnp.int32)) - 1


def _ragged_kernel(
    query_start_loc_ref,
    seq_lens_ref,
    block_tables_ref,
    q_ref,
    k_cache_ref,
    v_cache_ref,
    o_ref,
    *,
    scale: float,
    soft_cap: float | None,
    sliding_window: int | None,
    block_size: int,
    block_q: int,
    group_padded: int,
    block_kv: int,
):
    # q_ref / o_ref: [T, group, head_dim] of one kv head; *_cache_ref: [num_slots,
    # head_dim] of that kv head; block_tables_ref: [S, max_blocks_per_seq].
    num_tokens, group, head_dim = q_ref.shape
    num_seqs, max_blocks = block_tables_ref.shape
    block_id = pl.program_id(0)
    seq = _find_sequence(query_start_loc_ref, block_id, num_seqs=num_seqs, block_q=block_q)
    is_padding = seq == num_seqs
    q_begin = query_start_loc_ref[seq]
    seq_first_block = q_begin // block_q + seq
    q_end = jnp.where(is_padding, num_tokens, query_start_loc_ref[jnp.minimum(seq + 1, num_seqs)])
    seq_len = jnp.where(is_padding, 0, seq_lens_ref[jnp.minimum(seq, num_seqs - 1)])
    q_start = q_begin + (block_id - seq_first_block) * block_q
    q_stop = jnp.minimum(q_start + block_q, q_end)
    # Query token i of the sequence sits at position seq_len - query_len + i.
    context_start = seq_len - (q_end - q_begin)
    first_pos = context_start + q_start - q_begin
    last_pos = context_start + q_stop - 1 - q_begin
    kv_hi = jnp.where((q_start < q_stop) & ~is_padding, last_pos + 1, 0)
    kv_lo = 0 if sliding_window is None else jnp.maximum(first_pos - sliding_window + 1, 0)

    # Row r of the tile is query head r % group_padded of token q_start + r // group_padded.
    rows = jnp.arange(block_q * group_padded)
    tokens = q_start + rows // group_padded
    heads = rows % group_padded
    row_mask = ((tokens < q_stop) & (heads < group))[:, None]
    row_pos = (context_start + tokens - q_begin)[:, None]
    cols = jnp.arange(head_dim)[None, :]
    q_index = (tokens[:, None], heads[:, None], cols)
    q = plgpu.load(q_ref.at[q_index], mask=row_mask, other=0)

    def body(b, carry, *, masked: bool):
        o_prev, m_prev, l_prev = carry
        keys = b * block_kv + jnp.arange(block_kv)
        loaded = keys < kv_hi
        pages = plgpu.load(
            block_tables_ref.at[seq, keys // block_size], mask=loaded & (keys // block_size < max_blocks), other=0
        )
        slots = (pages * block_size + keys % block_size)[:, None]
        k = plgpu.load(k_cache_ref.at[slots, cols], mask=loaded[:, None], other=0)
        v = plgpu.load(v_cache_ref.at[slots, cols], mask=loaded[:, None], other=0)
        # [block_q * group_padded, block_kv], f32, in log2 units.
        s = log2_logits(plgpu.dot(q, k, trans_b=True), scale, soft_cap)
        if masked:
            visible = keys[None, :] <= row_pos
            if sliding_window is not None:
                visible &= keys[None, :] > row_pos - sliding_window
            s = jnp.where(visible, s, MASK_VALUE)
        m_next = jnp.maximum(m_prev, s.max(axis=-1))
        correction = jnp.exp2(m_prev - m_next)
        p = jnp.exp2(s - m_next[:, None])
        l_next = correction * l_prev + p.sum(axis=-1)
        o_next = correction[:, None] * o_prev + plgpu.dot(p.astype(v.dtype), v)
        return o_next, m_next, l_next

    o = jnp.zeros((block_q * group_padded, head_dim), jnp.float32)
    m = jnp.full((block_q * group_padded,), -jnp.inf, jnp.float32)
    l = jnp.zeros((block_q * group_padded,), jnp.float32)
    lo, hi = kv_lo // block_kv, pl.cdiv(kv_hi, block_kv)
    # Kv blocks wholly at or before the block's first query position are visible to
    # every row: they skip the causal mask (without a sliding window, which cuts rows
    # differently). Only the blocks on the diagonal pay for it.
    unmasked_hi = lo if sliding_window is not None else jnp.clip((first_pos + 1) // block_kv, lo, hi)
    carry = jax.lax.fori_loop(lo, unmasked_hi, functools.partial(body, masked=False), (o, m, l))
    o, m, l = jax.lax.fori_loop(unmasked_hi, hi, functools.partial(body, masked=True), carry)
    # Padding tokens ran no kv block (l == 0) and are written as zeros.
    o = o / jnp.where(l == 0, 1.0, l)[:, None]
    plgpu.store(o_ref.at[q_index], o.astype(o_ref.dtype), mask=row_mask)


@functools.partial(
    jax.jit,
    static_argnames=(
        "scale",
        "soft_cap",
        "sliding_window",
        "block_q",
        "block_kv",
        "num_warps",
        "num_stages",
        "interpret",
    ),
)
def ragged_paged_attention(
    q: jax.Array,  # [T, num_q_heads, head_dim]
    k_cache: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim]
    v_cache: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim]
    query_start_loc: jax.Array,  # [S + 1] int32
    seq_lens: jax.Array,  # [S] int32
    block_tables: jax.Array,  # [S, max_blocks_per_seq] int32
    *,
    scale: float,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    block_q: int | None = None,
    block_kv: int = RAGGED_BLOCK_KV,
    num_warps: int | None = None,
    num_stages: int = RAGGED_NUM_STAGES,
    interpret: bool = False,
) -> jax.Array:
    """Causal attention of every query token over its sequence's cached keys.

    Takes the fields of `AttentionMetadata` of the same names. Token t of sequence s
    sits at position seq_lens[s] - query_len[s] + (t - query_start_loc[s]), i.e. a
    sequence's query tokens are the last ones of its context (what `positions` holds).
    Returns [T, num_q_heads, head_dim] in q's dtype; padding tokens are zeros.
    `block_q` tokens per program (default: RAGGED_BLOCK_ROWS rows of tokens x query
    heads); `block_kv` keys per inner step; both powers of two. `num_warps` defaults
    to 8 for tiles of 128 rows x 64 dims and more, 4 below.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, num_blocks, block_size, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    group = num_q_heads // num_kv_heads
    group_padded = pl.next_power_of_2(group)
    if block_q is None:
        block_q = max(1, RAGGED_BLOCK_ROWS // group_padded)
    # tl.dot wants at least 16 rows.
    block_q = max(block_q, 16 // min(group_padded, 16))
    if num_warps is None:
        # 4 warps suffice for a small tile; a 128-row tile needs 8 to hold its f32
        # accumulator and scores without spilling (ptxas, sm_90a).
        num_warps = 8 if block_q * group_padded * head_dim >= 128 * 64 else 4

    num_slots = num_blocks * block_size
    k_flat, v_flat = flatten_pages(k_cache), flatten_pages(v_cache)
    q4 = q.reshape(num_tokens, num_kv_heads, group, head_dim)

    kernel = functools.partial(
        _ragged_kernel,
        scale=scale,
        soft_cap=soft_cap,
        sliding_window=sliding_window,
        block_size=block_size,
        block_q=block_q,
        group_padded=group_padded,
        block_kv=block_kv,
    )
    token_spec = pl.BlockSpec((num_tokens, None, group, head_dim), lambda i, h: (0, h, 0, 0))
    cache_spec = pl.BlockSpec((None, num_slots, head_dim), lambda i, h: (h, 0, 0))
    out = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(num_tokens, block_q) + num_seqs, num_kv_heads),
        in_specs=[
            pl.BlockSpec((num_seqs + 1,), lambda i, h: (0,)),
            pl.BlockSpec((num_seqs,), lambda i, h: (0,)),
            pl.BlockSpec(block_tables.shape, lambda i, h: (0, 0)),
            token_spec,
            cache_spec,
            cache_spec,
        ],
        out_specs=token_spec,
        out_shape=jax.ShapeDtypeStruct(q4.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="jllm_ragged_paged_attention",
    )(query_start_loc, seq_lens, block_tables, q4, k_flat, v_flat)
    return out.reshape(q.shape)


def ragged_paged_attention_reference(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    query_start_loc: jax.Array,
    seq_lens: jax.Array,
    block_tables: jax.Array,
    *,
    scale: float,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
) -> jax.Array:
    """Plain-jnp `ragged_paged_attention`: each token gathers its sequence's pages."""
    num_tokens = q.shape[0]
    num_seqs = seq_lens.shape[0]
    tokens = jnp.arange(num_tokens)
    # side="right" skips the empty sequences that share a start.
    seq = jnp.clip(jnp.searchsorted(query_start_loc, tokens, side="right") - 1, 0, num_seqs - 1)
    query_lens = query_start_loc[1:] - query_start_loc[:-1]
    positions = seq_lens[seq] - query_lens[seq] + tokens - query_start_loc[seq]
    is_query = tokens < query_start_loc[num_seqs]

    k = gather_pages(k_cache, block_tables)[seq]  # [T, K, L, D]
    v = gather_pages(v_cache, block_tables)[seq]
    keys = jnp.arange(k.shape[2])[None, :]
    visible = (keys <= positions[:, None]) & is_query[:, None]
    if sliding_window is not None:
        visible &= keys > positions[:, None] - sliding_window
    return masked_attention(q, k, v, visible, scale=scale, soft_cap=soft_cap)
