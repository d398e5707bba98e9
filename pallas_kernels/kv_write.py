"""Scatter one step's new K/V rows into the paged KV cache, in place.

Each token's K and V go to flat slot `slot_mapping[t]` (block_id * block_size +
offset) of every kv head's pages; slots of -1 (padding tokens) are dropped. The
caches are aliased to the outputs, so under a jit that donates them the write
touches only the new rows (`tests/kernels/test_kernels.py` checks the HLO).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.paged_decode_attention import flatten_pages
from pallas_kernels.tuning import KV_WRITE_BLOCK_TOKENS, KV_WRITE_NUM_WARPS


def _kv_write_kernel(
    slot_mapping_ref, k_ref, v_ref, k_cache_in_ref, v_cache_in_ref, k_cache_ref, v_cache_ref, *, block_tokens: int
):
    # k_ref / v_ref: [T, head_dim] of one kv head; *_cache_ref: [num_slots, head_dim].
    del k_cache_in_ref, v_cache_in_ref  # Aliased to the outputs.
    num_tokens, head_dim = k_ref.shape
    num_slots = k_cache_ref.shape[0]
    tokens = pl.program_id(0) * block_tokens + jnp.arange(block_tokens)
    in_range = tokens < num_tokens
    slots = plgpu.load(slot_mapping_ref.at[tokens], mask=in_range, other=-1)
    write = slots >= 0
    # Masked lanes touch no memory on the GPU; in interpret mode an index past the
    # end keeps them from colliding with a real write.
    slots = jnp.where(write, slots, num_slots)
    # Index with integer arrays only: interpret mode can't mix them with slices.
    cols = jnp.arange(head_dim)[None, :]
    rows_in, rows_out = tokens[:, None], slots[:, None]
    row_mask, write_mask = in_range[:, None], write[:, None]
    for new_ref, cache_ref in ((k_ref, k_cache_ref), (v_ref, v_cache_ref)):
        new = plgpu.load(new_ref.at[rows_in, cols], mask=row_mask, other=0)
        plgpu.store(cache_ref.at[rows_out, cols], new.astype(cache_ref.dtype), mask=write_mask)


@functools.partial(
    jax.jit, static_argnames=("block_tokens", "num_warps", "interpret"), donate_argnames=("k_cache", "v_cache")
)
def write_kv(
    k_cache: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim]
    v_cache: jax.Array,  # [num_kv_heads, num_blocks, block_size, head_dim]
    k: jax.Array,  # [T, num_kv_heads, head_dim]
    v: jax.Array,  # [T, num_kv_heads, head_dim]
    slot_mapping: jax.Array,  # [T] int32, -1 = drop
    *,
    block_tokens: int = KV_WRITE_BLOCK_TOKENS,
    num_warps: int = KV_WRITE_NUM_WARPS,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Returns (k_cache, v_cache) with the new rows written, in place: the caches
    are donated (inside a jitted step, donate them to that step)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    cache_shape = k_cache.shape
    num_slots = cache_shape[1] * cache_shape[2]
    k_flat, v_flat = flatten_pages(k_cache), flatten_pages(v_cache)
    block_tokens = min(block_tokens, pl.next_power_of_2(num_tokens))
    new_spec = pl.BlockSpec((num_tokens, None, head_dim), lambda i, h: (0, h, 0))
    cache_spec = pl.BlockSpec((None, num_slots, head_dim), lambda i, h: (h, 0, 0))
    k_out, v_out = pl.pallas_call(
        functools.partial(_kv_write_kernel, block_tokens=block_tokens),
        grid=(pl.cdiv(num_tokens, block_tokens), num_kv_heads),
        in_specs=[
            pl.BlockSpec((num_tokens,), lambda i, h: (0,)),
            new_spec,
            new_spec,
            cache_spec,
            cache_spec,
        ],
        out_specs=[cache_spec, cache_spec],
        out_shape=[jax.ShapeDtypeStruct(k_flat.shape, k_flat.dtype), jax.ShapeDtypeStruct(v_flat.shape, v_flat.dtype)],
        input_output_aliases={3: 0, 4: 1},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="jllm_kv_write",
    )(slot_mapping, k, v, k_flat, v_flat)
    return k_out.reshape(cache_shape), v_out.reshape(cache_shape)


def write_kv_reference(
    k_cache: jax.Array,
    v_cache: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slot_mapping: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Plain-jnp `write_kv`: a scatter that drops the -1 slots."""
    _, num_blocks, block_size, _ = k_cache.shape
    num_slots = num_blocks * block_size
    # Negative indices would wrap around; send them past the end to be dropped.
    slots = jnp.where(slot_mapping < 0, num_slots, slot_mapping)

    def scatter(cache, new):
        flat = flatten_pages(cache).at[:, slots].set(jnp.swapaxes(new, 0, 1).astype(cache.dtype), mode="drop")
        return flat.reshape(cache.shape)

    return scatter(k_cache, k), scatter(v_cache, v)
