"""Paged attention for decode steps: one query token per sequence, split-K over pages.

One program per (sequence, kv head, kv split) handles all the query heads of its kv
head at once (GQA), so each K/V page is read once per step. A sequence's kv blocks
are dealt out to `num_splits` splits in turn; the last split of a (sequence, kv
head) to finish merges the partial softmax states, in the same kernel: one launch,
where an XLA merge after the kernel costs a second one, a visible share of a small
batch's call. The splits count themselves on a ticket per (sequence, kv head) that
starts at zero; the merging split puts it back to zero, so a caller that threads the
tickets from call to call (the engine keeps them in each layer's cache) needs no
memset, which would run as a kernel of its own on every call. The query of sequence s
sits at position seq_lens[s] - 1, after its own K/V has been written to the cache.
Launch settings per shape come from `tuning.decode_config`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.tuning import DecodeConfig, decode_config

# Finite: a kv block that masks all of a row's keys must not turn the running max
# update into exp2(-inf - -inf) = NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_LOG2E = math.log2(math.e)


def flatten_pages(cache: jax.Array) -> jax.Array:
    """[kv_heads, num_blocks, block_size, D] -> [kv_heads, num_slots, D], slot = block *
    block_size + offset: how the kernels address the pool. A bitcast, so an alias of the
    pages still holds."""
    num_kv_heads, num_blocks, block_size, head_dim = cache.shape
    return cache.reshape(num_kv_heads, num_blocks * block_size, head_dim)


def log2_logits(qk, scale: float, soft_cap: float | None):
    """scale * q.k, soft-capped, times log2(e): the kernels' softmax runs on exp2."""
    if soft_cap is None:
        return qk * (scale * _LOG2E)
    return (soft_cap * _LOG2E) * jnp.tanh(qk * (scale / soft_cap))


def _decode_kernel(
    seq_lens_ref,
    block_tables_ref,
    q_ref,
    k_cache_ref,
    v_cache_ref,
    *out_refs,
    scale: float,
    soft_cap: float | None,
    sliding_window: int | None,
    block_size: int,
    block_kv: int,
    group_padded: int,
    num_splits: int,
    interpret: bool,
):
    # q_ref: [group, head_dim] of one (sequence, kv head); *_cache_ref: [num_slots,
    # head_dim] of that kv head; block_tables_ref: [S, max_blocks_per_seq].
    seq, split = pl.program_id(0), pl.program_id(2)
    group, head_dim = q_ref.shape
    max_blocks = block_tables_ref.shape[1]
    seq_len = seq_lens_ref[seq]
    kv_lo = 0 if sliding_window is None else jnp.maximum(seq_len - sliding_window, 0)
    first_block = kv_lo // block_kv
    num_blocks = pl.cdiv(seq_len, block_kv) - first_block
    # The splits take the kv blocks in turn (split i: blocks i, i + num_splits, ...), and
    # each prefetches the page ids of its next block: without a window a program's first
    # page ids then do not depend on the sequence's length, so their load goes out beside
    # the length's instead of after it: one memory round trip less on the path of the
    # small, latency-bound shapes. With one split the in-loop page-id load pipelines
    # better, so it stays there.
    num_steps = jnp.maximum(pl.cdiv(num_blocks - split, num_splits), 0)
    first = first_block + split
    prefetch = num_splits > 1

    heads = jnp.arange(group_padded)
    real_heads = heads < group
    cols = jnp.arange(head_dim)[None, :]

    def page_ids(b):
        # Bounded by the table, not by the length: entries past a sequence's pages hold
        # valid page ids, and the K/V loads mask their keys.
        pages = (b * block_kv + jnp.arange(block_kv)) // block_size
        return plgpu.load(block_tables_ref.at[seq, pages], mask=pages < max_blocks, other=0)

    def attend():
        """This split's unnormalised output o, running max m and sum l (log2 units)."""
        q = plgpu.load(q_ref.at[heads[:, None], cols], mask=real_heads[:, None], other=0)

        def body(step, carry):
            o_prev, m_prev, l_prev, pages = carry
            b = first + step * num_splits
            if prefetch:
                next_pages = page_ids(b + num_splits)
            else:  # The carried ids stay an unused placeholder.
                pages, next_pages = page_ids(b), pages
            keys = b * block_kv + jnp.arange(block_kv)
            valid = (keys >= kv_lo) & (keys < seq_len)
            slots = (pages * block_size + keys % block_size)[:, None]
            k = plgpu.load(k_cache_ref.at[slots, cols], mask=valid[:, None], other=0)
            v = plgpu.load(v_cache_ref.at[slots, cols], mask=valid[:, None], other=0)
            # [group_padded, block_kv], f32, in log2 units.
            s = log2_logits(plgpu.dot(q, k, trans_b=True), scale, soft_cap)
            s = jnp.where(valid[None, :], s, MASK_VALUE)
            m_next = jnp.maximum(m_prev, s.max(axis=-1))
            correction = jnp.exp2(m_prev - m_next)
            p = jnp.exp2(s - m_next[:, None])
            l_next = correction * l_prev + p.sum(axis=-1)
            o_next = correction[:, None] * o_prev + plgpu.dot(p.astype(v.dtype), v)
            return o_next, m_next, l_next, next_pages

        o = jnp.zeros((group_padded, head_dim), jnp.float32)
        m = jnp.full((group_padded,), -jnp.inf, jnp.float32)
        l = jnp.zeros((group_padded,), jnp.float32)
        pages = page_ids(first) if prefetch else jnp.zeros((block_kv,), jnp.int32)
        o, m, l, _ = jax.lax.fori_loop(0, num_steps, body, (o, m, l, pages))
        return o, m, l

    def write_output(out_ref, o, l, heads):
        o = o / jnp.where(l == 0, 1.0, l)[:, None]  # Rows of length 0 give zeros.
        plgpu.store(out_ref.at[heads[:, None], cols], o.astype(out_ref.dtype), mask=(heads < group)[:, None])

    def merge_states(active, o_part_ref, m_part_ref, l_part_ref, out_ref):
        """Merges the first `active` splits' states into the output."""
        # Only the real heads: no dot here wants 16 rows, and the padded [splits, 16,
        # head_dim] f32 states would not fit the registers.
        splits = jnp.arange(pl.next_power_of_2(num_splits))
        heads = jnp.arange(pl.next_power_of_2(group))
        real_heads = heads < group
        state_mask = (splits < active)[:, None] & real_heads[None, :]
        m_all = plgpu.load(
            m_part_ref.at[splits[:, None], heads[None, :]], mask=state_mask, other=-jnp.inf, volatile=True
        )
        l_all = plgpu.load(l_part_ref.at[splits[:, None], heads[None, :]], mask=state_mask, other=0.0, volatile=True)
        o_all = plgpu.load(
            o_part_ref.at[splits[:, None, None], heads[None, :, None], cols[None]],
            mask=state_mask[:, :, None],
            other=0.0,
            volatile=True,
        )
        m_max = m_all.max(axis=0)
        # A row no split touched keeps m = -inf everywhere: weights 0, not NaN.
        weight = jnp.exp2(m_all - jnp.where(m_max == -jnp.inf, 0.0, m_max)[None, :])
        l_sum = (weight * l_all).sum(axis=0)
        o_sum = (weight[:, :, None] * o_all).sum(axis=0)
        write_output(out_ref, o_sum, l_sum, heads)

    # Every split attends before the length-dependent branches below, an idle one over
    # no block: inside a branch, q's and the first page ids' loads would wait for the
    # length's, one memory round trip more before K and V go out (the SASS shows it).
    # Out here all three loads go out together.
    o, m, l = attend()
    if num_splits == 1:
        [o_ref] = out_refs
        write_output(o_ref, o, l, heads)
        return
    # The tickets come in aliased to the first output: the same buffer.
    _, ticket_ref, o_part_ref, m_part_ref, l_part_ref, out_ref = out_refs
    # Only the splits that get a kv block work: a short sequence (or a padding row) in a
    # grid split for long ones costs its idle splits a launch, not a state, a ticket and
    # a share of the merge. The engine sizes the grid for its page table's full width and
    # its bucket's smallest batch (InputBatchBuilder.decode_config), so most of a short
    # or padded batch's splits are idle.
    active = jnp.minimum(jnp.maximum(num_blocks, 1), num_splits)

    @pl.when((active == 1) & (split == 0))
    def _alone():  # One split holds every block (or none): no merge.
        write_output(out_ref, o, l, heads)

    @pl.when((active > 1) & (split < active))
    def _shared():
        plgpu.store(o_part_ref.at[split, heads[:, None], cols], o, mask=real_heads[:, None])
        plgpu.store(m_part_ref.at[split, heads], m, mask=real_heads)
        plgpu.store(l_part_ref.at[split, heads], l, mask=real_heads)
        # The last split of this (sequence, kv head) to finish merges all of them, as
        # CUTLASS's split-K semaphore does: every thread's stores, a CTA barrier, then one
        # release/acquire ticket at GPU scope. The merge's reads are volatile, so they come
        # from L2, past this SM's L1 (JAX 0.11.2's Triton lowering rejects ".cg").
        if not interpret:  # Interpret mode runs the programs one after another.
            plgpu.debug_barrier()
        ticket = plgpu.atomic_add(ticket_ref, jnp.int32(0), jnp.int32(1))

        @pl.when(ticket == active - 1)
        def _merge():
            merge_states(active, o_part_ref, m_part_ref, l_part_ref, out_ref)
            # Every active split has taken its ticket, so none is left to race this store;
            # the next call, a later launch on the stream, finds the ticket back at zero.
            ticket_ref[0] = jnp.int32(0)


@functools.partial(
    jax.jit,
    static_argnames=(
        "scale",
        "soft_cap",
        "sliding_window",
        "config",
        "num_splits",
        "block_kv",
        "num_warps",
        "num_stages",
        "interpret",
    ),
    donate_argnames=("decode_tickets",),
)
def paged_decode_attention(
    q: jax.Array,  # [S, num_q_heads, head_dim]
    k_cache: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim]
    v_cache: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim]
    seq_lens: jax.Array,  # [S] int32, 0 for padding rows
    block_tables: jax.Array,  # [S, max_blocks_per_seq] int32
    *,
    scale: float,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    config: DecodeConfig | None = None,
    num_splits: int | None = None,
    block_kv: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
    decode_tickets: jax.Array | None = None,  # [num_kv_heads, >= S] int32, all zero
):
    """Attention of each sequence's one query token over its cached keys.

    Returns [S, num_q_heads, head_dim] in q's dtype; rows with seq_len 0 are zeros.
    `config` defaults to the table's for (S, max_blocks_per_seq * block_size); the
    engine passes the one for the smallest batch of its bucket. `num_splits`,
    `block_kv`, `num_warps` and `num_stages`, where given, override its fields.

    With `decode_tickets` (donated; `new_decode_tickets` makes them) the kernel counts
    its splits on them instead of on tickets zeroed for the call, and returns
    (output, tickets), the tickets all zero again for the next call.
    """
    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads, num_blocks, block_size, _ = k_cache.shape
    if decode_tickets is not None and (
        decode_tickets.dtype != jnp.int32
        or decode_tickets.ndim != 2
        or decode_tickets.shape[0] != num_kv_heads
        or decode_tickets.shape[1] < num_seqs
    ):
        raise ValueError(
            f"decode_tickets must be int32 [num_kv_heads={num_kv_heads}, rows >= "
            f"{num_seqs}], got {decode_tickets.dtype} {list(decode_tickets.shape)}"
        )
    max_blocks = block_tables.shape[1]
    group = num_q_heads // num_kv_heads
    group_padded = max(16, pl.next_power_of_2(group))  # tl.dot wants M >= 16.
    config = config or decode_config(num_seqs, max_blocks * block_size, head_dim)
    overrides = dict(num_splits=num_splits, block_kv=block_kv, num_warps=num_warps, num_stages=num_stages)
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    num_splits, block_kv = config.num_splits, config.block_kv

    num_slots = num_blocks * block_size
    k_flat, v_flat = flatten_pages(k_cache), flatten_pages(v_cache)
    q4 = q.reshape(num_seqs, num_kv_heads, group, head_dim)

    kernel = functools.partial(
        _decode_kernel,
        scale=scale,
        soft_cap=soft_cap,
        sliding_window=sliding_window,
        block_size=block_size,
        block_kv=block_kv,
        group_padded=group_padded,
        num_splits=num_splits,
        interpret=interpret,
    )
    cache_spec = pl.BlockSpec((None, num_slots, head_dim), lambda s, h, k: (h, 0, 0))
    in_specs = [
        pl.BlockSpec((num_seqs,), lambda s, h, k: (0,)),
        pl.BlockSpec((num_seqs, max_blocks), lambda s, h, k: (0, 0)),
        pl.BlockSpec((None, None, group, head_dim), lambda s, h, k: (s, h, 0, 0)),
        cache_spec,
        cache_spec,
    ]
    operands = [seq_lens, block_tables, q4, k_flat, v_flat]
    aliases = {}
    out_spec = pl.BlockSpec((None, None, group, head_dim), lambda s, h, k: (s, h, 0, 0))
    out_shape = [jax.ShapeDtypeStruct(q4.shape, q.dtype)]
    out_specs = [out_spec]
    if num_splits > 1:
        # Each (sequence, kv head) takes tickets from 0 (the caller's, or a memset; they
        # alias the first output), and its splits' softmax states (unnormalised o, running
        # max m, sum l, f32) sit side by side for the last split to merge. The caller's
        # tickets go in whole (rows past S untouched): a slice would be a copy.
        tickets = decode_tickets
        if tickets is None:
            tickets = new_decode_tickets(num_kv_heads, num_seqs)
        operands.append(tickets)
        ticket_spec = pl.BlockSpec((None, 1), lambda s, h, k: (h, s))
        in_specs.append(ticket_spec)
        aliases = {len(operands) - 1: 0}
        part = (num_splits, num_seqs, num_kv_heads, group)
        out_shape = [
            jax.ShapeDtypeStruct(tickets.shape, jnp.int32),
            jax.ShapeDtypeStruct((*part, head_dim), jnp.float32),
            jax.ShapeDtypeStruct(part, jnp.float32),
            jax.ShapeDtypeStruct(part, jnp.float32),
            *out_shape,
        ]
        state_spec = pl.BlockSpec((num_splits, None, None, group), lambda s, h, k: (0, s, h, 0))
        out_specs = [
            ticket_spec,
            pl.BlockSpec((num_splits, None, None, group, head_dim), lambda s, h, k: (0, s, h, 0, 0)),
            state_spec,
            state_spec,
            out_spec,
        ]
    outs = pl.pallas_call(
        kernel,
        grid=(num_seqs, num_kv_heads, num_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="jllm_paged_decode_attention",
    )(*operands)
    out = outs[-1].reshape(q.shape)
    if decode_tickets is None:
        return out
    return out, (outs[0] if num_splits > 1 else decode_tickets)


def new_decode_tickets(num_kv_heads: int, max_num_seqs: int) -> jax.Array:
    """Zeroed split tickets for `paged_decode_attention` calls of up to `max_num_seqs`
    sequences, to thread from call to call: [num_kv_heads, max_num_seqs] int32, kv heads
    first, as in the cache, so that a sharding of the cache's kv heads shards them too."""
    return jnp.zeros((num_kv_heads, max_num_seqs), jnp.int32)


def gather_pages(cache: jax.Array, block_tables: jax.Array) -> jax.Array:
    """[num_kv_heads, num_blocks, block_size, D] -> [S, num_kv_heads, max_len, D]."""
    pages = cache[:, block_tables]  # [KVH, S, max_blocks, block_size, D]
    kvh, s, nb, bs, d = pages.shape
    return pages.reshape(kvh, s, nb * bs, d).swapaxes(0, 1)


def paged_decode_attention_reference(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    seq_lens: jax.Array,
    block_tables: jax.Array,
    *,
    scale: float,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
) -> jax.Array:
    """Plain-jnp `paged_decode_attention`: gather the pages, mask, softmax."""
    k = gather_pages(k_cache, block_tables)  # [S, K, L, D]
    v = gather_pages(v_cache, block_tables)
    keys = jnp.arange(k.shape[2])[None, :]
    valid = keys < seq_lens[:, None]
    if sliding_window is not None:
        valid &= keys > seq_lens[:, None] - 1 - sliding_window
    return masked_attention(q, k, v, valid, scale=scale, soft_cap=soft_cap)


def masked_attention(q, k, v, visible, *, scale, soft_cap=None):
    """Softmax attention of rows q [R, Nq, D] over their own keys k, v [R, K, L, D],
    where visible [R, L] marks the keys each row may see; rows that see nothing give 0.
    Computed in float32 at full precision: it is the references' common core."""
    num_rows, _, head_dim = q.shape
    num_kv_heads = k.shape[1]
    qg = q.reshape(num_rows, num_kv_heads, -1, head_dim).astype(jnp.float32)
    s = jnp.einsum("rkgd,rkld->rkgl", qg, k.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST) * scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    s = jnp.where(visible[:, None, None, :], s, -jnp.inf)
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True, initial=-1e30))
    p = jnp.where(visible[:, None, None, :], p, 0.0)
    denom = p.sum(axis=-1, keepdims=True)
    o = jnp.einsum(
        "rkgl,rkld->rkgd",
        p / jnp.where(denom == 0, 1.0, denom),
        v.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    return o.reshape(q.shape).astype(q.dtype)
