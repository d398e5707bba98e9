"""How every model family declares its parameters: projection weights (any einsum layout)
and biases. The initializers only shape `jax.eval_shape` of init and tests that init a
model; served weights come from checkpoints or `dummy_params`."""

from __future__ import annotations

import flax.linen as nn
import jax


def weight_param(module: nn.Module, name: str, shape: tuple[int, ...], dtype) -> jax.Array:
    return module.param(name, nn.initializers.lecun_normal(), shape, dtype)


def bias_param(module: nn.Module, name: str, shape: tuple[int, ...], dtype) -> jax.Array:
    return module.param(name, nn.initializers.zeros, shape, dtype)
