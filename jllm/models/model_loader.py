"""From a model argument to device parameters: resolve the source, read the
checkpoint (GGUF, safetensors, a pre-sharded orbax folder) or draw dummy weights, and
place them on the devices."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from jllm.layers.attention_metadata import AttentionMetadata
from jllm.models.interface import ModelFamily
from jllm.models.loader.orbax_checkpoint import is_orbax_checkpoint, restore_params
from jllm.models.weights import params_from_hf


def resolve_model_source(model: str | None, revision: str | None = None) -> str:
    """A local folder or .gguf path; None means the default model (SmolLM2-135M-Instruct)."""
    if model is None:
        from jllm.models.loader.default_model import get_default_model_path

        return get_default_model_path()
    from jllm.models.loader.hf_cache import resolve_model_path

    return resolve_model_path(model, revision)


def param_shapes(model, spec, constants: dict) -> tuple[dict, dict]:
    """The parameter tree's shapes and dtypes, and each parameter's PartitionSpec over the
    tensor-parallel mesh (as the family annotated it), without allocating anything."""
    i32 = jax.ShapeDtypeStruct((1,), jnp.int32)
    # No caches: every family then attends within the step (layers.attention), which needs
    # only max_seq_len; the parameters are the same.
    md = AttentionMetadata(
        i32, i32, jax.ShapeDtypeStruct((1, 1), jnp.int32), i32, jax.ShapeDtypeStruct((2,), jnp.int32), max_seq_len=1
    )
    consts = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in constants.items()}
    caches = [None] * spec.num_hidden_layers
    boxed = jax.eval_shape(lambda *args: model.init(jax.random.PRNGKey(0), *args), caches, i32, md, consts, i32)
    return nn.meta.unbox(boxed), nn.get_partition_spec(boxed)


def param_shardings(mesh: Mesh, specs) -> dict:
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))


def dummy_params(shapes, shardings, seed: int) -> dict:
    """vLLM's dummy weights: uniform in [-1e-3, 1e-3], norm scales at 1, each drawn on the
    devices that hold it. Quantized linears get random packed values and the identity
    act-order permutation."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)

    def draw():
        key = jax.random.PRNGKey(seed)
        out = []
        for i, (path, leaf) in enumerate(leaves):
            name = str(path[-1].key)
            if name in ("weight", "scale"):  # RMSNorm / LayerNorm scales
                out.append(jnp.ones(leaf.shape, leaf.dtype))
            elif name == "g_perm":
                out.append(jnp.arange(leaf.shape[0], dtype=leaf.dtype))
            elif name == "qweight":
                out.append(jax.random.bits(jax.random.fold_in(key, i), leaf.shape, jnp.uint32).view(leaf.dtype))
            else:
                out.append(jax.random.uniform(jax.random.fold_in(key, i), leaf.shape, leaf.dtype, -1e-3, 1e-3))
        return jax.tree_util.tree_unflatten(treedef, out)

    return jax.jit(draw, out_shardings=shardings)()


def place_params(host_params: dict, shardings: dict) -> dict:
    """Each host tensor straight into its shards, one device slice at a time: a weight is
    never whole on one device unless its sharding says so."""
    leaves, treedef = jax.tree_util.tree_flatten(host_params)
    flat_shardings = treedef.flatten_up_to(shardings)
    placed = [
        jax.make_array_from_callback(w.shape, sharding, lambda index, w=w: w[index])
        for w, sharding in zip(
            tqdm(leaves, desc="Loading weights", unit="tensor", disable=None), flat_shardings, strict=True
        )
    ]
    return jax.tree_util.tree_unflatten(treedef, placed)


def load_checkpoint(
    family: ModelFamily, model, spec, constants: dict, path: str, load_format: str, dtype, seed: int, mesh: Mesh
) -> dict:
    """The parameters on the mesh, each split as the family annotated it."""
    shapes, specs = param_shapes(model, spec, constants)
    shardings = param_shardings(mesh, specs)
    if load_format == "dummy":
        return dummy_params(shapes, shardings, seed)
    if load_format == "orbax" or (load_format == "auto" and is_orbax_checkpoint(path)):
        return restore_params(path, shapes, shardings)
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
    quant_config = getattr(spec, "quant_config", None)
    if quant_config is not None:
        weights = quant_config.convert_checkpoint(weights)
    return place_params(params_from_hf(family.hf_name_map(spec), weights, dtype, shapes), shardings)
