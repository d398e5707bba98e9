"""Pooling steps' layers against plain numpy: `packed_self_attention` (each sequence of a
packed token axis over its own tokens, causal or not, within a sliding window) and `pool`
(CLS, MEAN and LAST per sequence), with padding tokens and padding rows."""

import jax.numpy as jnp
import numpy as np
import pytest

from jllm.layers.attention import packed_self_attention
from jllm.layers.attention_metadata import AttentionMetadata
from jllm.layers.pooler import pool


def _metadata(lengths: list[int], T: int, S: int, L: int) -> AttentionMetadata:
    starts = np.zeros(S + 1, np.int32)
    starts[1 : len(lengths) + 1] = np.cumsum(lengths)
    starts[len(lengths) + 1 :] = sum(lengths)
    seq_lens = np.zeros(S, np.int32)
    seq_lens[: len(lengths)] = lengths
    positions = np.zeros(T, np.int32)
    positions[: sum(lengths)] = np.concatenate([np.arange(n) for n in lengths])
    return AttentionMetadata(
        jnp.asarray(positions),
        jnp.full((T,), -1, jnp.int32),
        jnp.zeros((S, 0), jnp.int32),
        jnp.asarray(seq_lens),
        jnp.asarray(starts),
        max_seq_len=L,
    )


def _reference(q, k, v, lengths, scale, causal, window):
    out = np.zeros_like(q)
    start = 0
    group = q.shape[1] // k.shape[1]
    for n in lengths:
        for h in range(q.shape[1]):
            qs, ks, vs = q[start : start + n, h], k[start : start + n, h // group], v[start : start + n, h // group]
            scores = qs @ ks.T * scale
            i, j = np.arange(n)[:, None], np.arange(n)[None, :]
            allowed = np.ones((n, n), bool)
            if causal:
                allowed &= j <= i
            if window is not None:
                allowed &= i - j < window
            scores = np.where(allowed, scores, -np.inf)
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            out[start : start + n, h] = (weights / weights.sum(-1, keepdims=True)) @ vs
        start += n
    return out


@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (True, 4)])
def test_packed_self_attention_matches_per_sequence_attention(causal, window, rng):
    lengths, T, S, L = [5, 1, 16, 9], 40, 6, 16
    q = rng.standard_normal((T, 4, 8)).astype(np.float32)
    k = rng.standard_normal((T, 2, 8)).astype(np.float32)
    v = rng.standard_normal((T, 2, 8)).astype(np.float32)
    md = _metadata(lengths, T, S, L)
    out = np.asarray(packed_self_attention(q, k, v, md, scale=0.3, causal=causal, sliding_window=window))
    total = sum(lengths)
    np.testing.assert_allclose(out[:total], _reference(q, k, v, lengths, 0.3, causal, window)[:total], atol=1e-5)
    np.testing.assert_array_equal(out[total:], 0.0)


def test_pool_cls_mean_last(rng):
    lengths, T, S = [3, 1, 6], 16, 5
    hidden = rng.standard_normal((T, 4)).astype(np.float32)
    md = _metadata(lengths, T, S, 8)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    for kind, expected in (
        ("CLS", [hidden[s] for s in starts[:-1]]),
        ("LAST", [hidden[e - 1] for e in starts[1:]]),
        ("MEAN", [hidden[s:e].mean(0) for s, e in zip(starts[:-1], starts[1:])]),
    ):
        got = np.asarray(pool(jnp.asarray(hidden), md.query_start_loc, kind))
        assert got.shape == (S, 4)
        np.testing.assert_allclose(got[: len(lengths)], np.stack(expected), atol=1e-6)
    with pytest.raises(ValueError, match="ALL"):
        pool(jnp.asarray(hidden), md.query_start_loc, "ALL")
