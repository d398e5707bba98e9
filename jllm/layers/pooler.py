"""Pooling: a step's hidden states [T, D] (sequences back to back) -> one vector per
sequence [S, D], by its first token (CLS), the mean of its tokens (MEAN) or its last
token (LAST), as vLLM's poolers and sentence-transformers' Pooling module compute them.
"ALL" keeps every token, and needs no pooling here."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pool(hidden: jax.Array, query_start_loc: jax.Array, pooling_type: str) -> jax.Array:
    """hidden [T, D]; query_start_loc [S + 1] (padding rows repeat the total) -> [S, D]
    in hidden's dtype (the mean is taken in float32). Padding rows give zeros for MEAN
    and some real token's vector otherwise; their results are never read."""
    starts, ends = query_start_loc[:-1], query_start_loc[1:]
    if pooling_type == "CLS":
        return hidden[starts]
    if pooling_type == "LAST":
        return hidden[jnp.maximum(ends - 1, 0)]
    if pooling_type == "MEAN":
        num_seqs = starts.shape[0]
        tokens = jnp.arange(hidden.shape[0], dtype=jnp.int32)
        # Padding tokens (past the total) fall into segment num_seqs, which is dropped.
        segment = jnp.searchsorted(ends, tokens, side="right")
        sums = jax.ops.segment_sum(hidden.astype(jnp.float32), segment, num_segments=num_seqs)
        counts = jnp.maximum(ends - starts, 1).astype(jnp.float32)
        return (sums / counts[:, None]).astype(hidden.dtype)
    raise ValueError(f"pooling_type {pooling_type!r} does not pool to one vector per sequence.")
