"""pallas_kernels.quantized_matmul on CPU: the kernel (Pallas interpret mode) against its
plain-jnp reference, and the reference against a float64 numpy dequantize-then-dot.

Each case combines several features (bits, zero points or symmetric, group size, rows
that pad or tile M, columns that do not fill a block, dtype) to keep interpret mode to a
handful of calls.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jllm.layers.quantization.layout import pack_rows
from pallas_kernels.quantized_matmul import quantized_matmul, quantized_matmul_reference

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")


def _case(rng, m, k, n, bits, group_size, zero_point):
    """Random x and packed weights, with the float64 x @ W they stand for."""
    groups = k // group_size
    q = rng.integers(0, 1 << bits, (k, n))
    scales = rng.uniform(0.01, 0.1, (groups, n)).astype(np.float32)
    zeros = rng.integers(0, 1 << bits, (groups, n)).astype(np.float32) if zero_point else None
    zero = np.repeat(zeros, group_size, 0) if zero_point else 1 << (bits - 1)
    x = rng.normal(size=(m, k)).astype(np.float32)
    expected = x.astype(np.float64) @ ((q - zero) * np.repeat(scales, group_size, 0))
    packed = jnp.asarray(pack_rows(q, bits))
    return x, packed, jnp.asarray(scales), None if zeros is None else jnp.asarray(zeros), expected


# (m, k, n, bits, group_size (k: GPTQ's -1), zero_point, dtype)
CASES = [
    (1, 128, 96, 4, 32, True, jnp.float32),  # decode row, N not a multiple of the block
    (20, 256, 64, 4, 128, False, jnp.float32),  # symmetric, K in two steps
    (70, 128, 64, 8, 64, True, jnp.float32),  # 8-bit, M tiled past one block
    (5, 192, 128, 8, 192, False, jnp.bfloat16),  # one group over all of K, bf16
]


@pytest.mark.parametrize("m, k, n, bits, group_size, zero_point, dtype", CASES)
def test_quantized_matmul_matches_reference(rng, m, k, n, bits, group_size, zero_point, dtype):
    x, packed, scales, zeros, _ = _case(rng, m, k, n, bits, group_size, zero_point)
    x, scales = jnp.asarray(x, dtype), scales.astype(dtype)
    zeros = None if zeros is None else zeros.astype(dtype)
    out = quantized_matmul(x, packed, scales, zeros, bits=bits, group_size=group_size, interpret=True)
    reference = quantized_matmul_reference(x, packed, scales, zeros, bits=bits)
    assert out.shape == (m, n) and out.dtype == dtype
    # Float32 sums of |values| up to ~100 in another order; bf16 rounds the output itself.
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-4
    reference = np.asarray(reference, np.float32)
    np.testing.assert_allclose(np.asarray(out, np.float32), reference, rtol=tol, atol=tol * np.abs(reference).max())


@pytest.mark.parametrize("bits, zero_point", [(4, True), (8, False)])
def test_quantized_matmul_reference_matches_numpy(rng, bits, zero_point):
    x, packed, scales, zeros, expected = _case(rng, 3, 128, 32, bits, 32, zero_point)
    out = quantized_matmul_reference(jnp.asarray(x), packed, scales, zeros, bits=bits)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
