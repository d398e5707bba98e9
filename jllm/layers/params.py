"""How every model family declares its parameters: projection weights (any einsum layout)
and biases, each with how it splits over the tensor-parallel mesh.

`sharding` names, per axis, the mesh axis the parameter is split along (None: that axis
is whole on every device); the loader reads it (`nn.get_partition_spec`) to place each
shard straight on its device. The initializers only shape `jax.eval_shape` of init and
tests that init a model; served weights come from checkpoints or `dummy_params`.
"""

from __future__ import annotations

import flax.linen as nn
import jax


def _init(init, sharding: tuple[str | None, ...] | None):
    return init if sharding is None else nn.with_partitioning(init, sharding)


def weight_param(
    module: nn.Module, name: str, shape: tuple[int, ...], dtype, sharding: tuple[str | None, ...] | None = None
) -> jax.Array:
    return module.param(name, _init(nn.initializers.lecun_normal(), sharding), shape, dtype)


def bias_param(
    module: nn.Module, name: str, shape: tuple[int, ...], dtype, sharding: tuple[str | None, ...] | None = None
) -> jax.Array:
    return module.param(name, _init(nn.initializers.zeros, sharding), shape, dtype)


def embedding_param(
    module: nn.Module, name: str, shape: tuple[int, ...], dtype, sharding: tuple[str | None, ...] | None = None
) -> jax.Array:
    return module.param(name, _init(nn.initializers.normal(0.02), sharding), shape, dtype)
