"""Rotary position embeddings (HF's rotate-half convention), default and "llama3" scaling.

The cos/sin table is computed once on the host for every position up to
max_model_len and gathered by position inside the jitted step, as vLLM's
`cos_sin_cache` does; inverse frequencies follow transformers' float32 arithmetic
so that float32 outputs match HF token for token.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def rope_parameters(hf_config) -> dict:
    """The config's RoPE settings as one dict with `rope_type` and `rope_theta`."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.get("type", "default"))
    if params.get("rope_theta") is None:
        params["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    return params


def compute_inv_freq(head_dim: int, params: dict, max_position_embeddings: int) -> np.ndarray:
    base = float(params["rope_theta"])
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(base) ** exponents)).astype(np.float32)
    rope_type = params["rope_type"]
    if rope_type == "default":
        return inv_freq
    if rope_type == "llama3":
        factor = params["factor"]
        low_freq_factor = params["low_freq_factor"]
        high_freq_factor = params["high_freq_factor"]
        old_context_len = params.get("original_max_position_embeddings", max_position_embeddings)
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = (2 * math.pi / inv_freq).astype(np.float32)
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
        smooth = ((old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)).astype(
            np.float32
        )
        smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return np.where(is_medium, smoothed, scaled).astype(np.float32)
    if rope_type == "linear":
        return (inv_freq / np.float32(params["factor"])).astype(np.float32)
    raise ValueError(f"rope_type {rope_type!r} is not supported; supported: 'default', 'linear', 'llama3'.")


def cos_sin_cache(head_dim: int, params: dict, max_position_embeddings: int, num_positions: int) -> np.ndarray:
    """[num_positions, head_dim] float32: cos in the first half, sin in the second."""
    inv_freq = compute_inv_freq(head_dim, params, max_position_embeddings)
    freqs = np.arange(num_positions, dtype=np.float32)[:, None] * inv_freq[None, :]
    return np.concatenate([np.cos(freqs), np.sin(freqs)], axis=-1).astype(np.float32)


def apply_rotary(x: jnp.ndarray, cos_sin: jnp.ndarray) -> jnp.ndarray:
    """x: [T, heads, head_dim]; cos_sin: [T, head_dim] rows gathered by position."""
    half = x.shape[-1] // 2
    cos = cos_sin[:, None, :half].astype(x.dtype)
    sin = cos_sin[:, None, half:].astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
