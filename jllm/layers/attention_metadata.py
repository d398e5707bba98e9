"""The one pytree of ragged attention metadata that every jitted step takes.

A step's tokens lie on one flat axis (T, a bucket size): the query tokens of each
scheduled sequence back to back (prefill chunks and single decode tokens alike), then
padding. Sequences lie on a second axis (S, a bucket size), padded with rows of
query length 0. The same metadata serves prefill, decode and mixed batches.
"""

from __future__ import annotations

import dataclasses

import jax

from pallas_kernels import DecodeConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    # [T] int32: absolute position of each token within its sequence (padding: 0).
    positions: jax.Array
    # [T] int32: flat cache slot (block_id * block_size + offset) the token's K/V is
    # written to; padding tokens hold -1 and are dropped.
    slot_mapping: jax.Array
    # [S, max_blocks_per_seq] int32: the physical pages of each sequence, in order
    # (unused entries 0).
    block_tables: jax.Array
    # [S] int32: tokens in each sequence's context once this step's tokens are
    # written (cached prefix + new tokens); 0 for padding rows.
    seq_lens: jax.Array
    # [S + 1] int32: where each sequence's query tokens start on the token axis;
    # padding rows repeat the total, so their query length is 0.
    query_start_loc: jax.Array
    # Static: every sequence has at most one query token, so token i belongs to
    # sequence i and the split-K decode kernel serves the step. A separate program
    # (the flag is part of the jit key), as vLLM captures decode-only CUDA graphs.
    decode_only: bool = dataclasses.field(default=False, metadata=dict(static=True))
    # Static: the step is one sequence's first prompt tokens (no cached prefix, nothing
    # else scheduled), so its attention is plain causal self-attention over this step's
    # own K/V, which cuDNN's flash attention runs faster than the paged kernel.
    fresh_prefill: bool = dataclasses.field(default=False, metadata=dict(static=True))
    # Static: the step is one sequence's prompt chunk over its cached prefix (nothing else
    # scheduled): two flash attentions, over the prefix pages and over the chunk itself,
    # merged (prefix_prefill_attention), run faster than the paged kernel.
    prefix_prefill: bool = dataclasses.field(default=False, metadata=dict(static=True))
    # Static: the decode kernel's config (kv splits, launch settings) for a decode-only
    # step, chosen on the host (InputBatchBuilder.decode_config) for the smallest batch
    # its bucket holds; None: the kernel's table by the padded batch.
    decode_config: DecodeConfig | None = dataclasses.field(default=None, metadata=dict(static=True))
    # Static, for steps that keep no KV cache (pooling): every sequence is whole in the
    # step and attends to its own tokens only; this bucket bounds the longest one, the
    # width its tokens are laid out at for attention (layers/attention.packed_self_attention).
    max_seq_len: int | None = dataclasses.field(default=None, metadata=dict(static=True))
