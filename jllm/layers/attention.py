"""Paged attention for one layer: write this step's K/V into the pages, then attend.

`AttentionBackend` picks the implementation from `pallas_kernels/`: the Pallas kernels
(the GPU's default; on the CPU they run in Pallas interpret mode, for tests) or their
plain-jnp references (the CPU's default, and what `attention_backend="reference"` forces
on GPU). Every backend computes the same function: token t of sequence s attends
causally to cache positions [0, positions[t]] of s (within the sliding window when one
is set), after the step's own K/V have been written.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import jax
import jax.numpy as jnp

# jax.nn.dot_product_attention hands cuDNN's softmax statistics back cast to the output
# dtype; prefix_prefill_attention needs them in float32 (see _attention_with_lse).
from jax._src.cudnn.fused_attention_stablehlo import MaskType
from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_dot_product_attention

from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jllm.distributed.mesh import TP_AXIS
from jllm.layers.attention_metadata import AttentionMetadata
from pallas_kernels import (
    new_decode_tickets,
    paged_decode_attention,
    ragged_paged_attention,
    ragged_paged_attention_reference,
    write_kv,
    write_kv_reference,
)
from pallas_kernels.paged_decode_attention import gather_pages


class KVCache(NamedTuple):
    """One layer's state on the device, threaded (donated) through every jitted step."""

    k: jax.Array  # [num_kv_heads, num_blocks, block_size, head_dim]
    v: jax.Array
    # [num_kv_heads, max_num_seqs] int32, zero between steps: the decode kernel's split
    # tickets, which it leaves zeroed, so no step pays a memset for them (one per layer).
    decode_tickets: jax.Array


# How a layer's cache splits over the tensor-parallel mesh: by kv head.
KV_CACHE_SPEC = KVCache(P(TP_AXIS, None, None, None), P(TP_AXIS, None, None, None), P(TP_AXIS, None))


def allocate_kv_cache(
    num_kv_heads: int, num_blocks: int, block_size: int, head_dim: int, max_num_seqs: int, dtype
) -> KVCache:
    shape = (num_kv_heads, num_blocks, block_size, head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), new_decode_tickets(num_kv_heads, max_num_seqs))


class AttentionBackend(str, enum.Enum):
    REFERENCE = "reference"
    PALLAS = "pallas"


def default_attention_backend(platform: str) -> AttentionBackend:
    """The kernels on accelerators; the plain-jnp reference on the CPU, where the
    kernels would run interpreted."""
    return AttentionBackend.REFERENCE if platform == "cpu" else AttentionBackend.PALLAS


def attention(
    q,
    k,
    v,
    cache: KVCache | None,
    md: AttentionMetadata,
    *,
    scale: float,
    backend: AttentionBackend,
    causal: bool = True,
    sliding_window: int | None = None,
    mesh: Mesh | None = None,
):
    """One layer's attention: over the paged cache (written first) where the layer keeps
    one, else each sequence over its own tokens in this step (pooling steps keep no cache;
    encoders are not causal). Returns (output [T, N, H], the updated cache or None).

    With a mesh, q/k/v and the cache are split by head over it and each device runs the
    kernels on its own heads (`shard_map`): attention needs no communication."""
    if cache is not None and not causal:
        raise ValueError("Bidirectional attention keeps no KV cache: pass cache=None.")

    def local(q, k, v, cache, md):
        if cache is None:
            return packed_self_attention(q, k, v, md, scale=scale, causal=causal, sliding_window=sliding_window), None
        return paged_attention(q, k, v, cache, md, scale=scale, backend=backend, sliding_window=sliding_window)

    if mesh is None:
        return local(q, k, v, cache, md)
    heads = P(None, TP_AXIS, None)
    cache_spec = P() if cache is None else KV_CACHE_SPEC
    # check_vma=False: the Pallas kernels' outputs carry no varying-axis annotation.
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(heads, heads, heads, cache_spec, P()),
        out_specs=(heads, cache_spec),
        check_vma=False,
    )(q, k, v, cache, md)


def packed_self_attention(q, k, v, md: AttentionMetadata, *, scale: float, causal: bool, sliding_window=None):
    """Attention of each sequence over its own tokens: q/k/v [T, heads, H] hold the step's
    sequences back to back (md.query_start_loc), each whole (md.seq_lens its length).

    The tokens are laid out [S, md.max_seq_len] and run through one batched
    `jax.nn.dot_product_attention` masked by the lengths: cuDNN's flash attention on the
    GPU for 16-bit inputs, XLA's otherwise; then gathered back to the flat token axis.
    Padding tokens come back as zeros."""
    L = md.max_seq_len
    T = q.shape[0]
    starts = md.query_start_loc[:-1]
    lengths = md.seq_lens
    offsets = jnp.arange(L, dtype=jnp.int32)
    index = jnp.where(offsets[None, :] < lengths[:, None], starts[:, None] + offsets[None, :], 0)  # [S, L]
    window = None if sliding_window is None else (sliding_window - 1, 0 if causal else sliding_window - 1)
    out = jax.nn.dot_product_attention(
        q[index],
        k[index],
        v[index],
        scale=scale,
        is_causal=causal,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        local_window_size=window,
        implementation="cudnn" if _use_cudnn(q) else "xla",
    )
    tokens = jnp.arange(T, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(md.query_start_loc[1:], tokens, side="right"), 0, lengths.shape[0] - 1)
    offset = tokens - starts[seq]
    real = (tokens < md.query_start_loc[-1]) & (offset < L)
    flat = out[seq, jnp.clip(offset, 0, L - 1)]
    return jnp.where(real[:, None, None], flat, jnp.zeros((), flat.dtype))


def paged_attention(
    q,
    k,
    v,
    cache: KVCache,
    md: AttentionMetadata,
    *,
    scale: float,
    backend: AttentionBackend,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
):
    """Returns (output [T, N, H], the layer's updated cache)."""
    kwargs = dict(scale=scale, sliding_window=sliding_window, soft_cap=soft_cap)
    tickets = cache.decode_tickets
    if backend == AttentionBackend.REFERENCE:
        # An in-place scatter on the donated pages (padding slots -1 are dropped).
        k_cache, v_cache = write_kv_reference(cache.k, cache.v, k, v, md.slot_mapping)
        out = ragged_paged_attention_reference(
            q, k_cache, v_cache, md.query_start_loc, md.seq_lens, md.block_tables, **kwargs
        )
        return out, KVCache(k_cache, v_cache, tickets)
    interpret = jax.default_backend() == "cpu"
    # The kernel writes the rows in place (aliased pages): 2-5x XLA's scatter on the
    # H200 (scripts/results/kernels_*.json).
    k_cache, v_cache = write_kv(cache.k, cache.v, k, v, md.slot_mapping, interpret=interpret)
    kwargs["interpret"] = interpret
    if md.fresh_prefill and soft_cap is None:
        out = fresh_prefill_attention(q, k, v, md.query_start_loc[1], scale=scale, sliding_window=sliding_window)
    elif md.prefix_prefill and soft_cap is None and sliding_window is None:
        out = prefix_prefill_attention(
            q, k, v, k_cache, v_cache, md.block_tables[0], md.seq_lens[0], md.query_start_loc[1], scale=scale
        )
    elif md.decode_only:
        # Token i is sequence i's query (S <= T); the tokens past S are padding.
        num_seqs = md.seq_lens.shape[0]
        out, tickets = paged_decode_attention(
            q[:num_seqs],
            k_cache,
            v_cache,
            md.seq_lens,
            md.block_tables,
            config=md.decode_config,
            decode_tickets=tickets,
            **kwargs,
        )
        out = jnp.pad(out, ((0, q.shape[0] - num_seqs), (0, 0), (0, 0)))
    else:
        out = ragged_paged_attention(q, k_cache, v_cache, md.query_start_loc, md.seq_lens, md.block_tables, **kwargs)
    return out, KVCache(k_cache, v_cache, tickets)


def fresh_prefill_attention(q, k, v, num_tokens, *, scale: float, sliding_window: int | None = None):
    """Causal self-attention of one sequence's first `num_tokens` tokens (q/k/v [T, heads,
    H], the rest padding) through `jax.nn.dot_product_attention`: cuDNN's flash attention
    on the GPU for 16-bit inputs, XLA's otherwise. Padding rows come back as zeros."""
    # The kernels' window (keys > position - W) is cuDNN's left window of W - 1.
    window = None if sliding_window is None else (sliding_window - 1, 0)
    # No sequence lengths: under the causal mask a real token never sees the padding
    # after it, and cuDNN's plain causal mask is faster than its padded one.
    out = jax.nn.dot_product_attention(
        q[None],
        k[None],
        v[None],
        scale=scale,
        is_causal=True,
        local_window_size=window,
        implementation="cudnn" if _use_cudnn(q) else "xla",
    )[0]
    real = jnp.arange(q.shape[0]) < num_tokens
    return jnp.where(real[:, None, None], out, jnp.zeros((), out.dtype))


def prefix_prefill_attention(q, k, v, k_cache, v_cache, block_table, seq_len, num_tokens, *, scale: float):
    """Causal attention of one sequence's prompt chunk (q/k/v [T, heads, H]: its first
    `num_tokens` tokens, the rest padding) over its cached prefix, the `seq_len -
    num_tokens` positions before it in the pages of `block_table` [max_blocks], and over
    itself. Two flash attentions merged by their log-sum-exps: the chunk over the prefix
    keys gathered from the pages (the whole table width, masked by the prefix length),
    and over its own keys, causal. On the H100 with cuDNN, at 8k and 32k tokens half of
    them cached: 453 and 565 TFLOP/s, 1.9-2x the paged kernel (scripts/results/kernels_
    nvidia-h100-80gb-hbm3_2026-11-26_162254.json). Padding rows come back as zeros."""

    def prefix(cache):  # [KVH, blocks, block_size, H] -> [blocks * block_size, KVH, H]
        return gather_pages(cache, block_table[None])[0].swapaxes(0, 1)

    o_prefix, lse_prefix = _attention_with_lse(
        q, prefix(k_cache), prefix(v_cache), scale=scale, kv_len=(seq_len - num_tokens).reshape(1)
    )
    o_self, lse_self = _attention_with_lse(q, k, v, scale=scale, causal=True)
    top = jnp.maximum(lse_prefix, lse_self)
    w_prefix = jnp.exp(lse_prefix - top)[..., None]
    w_self = jnp.exp(lse_self - top)[..., None]
    # An empty prefix (warm-up's zero lengths) has weight 0: its output must not be NaN.
    o_prefix = jnp.where(w_prefix > 0, o_prefix.astype(jnp.float32), 0.0)
    out = (o_prefix * w_prefix + o_self.astype(jnp.float32) * w_self) / (w_prefix + w_self)
    real = jnp.arange(q.shape[0]) < num_tokens
    return jnp.where(real[:, None, None], out, 0.0).astype(q.dtype)


def _attention_with_lse(q, k, v, *, scale: float, causal: bool = False, kv_len=None):
    """(output [T, N, H], float32 natural-log log-sum-exp of each row's scaled scores
    [T, N]) of q [T, N, H] over k/v [S, KVH, H]: all keys, the first kv_len [1] of them,
    or causally (key j for query i <= j). cuDNN on the GPU for 16-bit inputs, XLA's
    implementation in float32 otherwise."""
    if _use_cudnn(q):
        # jax.nn.dot_product_attention(return_residual=True) casts the statistics to the
        # output dtype: in bf16 a log-sum-exp near 20 rounds by up to 0.06, which would
        # weight the two halves of prefix_prefill_attention 6 % wrong. cuDNN's own are
        # float32, [B, N, T].
        lengths = {}
        mask = MaskType.CAUSAL if causal else MaskType.NO_MASK
        if kv_len is not None:
            lengths = dict(q_seqlen=jnp.full((1,), q.shape[0], jnp.int32), kv_seqlen=kv_len)
            mask = MaskType.PADDING
        out, lse = cudnn_dot_product_attention(
            q[None], k[None], v[None], scale=scale, mask_type=mask, return_residual=True, **lengths
        )
        return out[0], lse[0].T
    f32 = jnp.float32
    out, lse = jax.nn.dot_product_attention(
        q[None].astype(f32),
        k[None].astype(f32),
        v[None].astype(f32),
        scale=scale,
        is_causal=causal,
        key_value_seq_lengths=kv_len,
        implementation="xla",
        return_residual=True,
    )
    return out[0], lse[0]


def _use_cudnn(q) -> bool:
    """cuDNN's flash attention runs on the GPU, for 16-bit inputs."""
    return jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
