"""On-device sampling inside the jitted step, per request, in vLLM V1's order.

1. raw logprobs (vLLM's default logprobs_mode) from the untouched logits;
2. allowed_token_ids whitelist, banned ids (bad words, min_tokens), logit_bias;
3. repetition, then frequency and presence penalties;
4. greedy rows take the argmax; random rows: temperature -> min_p -> top-k/top-p ->
   an exponential race (Gumbel-max) under a per-request key folded from the request's
   seed and its output position, so a seeded request samples the same tokens
   whatever else is in the batch.
Optional parts have width 0 when no request in the batch uses them, which keeps
the common step free of their cost; widths come from buckets (model_runner).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_NEG_INF = -jnp.inf


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingMetadata:
    temperature: jax.Array  # [S] f32; 0 marks a greedy row
    top_k: jax.Array  # [S] i32; 0 disables
    top_p: jax.Array  # [S] f32; 1 disables
    min_p: jax.Array  # [S] f32; 0 disables
    seed_hi: jax.Array  # [S] u32: high and low halves of the request's 64-bit seed
    seed_lo: jax.Array  # [S] u32
    step: jax.Array  # [S] i32: the output position being sampled (folded into the key)
    presence_penalty: jax.Array  # [S] f32
    frequency_penalty: jax.Array  # [S] f32
    repetition_penalty: jax.Array  # [S] f32
    prompt_token_ids: jax.Array  # [S, Lp] i32, -1 padded; Lp = 0 without penalties
    output_token_ids: jax.Array  # [S, Lo] i32, -1 padded; Lo = 0 without penalties
    bias_token_ids: jax.Array  # [S, Lb] i32, -1 padded
    bias_values: jax.Array  # [S, Lb] f32
    banned_token_ids: jax.Array  # [S, Ln] i32, -1 padded (bad words, min_tokens)
    allowed_token_ids: jax.Array  # [S, La] i32, -1 padded
    has_allowed: jax.Array  # [S] bool: the row restricts to allowed_token_ids


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    sampled_token_ids: jax.Array  # [S] i32
    # With num_logprobs == 0 these have width 0 / are zeros.
    topk_token_ids: jax.Array  # [S, k] i32
    topk_logprobs: jax.Array  # [S, k] f32
    sampled_logprobs: jax.Array  # [S] f32
    sampled_ranks: jax.Array  # [S] i32, 1-based rank in the vocabulary


def _row_mask(ids: jax.Array, vocab_size: int) -> jax.Array:
    """[S, L] ids (-1 padded) -> [S, V] bool membership."""
    rows = jnp.arange(ids.shape[0])[:, None]
    cols = jnp.where(ids < 0, vocab_size, ids)
    return jnp.zeros((ids.shape[0], vocab_size), bool).at[rows, cols].set(True, mode="drop")


def _row_counts(ids: jax.Array, vocab_size: int) -> jax.Array:
    rows = jnp.arange(ids.shape[0])[:, None]
    cols = jnp.where(ids < 0, vocab_size, ids)
    return jnp.zeros((ids.shape[0], vocab_size), jnp.float32).at[rows, cols].add(1.0, mode="drop")


def apply_logits_processors(logits: jax.Array, md: SamplingMetadata) -> jax.Array:
    """Everything before temperature: whitelist, bans, bias, penalties."""
    vocab_size = logits.shape[-1]
    if md.allowed_token_ids.shape[1]:
        allowed = _row_mask(md.allowed_token_ids, vocab_size) | ~md.has_allowed[:, None]
        logits = jnp.where(allowed, logits, _NEG_INF)
    if md.banned_token_ids.shape[1]:
        logits = jnp.where(_row_mask(md.banned_token_ids, vocab_size), _NEG_INF, logits)
    if md.bias_token_ids.shape[1]:
        rows = jnp.arange(logits.shape[0])[:, None]
        cols = jnp.where(md.bias_token_ids < 0, vocab_size, md.bias_token_ids)
        logits = logits.at[rows, cols].add(md.bias_values, mode="drop")
    if md.prompt_token_ids.shape[1] or md.output_token_ids.shape[1]:
        counts = _row_counts(md.output_token_ids, vocab_size)
        seen = _row_mask(md.prompt_token_ids, vocab_size) | (counts > 0)
        rep = md.repetition_penalty[:, None]
        logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
        logits = logits - md.frequency_penalty[:, None] * counts
        logits = logits - md.presence_penalty[:, None] * (counts > 0)
    return logits


def apply_min_p(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    # p < min_p * max(p) is logit < max(logit) + log(min_p): one max instead of a softmax
    # over the vocabulary; min_p 0 gives a threshold of -inf, which drops nothing.
    threshold = jnp.max(logits, axis=-1, keepdims=True) + jnp.log(min_p)[:, None]
    return jnp.where(logits < threshold, _NEG_INF, logits)


def apply_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """vLLM's sort-based filter: ties with the k-th value survive; top-p keeps the
    smallest head of the distribution whose mass reaches p (at least one token)."""
    vocab_size = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)
    k = jnp.where(top_k <= 0, vocab_size, jnp.minimum(top_k, vocab_size))
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
    logits = jnp.where(logits < kth, _NEG_INF, logits)
    sorted_desc = jnp.where(jnp.arange(vocab_size)[None, :] < k[:, None], sorted_desc, _NEG_INF)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # p >= 1 disables top-p outright: in float32 a dominant head's mass can round to 1,
    # and `mass_before < 1` alone would then cut the whole tail.
    keep = (mass_before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    # The smallest kept logit is the cut-off for each row.
    cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, _NEG_INF, logits)


def _row_keys(md: SamplingMetadata) -> jax.Array:
    def key(hi, lo, step):
        k = jax.random.fold_in(jax.random.PRNGKey(hi), lo)
        return jax.random.fold_in(k, step)

    return jax.vmap(key)(md.seed_hi, md.seed_lo, md.step)


def compute_logprobs(logits: jax.Array, token_ids: jax.Array, num_logprobs: int):
    """Top-`num_logprobs` of log_softmax(logits) plus the given tokens' logprobs and ranks."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_lp = jnp.take_along_axis(logprobs, token_ids[:, None], axis=-1)[:, 0]
    ranks = jnp.sum(logprobs > token_lp[:, None], axis=-1).astype(jnp.int32) + 1
    top_lp, top_ids = jax.lax.top_k(logprobs, num_logprobs)
    return top_ids.astype(jnp.int32), top_lp, token_lp, ranks


def sample(logits: jax.Array, md: SamplingMetadata, *, num_logprobs: int) -> SamplerOutput:
    """logits [S, V] float32 -> SamplerOutput. `num_logprobs` is static.

    A batch of greedy rows skips the sort and the noise at run time (`lax.cond`),
    so greedy and random batches share one compiled program.
    """
    raw_logits = logits
    logits = apply_logits_processors(logits.astype(jnp.float32), md)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    is_greedy = md.temperature <= 0.0

    def sample_random(logits):
        scaled = logits / jnp.where(is_greedy, 1.0, md.temperature)[:, None]
        scaled = apply_min_p(scaled, md.min_p)
        # XLA:CPU sorts a 49k vocabulary in ~25 ms a row, so the sort runs only when
        # some row filters (the filter leaves rows with top_k 0, top_p 1 unchanged).
        uses_top_k_top_p = jnp.any((md.top_k > 0) | (md.top_p < 1.0))
        scaled = jax.lax.cond(uses_top_k_top_p, lambda x: apply_top_k_top_p(x, md.top_k, md.top_p), lambda x: x, scaled)
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (logits.shape[-1],), jnp.float32))(_row_keys(md))
        random = jnp.argmax(scaled + gumbel, axis=-1).astype(jnp.int32)
        return jnp.where(is_greedy, greedy, random)

    # Measured on the H100 (BUILD_NOTES): dropping this cond on the GPU, where XLA reads
    # its predicate on the host, saved nothing measurable per step.
    sampled = jax.lax.cond(jnp.all(is_greedy), lambda _: greedy, sample_random, logits)
    num_rows = logits.shape[0]
    if num_logprobs:
        top_ids, top_lp, lp, ranks = compute_logprobs(raw_logits, sampled, num_logprobs)
    else:
        top_ids = jnp.zeros((num_rows, 0), jnp.int32)
        top_lp = jnp.zeros((num_rows, 0), jnp.float32)
        lp = jnp.zeros((num_rows,), jnp.float32)
        ranks = jnp.zeros((num_rows,), jnp.int32)
    return SamplerOutput(sampled, top_ids, top_lp, lp, ranks)
