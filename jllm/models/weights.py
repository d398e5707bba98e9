"""Map HF-named checkpoint tensors onto the Flax parameter tree of models/llama.py.

HF stores linear weights as [out, in]; jllm's einsum kernels are [in, heads, head_dim]
(projections into heads) or [heads, head_dim, out] (o_proj), so each tensor is
transposed and reshaped once at load time, never in the step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jllm.models.llama import DecoderSpec


def _layer_map(spec: DecoderSpec, i: int) -> dict[str, tuple[tuple[str, ...], callable]]:
    N, K, H, D = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim, spec.hidden_size
    pre = f"model.layers.{i}."
    at = (f"layers_{i}", "self_attn")
    mlp = (f"layers_{i}", "mlp")
    heads_in = lambda n: lambda w: w.T.reshape(D, n, H)  # noqa: E731
    m = {
        pre + "self_attn.q_proj.weight": (at + ("q_proj",), heads_in(N)),
        pre + "self_attn.k_proj.weight": (at + ("k_proj",), heads_in(K)),
        pre + "self_attn.v_proj.weight": (at + ("v_proj",), heads_in(K)),
        pre + "self_attn.o_proj.weight": (at + ("o_proj",), lambda w: w.T.reshape(N, H, D)),
        pre + "mlp.gate_proj.weight": (mlp + ("gate_proj",), np.transpose),
        pre + "mlp.up_proj.weight": (mlp + ("up_proj",), np.transpose),
        pre + "mlp.down_proj.weight": (mlp + ("down_proj",), np.transpose),
        pre + "input_layernorm.weight": ((f"layers_{i}", "input_layernorm", "weight"), None),
        pre + "post_attention_layernorm.weight": ((f"layers_{i}", "post_attention_layernorm", "weight"), None),
    }
    if spec.qkv_bias:
        m[pre + "self_attn.q_proj.bias"] = (at + ("q_bias",), lambda b: b.reshape(N, H))
        m[pre + "self_attn.k_proj.bias"] = (at + ("k_bias",), lambda b: b.reshape(K, H))
        m[pre + "self_attn.v_proj.bias"] = (at + ("v_bias",), lambda b: b.reshape(K, H))
    if spec.o_bias:
        m[pre + "self_attn.o_proj.bias"] = (at + ("o_bias",), None)
    if spec.mlp_bias:
        for name in ("gate", "up", "down"):
            m[pre + f"mlp.{name}_proj.bias"] = (mlp + (f"{name}_bias",), None)
    if spec.qk_norm:
        m[pre + "self_attn.q_norm.weight"] = (at + ("q_norm", "weight"), None)
        m[pre + "self_attn.k_norm.weight"] = (at + ("k_norm", "weight"), None)
    return m


def hf_name_map(spec: DecoderSpec) -> dict[str, tuple[tuple[str, ...], callable]]:
    """HF tensor name -> (param path, host-side transform or None)."""
    m = {
        "model.embed_tokens.weight": (("embed_tokens",), None),
        "model.norm.weight": (("norm", "weight"), None),
    }
    if not spec.tie_word_embeddings:
        m["lm_head.weight"] = (("lm_head",), np.transpose)
    for i in range(spec.num_hidden_layers):
        m.update(_layer_map(spec, i))
    return m


def params_from_hf(spec: DecoderSpec, hf_weights: dict[str, np.ndarray], dtype, shapes) -> dict:
    """Builds {'params': ...} with every leaf of `shapes` (from `jax.eval_shape` of init).

    Checkpoint tensors that the model does not use (rotary caches, ...) are ignored;
    a missing or mis-shaped tensor is an error naming it.
    """
    name_map = hf_name_map(spec)
    flat = {}
    for name, (path, transform) in name_map.items():
        if name not in hf_weights:
            raise ValueError(f"Checkpoint is missing tensor {name!r} needed by the model.")
        w = np.asarray(hf_weights[name])
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
        node[path[-1]] = jnp.asarray(w, dtype=dtype)
    return {"params": tree}
