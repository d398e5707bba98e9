"""Decode section of the kernel benchmark: TB/s of the paged decode kernel over a
num_splits sweep (and launch settings, with --decode-param-sweep), the config table's
choice, JAX's Pallas `paged_attention` at its best settings and the jitted XLA gather
reference; and the per-head_dim config tables the sweep suggests."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged

from pallas_kernels import (
    DecodeConfig,
    decode_config,
    new_decode_tickets,
    paged_decode_attention,
    paged_decode_attention_reference,
)
from pallas_kernels.tuning import DECODE_BATCHES, DECODE_CONTEXTS, DECODE_TABLES
from scripts.bench_utils import log, rel_err
from scripts.kernel_bench.common import (
    CHECK_ROWS,
    GUESS_TBPS,
    Bench,
    Heads,
    Variant,
    fastest,
    fastest_on_device,
    profile_kernel_ms,
    random_normal,
    run_variants,
)

# The decode KV cache may take this share of device memory; the rest is for the XLA
# reference, which gathers the pages it reads into float32 (about 3x their bytes).
CACHE_FRACTION = 0.4
REFERENCE_FRACTION = 0.8
REFERENCE_BYTES_PER_KV_BYTE = 3
# H100 and H200 L2 sizes are 50 and 60 MB: decode calls rotate over enough page sets
# that the K/V of consecutive calls spans at least twice this (bench_utils.chained).
L2_BYTES = 60 << 20
SPLIT_CANDIDATES = (1, 2, 4, 8, 16, 32)
# A split count is timed only while half of it gives fewer programs (batch x kv heads x
# splits) than this many per SM: past that, more splits only add merge work.
PROGRAMS_PER_SM_ENOUGH = 16
JLLM_DECODE_BLOCK_KV = DecodeConfig(1).block_kv  # The split sweep's keys per inner step.
JAX_PAGES_PER_COMPUTE_BLOCK = (8, 4, 16)
# Launch settings of JAX's kernel tried against its defaults (8 warps, 2 stages) at its
# best split count and block: jllm's decode defaults, and each change alone.
JAX_LAUNCH_SETTINGS = ({"num_warps": 4}, {"num_stages": 3}, {"num_warps": 4, "num_stages": 3})
# Launch settings of the decode kernel tried against DecodeConfig's defaults (block_kv 64,
# 4 warps, 3 stages) with --decode-param-sweep, at the split sweep's best count and the
# table's; settings of 32-key blocks also at twice the splits (the same keys per split).
DECODE_PARAM_SETTINGS = (
    {"block_kv": 128},
    {"block_kv": 32},
    {"num_stages": 1},
    {"num_stages": 2},
    {"num_stages": 4},
    {"num_warps": 8},
    {"block_kv": 128, "num_warps": 8},
    {"block_kv": 128, "num_stages": 2},
    {"num_warps": 2},
    {"num_warps": 2, "num_stages": 2},
    {"num_warps": 2, "num_stages": 1},
    {"block_kv": 32, "num_warps": 2, "num_stages": 2},
    {"block_kv": 32, "num_stages": 2},
)


def kv_bytes(heads: Heads, batch: int, context: int) -> int:
    """K and V bytes a decode step reads: every sequence's pages up to its context, once."""
    return 2 * batch * context * heads.num_kv_heads * heads.head_dim * 2  # bf16


def useful_splits(batch: int, heads: Heads, num_sms: int, most: int) -> list[int]:
    """Split counts worth timing: at most `most`, and doubling only while the grid of
    batch * kv heads * splits programs is still short of filling the device."""
    enough = PROGRAMS_PER_SM_ENOUGH * num_sms
    return [s for s in SPLIT_CANDIDATES if s <= most and (s == 1 or batch * heads.num_kv_heads * s // 2 < enough)]


def decode_batch(rng, heads: Heads, batch: int, context: int, cache_pages: int, page_size: int):
    """q, seq_lens and block tables of `batch` sequences of `context` tokens each: as many
    tables as it takes for their K/V to span twice the L2 (within the cache's pages), on
    disjoint pages drawn at random from the whole cache."""
    pages = batch * (context // page_size)
    per_call = kv_bytes(heads, batch, context)
    count = max(1, min(-(-2 * L2_BYTES // per_call), cache_pages // pages))
    drawn = rng.permutation(cache_pages)[: count * pages].reshape(count, batch, -1)
    q = random_normal(batch * 7 + context, (batch, heads.num_q_heads, heads.head_dim))
    tables = tuple(jnp.asarray(t, jnp.int32) for t in drawn)
    return q, jnp.full((batch,), context, jnp.int32), tables


def bench_decode(bench: Bench, rng) -> None:
    plan = bench.plan
    for heads in plan.decode_heads:
        shapes = [(b, c) for b in plan.batches for c in plan.contexts]
        fits = [s for s in shapes if kv_bytes(heads, *s) <= CACHE_FRACTION * bench.memory_bytes]
        for batch, context in shapes:
            if (batch, context) not in fits:
                log(f"decode {heads.model} B={batch} ctx={context}: skipped (memory)")
                bench.results.add_row(
                    **decode_row("jllm_decode", heads, batch, context, plan.page_size, skipped="memory")
                )
        if not fits:
            continue
        # One cache per model, as large as its largest shape: every shape draws its pages
        # from it, so no shape pays to fill a cache of its own.
        cache_pages = max(b * c for b, c in fits) // plan.page_size
        cache_shape = (heads.num_kv_heads, cache_pages, plan.page_size, heads.head_dim)
        k_cache, v_cache = random_normal(1, cache_shape), random_normal(2, cache_shape)
        cache_bytes = 2 * k_cache.nbytes
        for batch, context in fits:
            if bench.out_of_time():
                log(f"decode {heads.model} B={batch} ctx={context}: skipped (time budget)")
                bench.results.add_row(
                    **decode_row("jllm_decode", heads, batch, context, plan.page_size, skipped="time budget")
                )
                continue
            bench_decode_shape(bench, rng, heads, batch, context, k_cache, v_cache, cache_bytes)
            bench.results.write()
        del k_cache, v_cache


def bench_decode_shape(bench, rng, heads, batch, context, k_cache, v_cache, cache_bytes):
    page_size = bench.plan.page_size
    nbytes = kv_bytes(heads, batch, context)
    guess = nbytes / (GUESS_TBPS * 1e12) + 5e-6
    log(
        f"decode {heads.model} B={batch} ctx={context}: K+V {nbytes / 1e9:.3f} GB, "
        f"{bench.reps_for(guess)} calls/program"
    )
    q, seq_lens, tables = decode_batch(rng, heads, batch, context, k_cache.shape[1], page_size)
    scale = heads.head_dim**-0.5
    rows = min(batch, CHECK_ROWS)
    reference = functools.partial(paged_decode_attention_reference, scale=scale)
    expected = jax.jit(reference)(q[:rows], k_cache, v_cache, seq_lens[:rows], tables[0][:rows])

    def check(out):
        return rel_err([(out[:rows], expected)])

    def figure(ms):
        return f"{nbytes / ms / 1e9:6.3f} TB/s"

    args = (q, k_cache, v_cache, seq_lens, tables)
    rotating = (4,)  # The tables.
    table = decode_config(batch, context, heads.head_dim)
    most_splits = -(-context // JLLM_DECODE_BLOCK_KV)
    splits = useful_splits(batch, heads, bench.num_sms, most_splits)

    # jllm's kernel runs as the engine runs it: on split tickets handed from call to call
    # (returned zeroed), so no call pays a memset.
    jllm_args = (q, new_decode_tickets(heads.num_kv_heads, batch), *args[1:])

    def jllm_variant(config: DecodeConfig) -> Variant:
        def call(q, tickets, k_cache, v_cache, seq_lens, table):
            return paged_decode_attention(
                q,
                k_cache,
                v_cache,
                seq_lens,
                table,
                scale=scale,
                config=config,
                interpret=bench.interpret,
                decode_tickets=tickets,
            )

        return Variant("jllm_decode", dataclasses.asdict(config), call, jllm_args, (5,), carry=2)

    configs = [DecodeConfig(s) for s in splits]
    jllm = [jllm_variant(c) for c in configs + ([table] if table not in configs else [])]
    # JAX's kernel takes no softmax scale: q is scaled beforehand, outside the timing.
    jax_args = (q * jnp.asarray(scale, q.dtype), k_cache, v_cache, tables, seq_lens)
    pages = context // page_size
    k_splits = [s for s in useful_splits(batch, heads, bench.num_sms, pages) if pages % s == 0]
    jax_variants = [jax_paged_variant(bench, jax_args, s, JAX_PAGES_PER_COMPUTE_BLOCK[0]) for s in k_splits]
    xla = []
    reference_bytes = cache_bytes + REFERENCE_BYTES_PER_KV_BYTE * nbytes
    if reference_bytes <= REFERENCE_FRACTION * bench.memory_bytes:
        xla = [Variant("xla_reference", {}, reference, args, rotating)]
    else:
        log("  xla_reference: skipped (memory)")
    run_variants(bench, jllm + jax_variants + xla, guess, check, figure, profile=True)
    if bench.decode_params:  # Launch settings at the best split count and the table's.
        best = fastest_on_device(jllm) or jllm[0]
        more = [
            jllm_variant(c)
            for c in launch_setting_configs(
                (best.params["num_splits"], table.num_splits), context, tried={DecodeConfig(**v.params) for v in jllm}
            )
        ]
        run_variants(bench, more, guess, check, figure, profile=True)
        jllm += more

    # JAX's kernel: then its compute block size at its best split count, then its launch
    # settings at its best of those ("best" by kernel time where profiled).
    best_jax = fastest_on_device(jax_variants)
    if best_jax is not None:
        more = jax_block_variants(bench, jax_args, pages, best_jax.params["k_splits"])
        run_variants(bench, more, guess, check, figure, profile=True)
        jax_variants += more
        best_jax = fastest_on_device(jax_variants)
        more = [
            jax_paged_variant(
                bench, jax_args, best_jax.params["k_splits"], best_jax.params["pages_per_compute_block"], **launch
            )
            for launch in JAX_LAUNCH_SETTINGS
        ]
        run_variants(bench, more, guess, check, figure, profile=True)
        jax_variants += more
    record_decode(bench, heads, batch, context, nbytes, jllm, table, jax_variants, xla)


def launch_setting_configs(split_counts, context: int, tried=frozenset()) -> list[DecodeConfig]:
    """DECODE_PARAM_SETTINGS at each of `split_counts` (32-key blocks also at twice the
    splits: the same keys per split), leaving out the configs in `tried` and those whose
    splits would leave more than half idle on `context` keys."""
    seen, configs = set(tried), []
    for splits in dict.fromkeys(split_counts):
        for setting in DECODE_PARAM_SETTINGS:
            config = dataclasses.replace(DecodeConfig(splits), **setting)
            doubled = dataclasses.replace(config, num_splits=2 * splits)
            for c in (config, doubled) if config.block_kv == 32 else (config,):
                if c not in seen and c.num_splits * c.block_kv <= 2 * context:
                    seen.add(c)
                    configs.append(c)
    return configs


def jax_paged_variant(bench, jax_args, k_splits, pages_per_compute_block, **launch) -> Variant:
    fn = functools.partial(
        jax_paged.paged_attention,
        k_splits=k_splits,
        pages_per_compute_block=pages_per_compute_block,
        interpret=bench.interpret,
        **launch,
    )
    return Variant(
        "jax_paged_attention",
        {"k_splits": k_splits, "pages_per_compute_block": pages_per_compute_block, **launch},
        fn,
        jax_args,
        (3,),
    )


def jax_block_variants(bench, jax_args, pages, k_splits) -> list[Variant]:
    """The other compute block sizes that differ in effect at this split count and that
    the kernel accepts (it clamps the block to the partition, which the block must divide)."""
    partition = pages // k_splits
    tried = {min(JAX_PAGES_PER_COMPUTE_BLOCK[0], partition)}
    variants = []
    for block in JAX_PAGES_PER_COMPUTE_BLOCK[1:]:
        effective = min(block, partition)
        if effective not in tried and partition % effective == 0:
            tried.add(effective)
            variants.append(jax_paged_variant(bench, jax_args, k_splits, block))
    return variants


def decode_row(kernel, heads, batch, context, page_size, variant=None, nbytes=None, copy_tbps=None, **extra) -> dict:
    row = dict(
        kernel=kernel,
        model=heads.model,
        batch=batch,
        context=context,
        num_q_heads=heads.num_q_heads,
        num_kv_heads=heads.num_kv_heads,
        head_dim=heads.head_dim,
        page_size=page_size,
        ms=None,
        tbps=None,
        tflops=None,
        max_rel_err=None,
    )
    if variant is not None:
        row.update(variant.params, ms=variant.ms, max_rel_err=variant.max_rel_err)
        if variant.ms is not None:
            row["tbps"] = nbytes / variant.ms / 1e9
            if copy_tbps:
                row["share_of_copy"] = row["tbps"] / copy_tbps
        if variant.error:
            row["error"] = variant.error
    row.update(extra)
    return row


def record_decode(bench, heads, batch, context, nbytes, jllm, table, jax_variants, xla):
    page_size, results = bench.plan.page_size, bench.results
    # run_variants profiled every variant; a second trace for any that one left without a
    # kernel time (bursts not told apart). At the smallest shapes the wall time per call
    # also holds the launch gaps, which move with the host.
    profile_kernel_ms(bench, jllm + jax_variants + xla)
    for v in jllm + jax_variants + xla:
        results.add_sweep(
            kernel=v.kernel,
            model=heads.model,
            batch=batch,
            context=context,
            head_dim=heads.head_dim,
            **v.params,
            ms=v.ms,
            kernel_ms=v.kernel_ms,
            max_rel_err=v.max_rel_err,
            error=v.error,
        )
        v.program = None  # Done with the compiled programs.
    table_variant = next(v for v in jllm if v.params == dataclasses.asdict(table))
    best, best_jax = fastest(jllm) or jllm[0], fastest(jax_variants)
    picks = [
        ("jllm_decode", best, jllm),
        ("jllm_decode_table", table_variant, [table_variant]),
        ("jax_paged_attention", best_jax or (jax_variants or [None])[0], jax_variants),
        ("xla_reference", xla[0] if xla else None, xla),
    ]
    if best.ms and table_variant.ms:
        versus = f"; jax paged's best takes {best_jax.ms / best.ms:.2f}x" if best_jax else ""
        log(f"  -> best {best.label}; the table's takes {table_variant.ms / best.ms:.2f}x its time{versus}")
    for kernel, variant, pool in picks:
        if variant is None:
            skipped = "memory" if kernel == "xla_reference" else "no valid settings"
            results.add_row(**decode_row(kernel, heads, batch, context, page_size, skipped=skipped))
            continue
        # The least kernel time of any of this kernel's variants: the fastest by wall
        # time need not be the fastest on the device.
        by_kernel = fastest(pool, by="kernel_ms")
        results.add_row(
            **decode_row(
                kernel,
                heads,
                batch,
                context,
                page_size,
                variant,
                nbytes,
                bench.copy_tbps,
                kernel_ms=variant.kernel_ms,
                best_kernel_ms=by_kernel and by_kernel.kernel_ms,
                best_kernel_params=by_kernel and by_kernel.params,
            )
        )


# Within this share of a cell's fastest time, a config with fewer launch settings changed
# from the defaults is preferred: closer than that, one run's order is noise.
TABLE_TIE = 0.01


def suggested_decode_table(sweeps: list[dict]) -> str:
    """`tuning.DECODE_TABLES` with each measured cell set to its head_dim's fastest config (or,
    within TABLE_TIE of it, the one closest to the defaults). Times are the profiled
    kernel times where every variant of the cell has one, else wall times."""
    entries: dict[tuple[int, int, int], list[dict]] = {}
    for s in sweeps:
        if s["kernel"] == "jllm_decode" and s["ms"] is not None:
            entries.setdefault((s["head_dim"], s["batch"], s["context"]), []).append(s)
    lines, kept = ["DECODE_TABLES = {"], False
    for head_dim in sorted({*DECODE_TABLES, *(d for d, _, _ in entries)}):
        current = DECODE_TABLES.get(head_dim) or DECODE_TABLES[max(DECODE_TABLES)]
        lines.append(f"    {head_dim}: (")
        for i, batch in enumerate(DECODE_BATCHES):
            cells = []
            for j, context in enumerate(DECODE_CONTEXTS):
                cell = entries.get((head_dim, batch, context))
                kept |= not cell
                cells.append(config_code(_best_config(cell)) if cell else config_code(current[i][j]) + "?")
            bound = "" if i == 0 else "<= "
            lines.append(f"        ({', '.join(cells)}),  # batch {bound}{batch}")
        lines.append("    ),")
    lines.append("}  # '?': not measured, kept from the current table" if kept else "}")
    return "\n".join(lines)


def config_code(config: DecodeConfig) -> str:
    """`_C(...)` as the table writes it: the fields past the last non-default one left out."""
    values = dataclasses.astuple(config)
    defaults = dataclasses.astuple(DecodeConfig(config.num_splits))
    while len(values) > 1 and values[-1] == defaults[len(values) - 1]:
        values = values[:-1]
    return f"_C({', '.join(map(str, values))})"


def _best_config(entries: list[dict]) -> DecodeConfig:
    key = "kernel_ms" if all(e.get("kernel_ms") is not None for e in entries) else "ms"
    fields = [f.name for f in dataclasses.fields(DecodeConfig)]
    times = {DecodeConfig(**{name: e[name] for name in fields}): e[key] for e in entries}
    fastest_time = min(times.values())
    close = [c for c, t in times.items() if t <= fastest_time * (1 + TABLE_TIE)]

    def changed(config):  # Launch settings off the defaults.
        return sum(a != b for a, b in zip(dataclasses.astuple(config)[1:], dataclasses.astuple(DecodeConfig(1))[1:]))

    return min(close, key=lambda c: (changed(c), times[c]))
