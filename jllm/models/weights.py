"""Map HF-named checkpoint tensors onto a family's Flax parameter tree.

Each family gives a name map (`hf_name_map(spec)`: HF tensor name -> parameter path and a
host-side transform), so a tensor is transposed or reshaped once, at load time, never in
the step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _find(hf_weights: dict, name: str):
    """The tensor `name`, or the same without its first component: a base model saved on
    its own (Qwen3-Embedding's `layers.0...`, BertModel's `embeddings...`) lacks the
    `model.` / `bert.` prefix its task model adds."""
    if name in hf_weights:
        return hf_weights[name]
    _, _, bare = name.partition(".")
    return hf_weights.get(bare)


def params_from_hf(name_map: dict, hf_weights: dict[str, np.ndarray], dtype, shapes) -> dict:
    """Builds {'params': ...} with every leaf of `shapes` (from `jax.eval_shape` of init), as
    host arrays in `dtype` (`model_loader.place_params` puts them on the devices).

    Checkpoint tensors that the model does not use (rotary caches, another head) are
    ignored; a missing or mis-shaped tensor is an error naming it.
    """
    flat = {}
    for name, (path, transform) in name_map.items():
        w = _find(hf_weights, name)
        if w is None:
            raise ValueError(f"Checkpoint is missing tensor {name!r} needed by the model.")
        w = np.asarray(w)
        if transform is not None:
            w = transform(w)
        flat[path] = w
    expected = {tuple(k.key for k in kp[1:]): v for kp, v in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    missing = set(expected) - set(flat)
    if missing:
        raise ValueError(f"Parameters not provided by the checkpoint: {sorted(missing)[:5]}")
    tree: dict = {}
    for path, leaf in expected.items():
        w = flat[path]
        if tuple(w.shape) != tuple(leaf.shape):
            raise ValueError(f"Tensor for {'.'.join(path)} has shape {w.shape}, expected {leaf.shape}.")
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        # Quantized weights' packed integers keep their type; floats take the model's.
        target = jnp.dtype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf.dtype
        node[path[-1]] = np.ascontiguousarray(w, dtype=target)
    return {"params": tree}
