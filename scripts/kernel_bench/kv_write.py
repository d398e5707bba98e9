"""KV-write section of the kernel benchmark: jllm's aliased write kernel against XLA's
scatter, and a check of the compiled HLO that the donated cache is not copied."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import write_kv, write_kv_reference
from scripts.bench_utils import (
    Job,
    chained,
    compile_all,
    first_line,
    full_copies_in_hlo,
    log,
    median_seconds,
    rel_err,
)
from scripts.kernel_bench.common import GUESS_TBPS, Bench, random_normal


def bench_kv_write(bench: Bench, rng) -> None:
    plan, heads = bench.plan, bench.plan.decode_heads[0]
    cache_shape = (heads.num_kv_heads, plan.kv_write_blocks, plan.page_size, heads.head_dim)
    k_cache, v_cache = random_normal(6, cache_shape), random_normal(7, cache_shape)
    num_slots = plan.kv_write_blocks * plan.page_size
    kernel = functools.partial(write_kv, interpret=bench.interpret)
    for tokens in plan.kv_write_tokens:
        if bench.out_of_time():
            log(f"kv_write T={tokens}: skipped (time budget)")
            continue
        new_shape = (tokens, heads.num_kv_heads, heads.head_dim)
        slots = jnp.asarray(rng.permutation(num_slots)[:tokens], jnp.int32)
        args = (k_cache, v_cache, random_normal(8, new_shape), random_normal(9, new_shape), slots)
        # New K and V rows read, then written into the cache.
        nbytes = 2 * 2 * tokens * heads.num_kv_heads * heads.head_dim * 2
        log(f"kv_write {heads.model} T={tokens}: {nbytes / 1e6:.2f} MB moved")
        expected = jax.jit(write_kv_reference)(*args)
        for name, fn in (("jllm_kv_write", kernel), ("xla_reference_kv_write", write_kv_reference)):
            bench.results.add_row(**bench_one_write(bench, name, fn, args, expected, heads, nbytes))
        del expected
        bench.results.write()
    check_kv_write_hlo(bench, kernel, k_cache, v_cache, plan.kv_write_tokens[0], heads)


def bench_one_write(bench, name, write, args, expected, heads, nbytes) -> dict:
    """Checks one KV write against `expected` (the reference's caches), then times it."""
    row = dict(
        kernel=name,
        model=heads.model,
        batch=args[2].shape[0],
        context=None,
        num_q_heads=heads.num_q_heads,
        num_kv_heads=heads.num_kv_heads,
        head_dim=heads.head_dim,
        page_size=bench.plan.page_size,
        ms=None,
        tbps=None,
        tflops=None,
        max_rel_err=None,
    )
    guess = nbytes / (GUESS_TBPS * 1e12) + 5e-6
    reps = bench.reps_for(guess)
    try:
        step = compile_all({name: Job(chained(write, reps, carry=2), args, (0, 1))}, 1)[name]
        if isinstance(step, Exception):
            raise step
        # The caches are donated: the program gets copies, then threads its own outputs.
        state = list(step(jnp.copy(args[0]), jnp.copy(args[1]), *args[2:]))
        row["max_rel_err"] = rel_err(zip(state, expected))

        def call():
            state[:] = step(*state, *args[2:])
            return state

        row["ms"] = 1e3 * median_seconds(call, bench.iters, back_to_back=bench.programs_per_sample(reps * guess)) / reps
        row["tbps"] = nbytes / row["ms"] / 1e9
        log(f"  {name:<60} {row['ms']:9.4f} ms  {row['tbps']:6.3f} TB/s  err {row['max_rel_err']:.1e}")
    except Exception as error:  # noqa: BLE001
        row["error"] = first_line(error)
        log(f"  {name:<60} failed: {row['error']}")
    return row


def check_kv_write_hlo(bench, kernel, k_cache, v_cache, tokens, heads) -> None:
    """Greps the optimized HLO of write_kv with donated caches for a whole-cache copy."""
    new = jax.ShapeDtypeStruct((tokens, heads.num_kv_heads, heads.head_dim), jnp.bfloat16)
    slots = jax.ShapeDtypeStruct((tokens,), jnp.int32)
    try:
        hlo = jax.jit(kernel, donate_argnums=(0, 1)).lower(k_cache, v_cache, new, new, slots).compile().as_text()
        kvh, blocks, page, d = k_cache.shape
        copies = full_copies_in_hlo(hlo, [k_cache.shape, (kvh, blocks * page, d)])
        aliased = "input_output_alias" in hlo
        verdict = (
            "ok: cache aliased, no full-cache copy"
            if aliased and not copies
            else f"BAD: aliased={aliased}, {len(copies)} full-cache copies"
        )
        bench.results.record["kv_write_hlo"] = dict(verdict=verdict, aliased=aliased, copies=copies)
    except Exception as error:  # noqa: BLE001
        verdict = f"check failed: {first_line(error)}"
        bench.results.record["kv_write_hlo"] = dict(verdict=verdict)
    log(f"kv_write HLO with donated cache {tuple(k_cache.shape)}: {verdict}")
    bench.results.write()
