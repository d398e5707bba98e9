"""Weight-only quantized matmul (w4a16 / w8a16): x [M, K] @ W [K, N], W kept packed.

The device layout every format is converted to at load (jllm/layers/quantization):
- `qweight` int32 [K // pack, N], pack = 32 // bits: value k of column n sits at bits
  (k % pack) * bits of row k // pack (GPTQ's own qweight layout);
- `scales` [K // group_size, N] in the activation dtype;
- `qzeros` [K // group_size, N] zero points as floats, or None: symmetric, the zero
  point is 2 ** (bits - 1);
so that W[k, n] = (q[k, n] - zero[k // group_size, n]) * scales[k // group_size, n].

The kernel walks K in blocks that never straddle a group, so one row of scales and
zeros serves a whole block; each block's packed rows are read once per value (the
repeated rows hit the cache) and unpacked with shifts in registers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.tuning import QMATMUL_BLOCK_K, QMATMUL_BLOCK_N, QMATMUL_MAX_BLOCK_M, QMATMUL_NUM_WARPS


def _quantized_matmul_kernel(
    x_ref, qweight_ref, scales_ref, *rest, bits: int, group_size: int, block_m: int, block_n: int, block_k: int
):
    *zeros_refs, o_ref = rest
    m_total, k_total = x_ref.shape
    n_total = scales_ref.shape[1]
    pack = 32 // bits
    rows = pl.program_id(0) * block_m + jnp.arange(block_m)
    cols = pl.program_id(1) * block_n + jnp.arange(block_n)
    row_mask, col_mask = rows < m_total, cols < n_total
    # Masked lanes touch no memory on the GPU. In interpret mode, loads read clamped indices
    # and stores write past the end, where they cannot collide with a real write.
    rows_c, cols_c = jnp.minimum(rows, m_total - 1), jnp.minimum(cols, n_total - 1)
    shifts = ((jnp.arange(block_k) % pack) * bits)[:, None]
    mask = (1 << bits) - 1

    def step(i, acc):
        ks = i * block_k + jnp.arange(block_k)
        x = plgpu.load(x_ref.at[rows_c[:, None], ks[None, :]], mask=row_mask[:, None], other=0)
        packed = plgpu.load(qweight_ref.at[(ks // pack)[:, None], cols_c[None, :]], mask=col_mask[None, :], other=0)
        q = ((packed >> shifts) & mask).astype(jnp.float32)
        group = jnp.full((1,), (i * block_k) // group_size, jnp.int32)
        scale = plgpu.load(scales_ref.at[group[:, None], cols_c[None, :]]).astype(jnp.float32)
        if zeros_refs:
            zero = plgpu.load(zeros_refs[0].at[group[:, None], cols_c[None, :]]).astype(jnp.float32)
        else:
            zero = float(1 << (bits - 1))
        w = ((q - zero) * scale).astype(x.dtype)
        return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, k_total // block_k, step, jnp.zeros((block_m, block_n), jnp.float32))
    plgpu.store(
        o_ref.at[rows[:, None], cols[None, :]], acc.astype(o_ref.dtype), mask=row_mask[:, None] & col_mask[None, :]
    )


def _block_k(group_size: int, k: int) -> int:
    """The largest power of two up to QMATMUL_BLOCK_K that divides the group (hence K)."""
    block = QMATMUL_BLOCK_K
    while group_size % block or k % block:
        block //= 2
    return block


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "num_warps", "interpret"))
def quantized_matmul(
    x: jax.Array,  # [M, K] bf16 / f32
    qweight: jax.Array,  # [K // (32 // bits), N] int32
    scales: jax.Array,  # [K // group_size, N]
    qzeros: jax.Array | None,  # [K // group_size, N] float, or None (symmetric)
    *,
    bits: int,
    group_size: int,
    num_warps: int = QMATMUL_NUM_WARPS,
    interpret: bool = False,
) -> jax.Array:
    """x @ dequantize(qweight), accumulated in float32; returns [M, N] in x's dtype."""
    m, k = x.shape
    n = scales.shape[1]
    # Triton's dot takes at least 16 rows; decode batches pad up to it.
    block_m = min(max(16, pl.next_power_of_2(m)), QMATMUL_MAX_BLOCK_M)
    block_n = min(QMATMUL_BLOCK_N, pl.next_power_of_2(n))
    block_k = _block_k(group_size, k)
    operands = [x, qweight, scales] + ([qzeros] if qzeros is not None else [])
    kernel = functools.partial(
        _quantized_matmul_kernel, bits=bits, group_size=group_size, block_m=block_m, block_n=block_n, block_k=block_k
    )
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(m, block_m), pl.cdiv(n, block_n)),
        in_specs=[pl.BlockSpec(a.shape, lambda i, j: (0, 0)) for a in operands],
        out_specs=pl.BlockSpec((m, n), lambda i, j: (0, 0)),
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="jllm_quantized_matmul",
    )(*operands)


def dequantize(qweight: jax.Array, scales: jax.Array, qzeros: jax.Array | None, *, bits: int) -> jax.Array:
    """The float32 [K, N] weight of the device layout."""
    pack = 32 // bits
    shifts = jnp.arange(pack, dtype=jnp.int32) * bits
    q = (qweight[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)
    q = q.reshape(-1, qweight.shape[1]).astype(jnp.float32)
    group_size = q.shape[0] // scales.shape[0]
    zero = 1 << (bits - 1) if qzeros is None else jnp.repeat(qzeros.astype(jnp.float32), group_size, axis=0)
    return (q - zero) * jnp.repeat(scales.astype(jnp.float32), group_size, axis=0)


def quantized_matmul_reference(
    x: jax.Array, qweight: jax.Array, scales: jax.Array, qzeros: jax.Array | None, *, bits: int
) -> jax.Array:
    """Plain-jnp `quantized_matmul`: dequantize, then a float32-accumulated dot."""
    w = dequantize(qweight, scales, qzeros, bits=bits)
    return jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
