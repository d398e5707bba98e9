"""Projections as families declare them: a float einsum weight, or, where the checkpoint is
quantized, its packed device tensors multiplied by the quantized matmul.

`linear` contracts x's trailing axes with the weight's leading `num_in_dims` axes, as every
projection of the families does ("TD,DNH->TNH", "TNH,NHD->TD"). A quantized weight is one
[K, N] matrix of the flattened axes; a split axis must lead its side, so the flattened
axis splits the same way.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jllm.distributed.mesh import tp_size
from jllm.layers.params import weight_param
from jllm.layers.quantization import QuantizationConfig
from jllm.layers.quantization.layout import pack_factor
from pallas_kernels.quantized_matmul import quantized_matmul, quantized_matmul_reference


class QuantizedLinear(nn.Module):
    """x [T, K] @ the packed [K, N] weight; `sharding` = (K's mesh axis, N's mesh axis)."""

    in_features: int
    out_features: int
    quant_config: QuantizationConfig
    dtype: jnp.dtype
    sharding: tuple[str | None, str | None]
    use_kernel: bool
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x):
        q, K, N = self.quant_config, self.in_features, self.out_features
        bits = q.weight_bits
        group_size = K if q.group_size == -1 else q.group_size
        in_axis, out_axis = self.sharding
        if in_axis is not None and (q.group_size == -1 or K // tp_size(self.mesh) % group_size):
            raise ValueError(
                f"Tensor parallel size {tp_size(self.mesh)} would split a quantization group of {self.name} "
                f"({K} input features, group_size {q.group_size}); choose a size that splits whole groups."
            )

        def param(name, shape, dtype, init=nn.initializers.zeros, sharding=self.sharding):
            return self.param(name, nn.with_partitioning(init, sharding), shape, dtype)

        qweight = param("qweight", (K // pack_factor(bits), N), jnp.int32)
        scales = param("scales", (K // group_size, N), self.dtype, nn.initializers.ones)
        qzeros = param("qzeros", (K // group_size, N), self.dtype) if q.zero_point else None
        if q.desc_act:
            arange = lambda key, shape, dtype: jnp.arange(shape[0], dtype=dtype)  # noqa: E731
            x = x[:, param("g_perm", (K,), jnp.int32, arange, (None,))]
        if not self.use_kernel:
            return quantized_matmul_reference(x, qweight, scales, qzeros, bits=bits)

        def local(x, qweight, scales, *zeros):
            out = quantized_matmul(x, qweight, scales, *(zeros or (None,)), bits=bits, group_size=group_size)
            # A row split's shards hold partial sums.
            return jax.lax.psum(out, in_axis) if in_axis is not None else out

        weights = (qweight, scales) + ((qzeros,) if q.zero_point else ())
        if tp_size(self.mesh) == 1 or self.sharding == (None, None):
            return local(x, *weights)
        # The kernel runs on each device's shard; check_vma=False: its output carries no
        # varying-axis annotation.
        w_spec = P(in_axis, out_axis)
        return jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(P(None, in_axis),) + (w_spec,) * len(weights),
            out_specs=P(None, out_axis),
            check_vma=False,
        )(x, *weights)


def linear(
    module: nn.Module,
    name: str,
    equation: str,
    x: jax.Array,
    shape: tuple[int, ...],
    dtype,
    sharding: tuple[str | None, ...],
    *,
    num_in_dims: int = 1,
    quant_config: QuantizationConfig | None = None,
    use_kernel: bool = False,
    mesh: Mesh | None = None,
) -> jax.Array:
    """einsum(equation, x, weight [*in, *out]) with the weight declared on `module` as `name`."""
    if quant_config is None:
        return jnp.einsum(equation, x, weight_param(module, name, shape, dtype, sharding))
    in_shape, out_shape = shape[:num_in_dims], shape[num_in_dims:]
    split = lambda axes: next((a for a in axes if a is not None), None)  # noqa: E731
    layer = QuantizedLinear(
        math.prod(in_shape),
        math.prod(out_shape),
        quant_config,
        dtype,
        (split(sharding[:num_in_dims]), split(sharding[num_in_dims:])),
        use_kernel,
        mesh,
        name=name,
    )
    lead = x.shape[: x.ndim - num_in_dims]
    return layer(x.reshape(math.prod(lead), -1)).reshape(*lead, *out_shape)
