"""From a model argument to device parameters: resolve the source, read the
checkpoint (GGUF, safetensors) or draw dummy weights, and place them on the device."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jllm.layers.attention import allocate_kv_cache
from jllm.layers.attention_metadata import AttentionMetadata
from jllm.models.interface import ModelFamily
from jllm.models.weights import params_from_hf


def resolve_model_source(model: str | None, revision: str | None = None) -> str:
    """A local folder or .gguf path; None means the default model (SmolLM2-135M-Instruct)."""
    if model is None:
        from jllm.models.loader.default_model import get_default_model_path

        return get_default_model_path()
    from jllm.models.loader.hf_cache import resolve_model_path

    return resolve_model_path(model, revision)


def param_shapes(model, spec, constants: dict) -> dict:
    """The parameter tree's shapes and dtypes, without allocating anything."""
    t = 1
    cache = jax.eval_shape(lambda: allocate_kv_cache(spec.num_key_value_heads, 1, 1, spec.head_dim, 1, model.dtype))
    caches = [cache] * spec.num_hidden_layers
    i32 = jax.ShapeDtypeStruct((t,), jnp.int32)
    # max_seq_len: encoders attend without a cache whatever the caches passed, at that width.
    md = AttentionMetadata(
        i32, i32, jax.ShapeDtypeStruct((1, 1), jnp.int32), i32, jax.ShapeDtypeStruct((2,), jnp.int32), max_seq_len=t
    )
    consts = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in constants.items()}
    return jax.eval_shape(lambda *args: model.init(jax.random.PRNGKey(0), *args), caches, i32, md, consts, i32)


def dummy_params(shapes, seed: int) -> dict:
    """vLLM's dummy weights: uniform in [-1e-3, 1e-3], norm scales at 1, drawn on the device."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    key = jax.random.PRNGKey(seed)
    out = []
    for i, (path, leaf) in enumerate(leaves):
        name = str(path[-1].key)
        if name in ("weight", "scale"):  # RMSNorm / LayerNorm scales
            out.append(jnp.ones(leaf.shape, leaf.dtype))
        else:
            out.append(jax.random.uniform(jax.random.fold_in(key, i), leaf.shape, leaf.dtype, -1e-3, 1e-3))
    return jax.tree_util.tree_unflatten(treedef, out)


def load_checkpoint(
    family: ModelFamily, model, spec, constants: dict, path: str, load_format: str, dtype, seed: int
) -> dict:
    shapes = param_shapes(model, spec, constants)
    if load_format == "dummy":
        return dummy_params(shapes, seed)
    is_gguf = path.endswith(".gguf")
    if load_format == "gguf" and not is_gguf:
        raise ValueError(f"load_format='gguf' needs a .gguf file, got {path}.")
    if load_format == "safetensors" and is_gguf:
        raise ValueError(f"load_format='safetensors' needs an HF folder, got {path}.")
    if is_gguf:
        from jllm.models.loader.gguf_loader import load_gguf_weights

        weights = load_gguf_weights(path)
    else:
        from jllm.models.loader.safetensors_loader import load_safetensors

        weights = load_safetensors(path)
    return params_from_hf(family.hf_name_map(spec), weights, dtype, shapes)
