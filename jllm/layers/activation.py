"""Activations by their HF config name (`activation_function`, `hidden_act`), as
transformers' ACT2FN computes them; vLLM's `get_act_fn`."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def _gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def _gelu_erf(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


def _quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


# gelu_new (GPT-2), gelu_fast and gelu_pytorch_tanh are all the tanh approximation:
# 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), up to how the constant is spelt.
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": _gelu_erf,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_tanh": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def get_act_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"Activation function {name!r} is not supported; supported: {sorted(_ACTIVATIONS)}.")
    return _ACTIVATIONS[name]
