"""Which attention path a step takes, and the static config that path compiles with.

A step's path is part of its compiled program, so it is chosen on the host from the
step's shape alone: decode-only steps (one query token per row) run the split-K paged
decode kernel at a kv-split count fixed per token bucket; a lone sequence's prompt
chunk in a large enough bucket runs cuDNN's flash attention, alone (fresh prefill) or
over its cached prefix (prefix prefill) where that pays; everything else runs the
ragged paged kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

from jllm.worker.buckets import pick_bucket
from pallas_kernels import DecodeConfig, decode_config

# A prefix-prefill step gathers K/V over the page table's whole width, per layer (XLA
# wants a static width), then runs cuDNN at ~450 TFLOP/s where the paged kernel runs at
# ~240 (H100, BUILD_NOTES.md, "Attention paths"). The gather moves 8 * kv_heads * head_dim
# bytes per table token (K and V in 16 bits, read and written) at ~2.6 TB/s; cuDNN saves
# 4 * q_heads * head_dim * (1/240e12 - 1/450e12) s per (query, key) pair. So the path
# pays while the table is narrower than 2.5e-3 * (q_heads / kv_heads) tokens per pair
# the chunk attends to: a 512-token chunk over 512 cached tokens of a Llama stops paying
# at a 3.9k-token table, a 2048-token chunk over 2048 at 63k. Half that, for margin.
PREFIX_PREFILL_TABLE_TOKENS_PER_PAIR = 1.25e-3


@dataclass(frozen=True)
class AttentionPath:
    decode_only: bool = False
    fresh_prefill: bool = False
    prefix_prefill: bool = False
    decode_config: DecodeConfig | None = None


@dataclass
class AttentionPlanner:
    block_size: int
    token_buckets: tuple[int, ...]
    max_num_seqs: int
    # Whether steps whose every row has one query token are marked decode-only, for
    # the attention backend's split-K decode kernel.
    decode_kernel: bool = False
    # Token buckets from which a step that is one sequence's prompt chunk runs cuDNN's
    # flash attention; None: never. Small buckets keep the paged kernel: the gain is in
    # long prompts, and each marked bucket is two more programs to compile.
    fresh_prefill_min_tokens: int | None = None
    head_dim: int = 128  # The decode kernel's configs are tuned per head_dim.
    num_queries_per_kv: int = 1  # Sizes what prefix prefill saves.

    def num_seqs_for(self, num_tokens: int) -> int:
        """The sequence axis follows the token bucket (every row has at least one token),
        so a step's shape is fixed by its token and page buckets alone."""
        return min(num_tokens, self.max_num_seqs)

    def plan(self, num_rows: int, num_tokens: int, T: int, P: int, first_row_computed: int) -> AttentionPath:
        """The path of a step of `num_rows` rows and `num_tokens` tokens in token bucket T
        and page bucket P; `first_row_computed`: the first row's cached tokens."""
        if self.decode_kernel and num_tokens == num_rows:
            return AttentionPath(decode_only=True, decode_config=self.decode_config(T, P))
        if self.fresh_prefill_min_tokens is None or num_rows != 1 or T < self.fresh_prefill_min_tokens:
            return AttentionPath()
        if first_row_computed == 0:
            return AttentionPath(fresh_prefill=True)
        return AttentionPath(prefix_prefill=self._prefix_prefill_pays(P, first_row_computed, num_tokens))

    def decode_token_buckets(self) -> tuple[int, ...]:
        """The token buckets a decode-only step can land in (one token per row)."""
        if not self.decode_kernel:
            return ()
        largest = pick_bucket(self.token_buckets, min(self.max_num_seqs, self.token_buckets[-1]))
        return tuple(t for t in self.token_buckets if t <= largest)

    def fresh_prefill_token_buckets(self) -> tuple[int, ...]:
        """The token buckets a fresh-prefill or prefix-prefill step can land in."""
        if self.fresh_prefill_min_tokens is None:
            return ()
        return tuple(t for t in self.token_buckets if t >= self.fresh_prefill_min_tokens)

    def decode_config(self, num_tokens: int, num_pages: int) -> DecodeConfig:
        """The decode kernel's config (kv splits, launch settings) for a decode-only step
        of token bucket `num_tokens` and page-table width `num_pages`: the kernel's table
        at the smallest batch that lands in the bucket, and the width's context.

        The padded batch would mislead the table: a lone sequence decodes in the
        smallest bucket (16 rows by default), whose table row gives 1 split, and one
        program per kv head then walks the whole context (1 x 8192 d128 on the H100:
        184 us against 19 us with 32 splits). Over-splitting costs far less: in the same
        sweep, batch 8 lost at most 16 % to 32 splits (8 x 2048 d128: 36.7 against
        31.5 us). Fixed per bucket, so it adds no compiled program.
        """
        buckets = self.decode_token_buckets()
        smaller = [t for t in buckets if t < num_tokens]
        smallest_batch = min(smaller[-1] + 1 if smaller else 1, self.num_seqs_for(num_tokens))
        return decode_config(smallest_batch, num_pages * self.block_size, self.head_dim)

    def _prefix_prefill_pays(self, num_pages: int, cached: int, num_tokens: int) -> bool:
        """Whether a chunk of `num_tokens` over `cached` tokens gains more from cuDNN than
        its gather of `num_pages` pages of K/V costs (PREFIX_PREFILL_TABLE_TOKENS_PER_PAIR)."""
        pairs = num_tokens * (cached + num_tokens / 2)
        limit = PREFIX_PREFILL_TABLE_TOKENS_PER_PAIR * self.num_queries_per_kv * pairs
        return num_pages * self.block_size <= limit
