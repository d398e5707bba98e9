"""Prefill section of the kernel benchmark: causal TFLOP/s of the ragged kernel on one
sequence, with and without a cached prefix, next to the engine's fresh-prefill and
prefix-prefill paths, JAX's Pallas `attention.mha` and cuDNN on the same K/V."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.gpu import attention as jax_attention

from jllm.layers.attention import fresh_prefill_attention, prefix_prefill_attention
from pallas_kernels import ragged_paged_attention, ragged_paged_attention_reference
from pallas_kernels.paged_decode_attention import gather_pages
from scripts.bench_utils import log, rel_err
from scripts.kernel_bench.common import (
    CHECK_ROWS,
    GUESS_TFLOPS,
    Bench,
    Heads,
    Variant,
    fastest,
    random_normal,
    run_variants,
)

# Settings of the ragged kernel timed at each prefill length; the first ({}) is its
# default.
PREFILL_SETTINGS = (
    {},
    {"block_q": 16, "block_kv": 64},
    {"block_q": 32, "block_kv": 64, "num_stages": 3},
    {"block_q": 32, "block_kv": 128, "num_warps": 8},
    {"block_q": 32, "block_kv": 64, "num_warps": 4},
    {"block_q": 64, "block_kv": 64, "num_warps": 8},
)


def causal_flops(heads: Heads, context: int, cached: int = 0) -> float:
    """FLOPs of causal attention for the query tokens at positions cached .. context-1.

    The token at position p sees p + 1 keys; each (query head, key) pair costs two
    matmul rows of head_dim multiply-adds (QK^T and PV), 2 FLOPs each:
    4 * num_q_heads * head_dim * sum(p + 1), i.e. 4 * H * d * T(T+1)/2 without a prefix.
    """
    visible_pairs = (context * (context + 1) - cached * (cached + 1)) // 2
    return 4.0 * heads.num_q_heads * heads.head_dim * visible_pairs


@functools.partial(jax.jit, static_argnames="scale")
def _ragged_reference_rows(q, k_cache, v_cache, block_tables, first_pos, *, scale):
    """The reference output of the query rows q [n, H, D] at positions first_pos ..."""
    n = q.shape[0]
    query_start_loc = jnp.array([0, n], jnp.int32)
    seq_lens = (first_pos + n).reshape(1).astype(jnp.int32)
    return ragged_paged_attention_reference(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale=scale)


def bench_prefill(bench: Bench) -> None:
    for tokens in bench.plan.prefill_tokens:
        if bench.out_of_time():
            log(f"prefill T={tokens}: skipped (time budget)")
            continue
        bench_prefill_shape(bench, bench.plan.prefill_heads, tokens)
        bench.results.write()


def bench_prefill_shape(bench: Bench, heads: Heads, tokens: int) -> None:
    page_size = bench.plan.page_size
    log(f"prefill {heads.model} T={tokens}")
    pages = tokens // page_size
    cache_shape = (heads.num_kv_heads, pages, page_size, heads.head_dim)
    k_cache, v_cache = random_normal(3, cache_shape), random_normal(4, cache_shape)
    block_tables = jnp.asarray(np.random.default_rng(tokens).permutation(pages)[None], jnp.int32)
    q = random_normal(5, (tokens, heads.num_q_heads, heads.head_dim))
    scale = heads.head_dim**-0.5
    cached = tokens // 2
    prefix_q = q[cached:]

    def checker(q_rows, first_pos):
        """Compares an output's first and last CHECK_ROWS rows, those of q_rows at
        positions first_pos ..., with the reference."""
        n = CHECK_ROWS
        head = _ragged_reference_rows(q_rows[:n], k_cache, v_cache, block_tables, jnp.int32(first_pos), scale=scale)
        tail = _ragged_reference_rows(
            q_rows[-n:], k_cache, v_cache, block_tables, jnp.int32(first_pos + q_rows.shape[0] - n), scale=scale
        )
        return lambda out: rel_err([(out[:n], head), (out[-n:], tail)])

    full = jllm_prefill_variants(bench, heads, q, k_cache, v_cache, block_tables, scale)
    prefix = Variant(
        "jllm_prefill_prefix",
        {"cached_tokens": cached},
        functools.partial(ragged_paged_attention, scale=scale, interpret=bench.interpret),
        ragged_args(prefix_q, k_cache, v_cache, block_tables, tokens),
    )

    def chunk(cache):  # The chunk's own K/V [tokens - cached, kv heads, D], as a step has them.
        return gather_pages(cache, block_tables[:, cached // page_size :])[0].swapaxes(0, 1)

    # The engine's path for a lone chunk over a cached prefix: cuDNN over the prefix pages
    # and over the chunk, merged.
    prefix_split = Variant(
        "jllm_prefill_prefix_cudnn",
        {"cached_tokens": cached},
        functools.partial(prefix_prefill_attention, scale=scale),
        (
            prefix_q,
            chunk(k_cache),
            chunk(v_cache),
            k_cache,
            v_cache,
            block_tables[0],
            jnp.int32(tokens),
            jnp.int32(tokens - cached),
        ),
    )
    dense = dense_variants(bench, heads, q, k_cache, v_cache, block_tables, scale)

    flops = causal_flops(heads, tokens)
    guess = flops / (GUESS_TFLOPS * 1e12)

    def tflops(work):
        return lambda ms: f"{work / ms / 1e9:7.1f} TFLOP/s"

    run_variants(bench, full + dense, guess, checker(q, 0), tflops(flops))
    prefix_flops = causal_flops(heads, tokens, cached)
    run_variants(
        bench, [prefix, prefix_split], guess * prefix_flops / flops, checker(prefix_q, cached), tflops(prefix_flops)
    )

    for v in full:
        bench.results.add_sweep(
            kernel=v.kernel,
            context=tokens,
            head_dim=heads.head_dim,
            **v.params,
            ms=v.ms,
            max_rel_err=v.max_rel_err,
            error=v.error,
        )
    picks = [
        ("jllm_prefill", full[0], flops, tokens),
        ("jllm_prefill_prefix", prefix, prefix_flops, tokens - cached),
        ("jllm_prefill_prefix_cudnn", prefix_split, prefix_flops, tokens - cached),
        *((d.kernel, d, flops, tokens) for d in dense),
    ]
    best = fastest(full)
    if best is not None and best is not full[0]:
        log(f"  -> fastest ragged settings: {best.label}")
        picks.insert(1, ("jllm_prefill_best", best, flops, tokens))
    for kernel, v, work, query_len in picks:
        bench.results.add_row(
            **prefill_row(
                kernel,
                v,
                heads,
                tokens,
                query_len,
                work,
                page_size if kernel.startswith("jllm") and "fresh" not in kernel else None,
            )
        )


def ragged_args(q, k_cache, v_cache, block_tables, context):
    """The ragged kernel's arguments for one sequence of `context` tokens whose last
    q.shape[0] tokens are queried."""
    query_start_loc = jnp.array([0, q.shape[0]], jnp.int32)
    return (q, k_cache, v_cache, query_start_loc, jnp.array([context], jnp.int32), block_tables)


def jllm_prefill_variants(bench, heads, q, k_cache, v_cache, block_tables, scale) -> list[Variant]:
    """The ragged kernel over the whole sequence: its defaults first, then PREFILL_SETTINGS."""
    args = ragged_args(q, k_cache, v_cache, block_tables, q.shape[0])
    variants = []
    for params in PREFILL_SETTINGS:
        fn = functools.partial(ragged_paged_attention, scale=scale, interpret=bench.interpret, **params)
        variants.append(Variant("jllm_prefill", params, fn, args))
    return variants


def dense_variants(bench, heads, q, k_cache, v_cache, block_tables, scale) -> list[Variant]:
    """jllm's fresh-prefill path, JAX's Pallas flash attention and cuDNN on the same K/V,
    laid out densely [1, T, heads, D]; outputs come back as [T, heads, D]."""

    def dense(cache):
        return gather_pages(cache, block_tables).swapaxes(1, 2)  # [1, T, kv heads, D]

    k, v = dense(k_cache), dense(v_cache)
    group = heads.num_q_heads // heads.num_kv_heads
    # mha has no GQA: K/V repeated per query head beforehand, outside the timing.
    k_rep, v_rep = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)

    def mha(q, k, v):
        return jax_attention.mha(q[None], k, v, None, sm_scale=scale, causal=True, interpret=bench.interpret)[0]

    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(q[None], k, v, scale=scale, is_causal=True, implementation="cudnn")[0]

    def fresh(q, k, v):
        # The engine's path for a prefill without a cached prefix (this step's own K/V).
        return fresh_prefill_attention(q, k[0], v[0], jnp.int32(q.shape[0]), scale=scale)

    return [
        Variant("jllm_prefill_fresh", {}, fresh, (q, k, v)),
        Variant("jax_flash_attention", {}, mha, (q, k_rep, v_rep)),
        Variant("cudnn", {}, cudnn, (q, k, v)),
    ]


def prefill_row(kernel, v: Variant, heads, context, query_len, flops, page_size) -> dict:
    row = dict(
        kernel=kernel,
        model=heads.model,
        batch=1,
        context=context,
        query_len=query_len,
        num_q_heads=heads.num_q_heads,
        num_kv_heads=heads.num_kv_heads,
        head_dim=heads.head_dim,
        page_size=page_size,
        ms=v.ms,
        tbps=None,
        tflops=flops / v.ms / 1e9 if v.ms else None,
        max_rel_err=v.max_rel_err,
        **v.params,
    )
    if v.error:
        row["error"] = v.error
    return row
