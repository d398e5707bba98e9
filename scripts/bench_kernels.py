"""Kernel benchmark (issue 3): jllm's Pallas kernels against their plain-jnp references,
JAX's own Pallas GPU ops and cuDNN, checked and timed in one run on one device.

    PYTHONPATH=. python scripts/bench_kernels.py                 # full run, ~8 min on an H100
    PYTHONPATH=. python scripts/bench_kernels.py --quick         # a subset, ~2 min
    PYTHONPATH=. python scripts/bench_kernels.py --only decode --iters 30 --out /tmp/k.json
    PYTHONPATH=. python scripts/bench_kernels.py --interpret --tiny   # CPU smoke test

Sections (`--only` picks some): the device's copy bandwidth; `kv_write` (jllm's KV write
against the XLA scatter, and an HLO check that the donated cache is not copied); `prefill`
(causal TFLOP/s of the ragged kernel, one sequence, with and without a cached prefix, next
to JAX's Pallas `attention.mha` and cuDNN); `decode` (TB/s of the paged decode kernel over
a num_splits sweep, the split table's choice, JAX's Pallas `paged_attention` at its best
sweep settings and the jitted XLA gather reference), ending with a suggested `_SPLIT_TABLE`.

Every kernel's output is compared with the reference on the device (max |out - ref| /
max |ref|, on a few rows: the references gather every key of every row).

Timing: each compiled program chains `reps` calls (bench_utils.chained): each call's
output is the next call's query, as one layer's output feeds the next in a model step, so
the program holds the calls and nothing else and XLA can neither hoist nor drop one. reps
grows as the call shrinks (3 to 32, about 1 ms a program). Decode calls rotate over block
tables of disjoint pages, at least twice the L2's size in all, so a small shape reads its
K/V from HBM as it would in a model step, not from L2. A timing sample dispatches
programs back to back (about 5 ms of them) and waits once, so the device does not idle
between programs and the host sync is paid once per sample. The figure is the median
over `--iters` samples (at least 3, fewer once a kernel's samples have taken 3 s),
divided by programs and reps. `--reps 1` times single jitted calls.

Shapes whose data would not fit print "skipped (memory)"; shapes past `--budget-s` print
"skipped (time budget)", so the run ends before the 10-minute cap. The JSON record under
scripts/results/ is rewritten after every shape.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import math
import os
import re
import sys
import time
import warnings
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"jax\..*")
warnings.filterwarnings("ignore", message=".*(Triton|deprecated).*", category=DeprecationWarning)

from jax.experimental.pallas.ops.gpu import attention as jax_attention  # noqa: E402
from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged  # noqa: E402

from pallas_kernels import (  # noqa: E402
    decode_num_splits,
    paged_decode_attention,
    paged_decode_attention_reference,
    ragged_paged_attention,
    ragged_paged_attention_reference,
    write_kv,
    write_kv_reference,
)
from pallas_kernels.paged_decode_attention import (  # noqa: E402
    _SPLIT_BATCHES,
    _SPLIT_CONTEXTS,
    _SPLIT_TABLE,
    gather_pages,
)
from jllm.layers.attention import fresh_prefill_attention  # noqa: E402
from scripts.bench_utils import (  # noqa: E402
    Job,
    Results,
    bandwidth_tbps,
    compile_all,
    device_memory_bytes,
    first_line,
    full_copies_in_hlo,
    log,
    chained,
    first_alternative,
    median_seconds,
    programs_per_sample,
    rel_err,
    reps_for,
)

# The decode KV cache may take this share of device memory; the rest is for the XLA
# reference, which gathers the pages it reads into float32 (about 3x their bytes).
CACHE_FRACTION = 0.4
REFERENCE_FRACTION = 0.8
REFERENCE_BYTES_PER_KV_BYTE = 3
# Rows compared with the reference per kernel call: the reference gathers every key for
# every row, which at 32k tokens costs ~270 MB a row.
CHECK_ROWS = 8
# H100 and H200 L2 sizes are 50 and 60 MB: decode calls rotate over enough page sets
# that the K/V of consecutive calls spans at least twice this (bench_utils.chained).
L2_BYTES = 60 << 20
SPLIT_CANDIDATES = (1, 2, 4, 8, 16, 32)
# A split count is timed only while half of it gives fewer programs (batch x kv heads x
# splits) than this many per SM: past that, more splits only add combine work.
PROGRAMS_PER_SM_ENOUGH = 16
JLLM_DECODE_BLOCK_KV = 64  # paged_decode_attention's default keys per inner step.
JAX_PAGES_PER_COMPUTE_BLOCK = (8, 4, 16)
# Launch settings of JAX's kernel tried against its defaults (8 warps, 2 stages) at its
# best split count and block: jllm's decode defaults, and each change alone.
JAX_LAUNCH_SETTINGS = ({"num_warps": 4}, {"num_stages": 3}, {"num_warps": 4, "num_stages": 3})
# Launch settings of the decode kernel tried against its defaults (block_kv 64, 4 warps,
# 2 stages) with --decode-param-sweep.
DECODE_PARAM_SETTINGS = (
    {"block_kv": 128}, {"block_kv": 32}, {"num_stages": 3}, {"num_stages": 4},
    {"num_warps": 8}, {"block_kv": 128, "num_warps": 8}, {"block_kv": 128, "num_stages": 3},
)  # Its default first, then tried at the best k_splits.
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
# Rough device speeds, only to choose calls per timed program.
GUESS_TBPS, GUESS_TFLOPS = 2.5, 300.0


@dataclasses.dataclass(frozen=True)
class Heads:
    """The attention shape of a model."""
    model: str
    num_q_heads: int
    num_kv_heads: int
    head_dim: int


LLAMA_8B = Heads("llama-3.1-8b", 32, 8, 128)
LLAMA_1B = Heads("llama-3.2-1b", 32, 8, 64)
TINY = Heads("tiny", 8, 2, 32)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The shapes one run covers."""
    decode_heads: tuple[Heads, ...]
    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    prefill_heads: Heads
    prefill_tokens: tuple[int, ...]
    kv_write_tokens: tuple[int, ...]
    kv_write_blocks: int
    copy_bytes: int
    budget_s: float
    page_size: int = 16


PLANS = {
    "full": Plan((LLAMA_8B, LLAMA_1B), (1, 8, 64, 256), (512, 2048, 8192, 32768), LLAMA_8B,
                 (2048, 8192, 32768), (256, 8192), 16384, 2 << 30, budget_s=450),
    "quick": Plan((LLAMA_8B,), (1, 64), (2048, 8192), LLAMA_8B, (2048, 8192), (256,), 16384,
                  1 << 30, budget_s=100),
    "tiny": Plan((TINY,), (1, 3), (64, 128), TINY, (64,), (8,), 64, 1 << 20, budget_s=math.inf),
}


@dataclasses.dataclass
class Bench:
    """Run-wide settings and state."""
    plan: Plan
    iters: int
    reps: int  # Calls per timed program; 0 chooses by shape.
    interpret: bool
    threads: int
    deadline: float
    memory_bytes: int
    num_sms: int
    results: Results
    copy_tbps: float | None = None
    # Also time DECODE_PARAM_SETTINGS at the table's split count (--decode-param-sweep).
    decode_params: bool = False

    def out_of_time(self) -> bool:
        return time.time() > self.deadline

    def reps_for(self, seconds_per_call: float) -> int:
        if self.reps:
            return self.reps
        return 2 if self.interpret else reps_for(seconds_per_call)

    def programs_per_sample(self, seconds_per_program: float) -> int:
        return 1 if self.interpret else programs_per_sample(seconds_per_program)


@dataclasses.dataclass
class Variant:
    """One kernel with one set of settings, timed on one shape."""
    kernel: str
    params: dict
    fn: Callable  # (*args) -> output
    args: tuple
    rotating: tuple[int, ...] = ()  # Positions of per-call alternatives (bench_utils.chained).
    ms: float | None = None
    max_rel_err: float | None = None
    error: str | None = None

    @property
    def label(self) -> str:
        return self.kernel + "".join(f" {k}={v}" for k, v in self.params.items())


def random_normal(seed: int, shape, dtype=jnp.bfloat16) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def run_variants(bench: Bench, variants: list[Variant], seconds_per_call: float, check,
                 figure) -> None:
    """Compiles every variant (in parallel), then checks and times them one at a time.

    seconds_per_call: a rough guess, to size the timed programs; check(output of one
    call) -> max relative error; figure(ms) -> text for the progress line.
    """
    reps = bench.reps_for(seconds_per_call)
    back_to_back = bench.programs_per_sample(reps * seconds_per_call)
    jobs = {v.label: Job(chained(v.fn, reps, v.rotating), v.args) for v in variants}
    compiled = compile_all(jobs, bench.threads)
    for v in variants:
        exe, args = compiled[v.label], jobs[v.label].args
        try:
            if isinstance(exe, Exception):
                raise exe
            v.max_rel_err = check(jax.jit(v.fn)(*first_alternative(v.args, v.rotating)))
            v.ms = 1e3 * median_seconds(lambda: exe(*args), bench.iters,
                                        back_to_back=back_to_back) / reps
            log(f"  {v.label:<60} {v.ms:9.4f} ms  {figure(v.ms)}  err {v.max_rel_err:.1e}")
        except Exception as error:  # noqa: BLE001 - one kernel's failure must not end the run.
            v.error = first_line(error)
            log(f"  {v.label:<60} failed: {v.error}")


def fastest(variants: list[Variant]) -> Variant | None:
    timed = [v for v in variants if v.ms is not None]
    return min(timed, key=lambda v: v.ms) if timed else None


# --------------------------------------------------------------------------- decode


def kv_bytes(heads: Heads, batch: int, context: int) -> int:
    """K and V bytes a decode step reads: every sequence's pages up to its context, once."""
    return 2 * batch * context * heads.num_kv_heads * heads.head_dim * 2  # bf16


def useful_splits(batch: int, heads: Heads, num_sms: int, most: int) -> list[int]:
    """Split counts worth timing: at most `most`, and doubling only while the grid of
    batch * kv heads * splits programs is still short of filling the device."""
    enough = PROGRAMS_PER_SM_ENOUGH * num_sms
    return [s for s in SPLIT_CANDIDATES
            if s <= most and (s == 1 or batch * heads.num_kv_heads * s // 2 < enough)]


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
                bench.results.add_row(**decode_row("jllm_decode", heads, batch, context,
                                                   plan.page_size, skipped="memory"))
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
                bench.results.add_row(**decode_row("jllm_decode", heads, batch, context,
                                                   plan.page_size, skipped="time budget"))
                continue
            bench_decode_shape(bench, rng, heads, batch, context, k_cache, v_cache, cache_bytes)
            bench.results.write()
        del k_cache, v_cache


def bench_decode_shape(bench, rng, heads, batch, context, k_cache, v_cache, cache_bytes):
    page_size = bench.plan.page_size
    nbytes = kv_bytes(heads, batch, context)
    guess = nbytes / (GUESS_TBPS * 1e12) + 5e-6
    log(f"decode {heads.model} B={batch} ctx={context}: K+V {nbytes / 1e9:.3f} GB, "
        f"{bench.reps_for(guess)} calls/program")
    q, seq_lens, tables = decode_batch(rng, heads, batch, context, k_cache.shape[1], page_size)
    scale = heads.head_dim ** -0.5
    rows = min(batch, CHECK_ROWS)
    reference = functools.partial(paged_decode_attention_reference, scale=scale)
    expected = jax.jit(reference)(q[:rows], k_cache, v_cache, seq_lens[:rows], tables[0][:rows])

    def check(out):
        return rel_err([(out[:rows], expected)])

    def figure(ms):
        return f"{nbytes / ms / 1e9:6.3f} TB/s"

    args = (q, k_cache, v_cache, seq_lens, tables)
    rotating = (4,)  # The tables.
    table_splits = decode_num_splits(batch, context)
    most_splits = -(-context // JLLM_DECODE_BLOCK_KV)
    splits = sorted({*useful_splits(batch, heads, bench.num_sms, most_splits), table_splits})
    jllm = [Variant("jllm_decode", {"num_splits": s},
                    functools.partial(paged_decode_attention, scale=scale, num_splits=s,
                                      interpret=bench.interpret), args, rotating)
            for s in splits]
    if bench.decode_params:
        jllm += [Variant("jllm_decode", {"num_splits": table_splits, **p},
                         functools.partial(paged_decode_attention, scale=scale, num_splits=table_splits,
                                           interpret=bench.interpret, **p), args, rotating)
                 for p in DECODE_PARAM_SETTINGS]
    # JAX's kernel takes no softmax scale: q is scaled beforehand, outside the timing.
    jax_args = (q * jnp.asarray(scale, q.dtype), k_cache, v_cache, tables, seq_lens)
    pages = context // page_size
    k_splits = [s for s in useful_splits(batch, heads, bench.num_sms, pages) if pages % s == 0]
    jax_variants = [jax_paged_variant(bench, jax_args, s, JAX_PAGES_PER_COMPUTE_BLOCK[0])
                    for s in k_splits]
    xla = []
    reference_bytes = cache_bytes + REFERENCE_BYTES_PER_KV_BYTE * nbytes
    if reference_bytes <= REFERENCE_FRACTION * bench.memory_bytes:
        xla = [Variant("xla_reference", {}, reference, args, rotating)]
    else:
        log("  xla_reference: skipped (memory)")
    run_variants(bench, jllm + jax_variants + xla, guess, check, figure)

    best_jax = fastest(jax_variants)
    if best_jax is not None:  # Then its compute block size, at its best split count,
        more = jax_block_variants(bench, jax_args, pages, best_jax.params["k_splits"])
        run_variants(bench, more, guess, check, figure)
        jax_variants += more
        best_jax = fastest(jax_variants)  # then its launch settings, at its best of those.
        more = [jax_paged_variant(bench, jax_args, best_jax.params["k_splits"],
                                  best_jax.params["pages_per_compute_block"], **launch)
                for launch in JAX_LAUNCH_SETTINGS]
        run_variants(bench, more, guess, check, figure)
        jax_variants += more
    record_decode(bench, heads, batch, context, nbytes, jllm, table_splits, jax_variants, xla)


def jax_paged_variant(bench, jax_args, k_splits, pages_per_compute_block, **launch) -> Variant:
    fn = functools.partial(jax_paged.paged_attention, k_splits=k_splits,
                           pages_per_compute_block=pages_per_compute_block,
                           interpret=bench.interpret, **launch)
    return Variant("jax_paged_attention",
                   {"k_splits": k_splits, "pages_per_compute_block": pages_per_compute_block,
                    **launch},
                   fn, jax_args, (3,))


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


def decode_row(kernel, heads, batch, context, page_size, variant=None, nbytes=None,
               copy_tbps=None, **extra) -> dict:
    row = dict(kernel=kernel, model=heads.model, batch=batch, context=context,
               num_q_heads=heads.num_q_heads, num_kv_heads=heads.num_kv_heads,
               head_dim=heads.head_dim, page_size=page_size, ms=None, tbps=None, tflops=None,
               max_rel_err=None)
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


def record_decode(bench, heads, batch, context, nbytes, jllm, table_splits, jax_variants, xla):
    page_size, results = bench.plan.page_size, bench.results
    for v in jllm + jax_variants + xla:
        results.add_sweep(kernel=v.kernel, model=heads.model, batch=batch, context=context,
                          head_dim=heads.head_dim, **v.params, ms=v.ms, max_rel_err=v.max_rel_err,
                          error=v.error)
    table = next(v for v in jllm if v.params["num_splits"] == table_splits)
    best, best_jax = fastest(jllm) or jllm[0], fastest(jax_variants)
    picks = [("jllm_decode", best), ("jllm_decode_table", table),
             ("jax_paged_attention", best_jax or (jax_variants or [None])[0]),
             ("xla_reference", xla[0] if xla else None)]
    if best.ms and table.ms:
        versus = f"; jax paged's best takes {best_jax.ms / best.ms:.2f}x" if best_jax else ""
        log(f"  -> best num_splits={best.params['num_splits']}; the table's {table_splits} takes "
            f"{table.ms / best.ms:.2f}x its time{versus}")
    for kernel, variant in picks:
        if variant is None:
            skipped = "memory" if kernel == "xla_reference" else "no valid settings"
            results.add_row(**decode_row(kernel, heads, batch, context, page_size, skipped=skipped))
        else:
            results.add_row(**decode_row(kernel, heads, batch, context, page_size, variant, nbytes,
                                         bench.copy_tbps))


def suggested_split_table(sweeps: list[dict]) -> str:
    """`_SPLIT_TABLE` with each measured cell set to the split count whose worst slowdown
    over the measured models (time / that model's best time) is least."""
    timings: dict[tuple[int, int], dict[int, dict[int, float]]] = {}  # cell -> split -> {d: ms}
    for s in sweeps:
        launch_sweep = any(k in s for k in ("block_kv", "num_warps", "num_stages"))
        if s["kernel"] == "jllm_decode" and s["ms"] is not None and not launch_sweep:
            cell = timings.setdefault((s["batch"], s["context"]), {})
            cell.setdefault(s["num_splits"], {})[s["head_dim"]] = s["ms"]
    lines, kept = ["_SPLIT_TABLE = ("], False
    for i, batch in enumerate(_SPLIT_BATCHES):
        cells = []
        for j, context in enumerate(_SPLIT_CONTEXTS):
            cell = timings.get((batch, context))
            kept |= not cell
            cells.append(str(_best_split(cell)) if cell else f"{_SPLIT_TABLE[i][j]}?")
        bound = "" if i == 0 else "<= "
        lines.append(f"    ({', '.join(cells)}),  # batch {bound}{batch}")
    lines.append(")  # '?': not measured, kept from the current table" if kept else ")")
    return "\n".join(lines)


def _best_split(cell: dict[int, dict[int, float]]) -> int:
    head_dims = set().union(*(ms.keys() for ms in cell.values()))
    best = {d: min(ms[d] for ms in cell.values() if d in ms) for d in head_dims}

    def rank(split):
        ms = cell[split]
        # A split that some model has no time for ranks after those all models have.
        return ms.keys() != head_dims, max(ms[d] / best[d] for d in ms), split

    return min(cell, key=rank)


# -------------------------------------------------------------------------- prefill


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
    return ragged_paged_attention_reference(q, k_cache, v_cache, query_start_loc, seq_lens,
                                            block_tables, scale=scale)


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
    scale = heads.head_dim ** -0.5
    cached = tokens // 2
    prefix_q = q[cached:]

    def checker(q_rows, first_pos):
        """Compares an output's first and last CHECK_ROWS rows, those of q_rows at
        positions first_pos ..., with the reference."""
        n = CHECK_ROWS
        head = _ragged_reference_rows(q_rows[:n], k_cache, v_cache, block_tables,
                                      jnp.int32(first_pos), scale=scale)
        tail = _ragged_reference_rows(q_rows[-n:], k_cache, v_cache, block_tables,
                                      jnp.int32(first_pos + q_rows.shape[0] - n), scale=scale)
        return lambda out: rel_err([(out[:n], head), (out[-n:], tail)])

    full = jllm_prefill_variants(bench, heads, q, k_cache, v_cache, block_tables, scale)
    prefix = Variant("jllm_prefill_prefix", {"cached_tokens": cached},
                     functools.partial(ragged_paged_attention, scale=scale, interpret=bench.interpret),
                     ragged_args(prefix_q, k_cache, v_cache, block_tables, tokens))
    dense = dense_variants(bench, heads, q, k_cache, v_cache, block_tables, scale)

    flops = causal_flops(heads, tokens)
    guess = flops / (GUESS_TFLOPS * 1e12)

    def tflops(work):
        return lambda ms: f"{work / ms / 1e9:7.1f} TFLOP/s"

    run_variants(bench, full + dense, guess, checker(q, 0), tflops(flops))
    prefix_flops = causal_flops(heads, tokens, cached)
    run_variants(bench, [prefix], guess * prefix_flops / flops, checker(prefix_q, cached),
                 tflops(prefix_flops))

    for v in full:
        bench.results.add_sweep(kernel=v.kernel, context=tokens, head_dim=heads.head_dim,
                                **v.params, ms=v.ms, max_rel_err=v.max_rel_err, error=v.error)
    picks = [("jllm_prefill", full[0], flops, tokens),
             ("jllm_prefill_prefix", prefix, prefix_flops, tokens - cached),
             *((d.kernel, d, flops, tokens) for d in dense)]
    best = fastest(full)
    if best is not None and best is not full[0]:
        log(f"  -> fastest ragged settings: {best.label}")
        picks.insert(1, ("jllm_prefill_best", best, flops, tokens))
    for kernel, v, work, query_len in picks:
        bench.results.add_row(**prefill_row(kernel, v, heads, tokens, query_len, work,
                                            page_size if kernel.startswith("jllm") and "fresh" not in kernel
                                            else None))


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
        fn = functools.partial(ragged_paged_attention, scale=scale, interpret=bench.interpret,
                               **params)
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
        return jax_attention.mha(q[None], k, v, None, sm_scale=scale, causal=True,
                                 interpret=bench.interpret)[0]

    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(q[None], k, v, scale=scale, is_causal=True,
                                            implementation="cudnn")[0]

    def fresh(q, k, v):
        # The engine's path for a prefill without a cached prefix (this step's own K/V).
        return fresh_prefill_attention(q, k[0], v[0], jnp.int32(q.shape[0]), scale=scale)

    return [Variant("jllm_prefill_fresh", {}, fresh, (q, k, v)),
            Variant("jax_flash_attention", {}, mha, (q, k_rep, v_rep)),
            Variant("cudnn", {}, cudnn, (q, k, v))]


def prefill_row(kernel, v: Variant, heads, context, query_len, flops, page_size) -> dict:
    row = dict(kernel=kernel, model=heads.model, batch=1, context=context, query_len=query_len,
               num_q_heads=heads.num_q_heads, num_kv_heads=heads.num_kv_heads,
               head_dim=heads.head_dim, page_size=page_size, ms=v.ms, tbps=None,
               tflops=flops / v.ms / 1e9 if v.ms else None, max_rel_err=v.max_rel_err, **v.params)
    if v.error:
        row["error"] = v.error
    return row


# ------------------------------------------------------------------------- kv write


def chained_write(write: Callable, reps: int) -> Callable:
    """`reps` writes in one program, each into the caches the one before returned (the
    bench_utils.chained pattern for a function of the caches), unrolled."""
    def run(k_cache, v_cache, k, v, slot_mapping):
        caches = (k_cache, v_cache)
        for _ in range(reps):
            caches = write(*caches, k, v, slot_mapping)
        return caches
    return run


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
    row = dict(kernel=name, model=heads.model, batch=args[2].shape[0], context=None,
               num_q_heads=heads.num_q_heads, num_kv_heads=heads.num_kv_heads,
               head_dim=heads.head_dim, page_size=bench.plan.page_size, ms=None, tbps=None,
               tflops=None, max_rel_err=None)
    guess = nbytes / (GUESS_TBPS * 1e12) + 5e-6
    reps = bench.reps_for(guess)
    try:
        step = compile_all({name: Job(chained_write(write, reps), args, (0, 1))}, 1)[name]
        if isinstance(step, Exception):
            raise step
        # The caches are donated: the program gets copies, then threads its own outputs.
        state = list(step(jnp.copy(args[0]), jnp.copy(args[1]), *args[2:]))
        row["max_rel_err"] = rel_err(zip(state, expected))

        def call():
            state[:] = step(*state, *args[2:])
            return state

        row["ms"] = 1e3 * median_seconds(call, bench.iters,
                                         back_to_back=bench.programs_per_sample(reps * guess)) / reps
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
        hlo = (jax.jit(kernel, donate_argnums=(0, 1))
               .lower(k_cache, v_cache, new, new, slots).compile().as_text())
        kvh, blocks, page, d = k_cache.shape
        copies = full_copies_in_hlo(hlo, [k_cache.shape, (kvh, blocks * page, d)])
        aliased = "input_output_alias" in hlo
        verdict = ("ok: cache aliased, no full-cache copy" if aliased and not copies
                   else f"BAD: aliased={aliased}, {len(copies)} full-cache copies")
        bench.results.record["kv_write_hlo"] = dict(verdict=verdict, aliased=aliased, copies=copies)
    except Exception as error:  # noqa: BLE001
        verdict = f"check failed: {first_line(error)}"
        bench.results.record["kv_write_hlo"] = dict(verdict=verdict)
    log(f"kv_write HLO with donated cache {tuple(k_cache.shape)}: {verdict}")
    bench.results.write()


# -------------------------------------------------------------------------- summary


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


DECODE_KERNELS = ("jllm_decode", "jllm_decode_table", "jax_paged_attention", "xla_reference")


def decode_summary(rows: list[dict]) -> list[str]:
    """TB/s per decode shape: jllm's best split (and its share of the copy bandwidth), the
    table's split, JAX's paged_attention at its best settings, the XLA reference."""
    shapes: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r["kernel"] in DECODE_KERNELS:
            shapes.setdefault((r["model"], r["batch"], r["context"]), {})[r["kernel"]] = r
    if not shapes:
        return []
    lines = ["### Decode attention, TB/s", "",
             "| model | batch | context | jllm (splits, % of copy) | table (splits) "
             "| jax paged (k_splits/ppcb) | xla ref | jllm speedup vs jax paged |",
             "|---|---|---|---|---|---|---|---|"]
    models = list(dict.fromkeys(model for model, _, _ in shapes))
    for (model, batch, context), k in sorted(
            shapes.items(), key=lambda item: (models.index(item[0][0]), *item[0][1:])):
        jllm, table = k.get("jllm_decode", {}), k.get("jllm_decode_table", {})
        jaxp, xla = k.get("jax_paged_attention", {}), k.get("xla_reference", {})
        if jllm.get("skipped"):
            lines.append(f"| {model} | {batch} | {context} | skipped ({jllm['skipped']}) | | | | |")
            continue
        share = jllm.get("share_of_copy")
        share = "" if share is None else f", {share:.0%}"
        speedup = jaxp["ms"] / jllm["ms"] if jaxp.get("ms") and jllm.get("ms") else None
        jax_settings = f"{jaxp.get('k_splits')}/{jaxp.get('pages_per_compute_block')}"
        lines.append(
            f"| {model} | {batch} | {context} "
            f"| {_fmt(jllm.get('tbps'), '.2f')} ({jllm.get('num_splits')}{share}) "
            f"| {_fmt(table.get('tbps'), '.2f')} ({table.get('num_splits')}) "
            f"| {_fmt(jaxp.get('tbps'), '.2f')} ({jax_settings}) "
            f"| {_fmt(xla.get('tbps'), '.2f')} | {_fmt(speedup, '.2f')}x |")
    return lines


def prefill_summary(rows: list[dict]) -> list[str]:
    prefill = [r for r in rows if r.get("query_len") is not None]
    if not prefill:
        return []
    lines = ["### Prefill attention, causal TFLOP/s", "",
             "| tokens | query tokens | kernel | ms | TFLOP/s | max rel err |",
             "|---|---|---|---|---|---|"]
    for r in prefill:
        settings = ", ".join(f"{k} {r[k]}" for k in ("block_q", "block_kv", "num_warps", "num_stages") if k in r)
        kernel = f"{r['kernel']} ({settings})" if settings else r["kernel"]
        tflops = "failed" if r.get("error") else _fmt(r["tflops"], ".1f")
        lines.append(f"| {r['context']} | {r['query_len']} | {kernel} | {_fmt(r['ms'], '.3f')} "
                     f"| {tflops} | {_fmt(r['max_rel_err'], '.1e')} |")
    return lines


def kv_write_summary(rows: list[dict]) -> list[str]:
    writes = [r for r in rows if r["kernel"] in ("jllm_kv_write", "xla_reference_kv_write")]
    if not writes:
        return []
    lines = ["### KV write", "", "| tokens | kernel | ms | TB/s |", "|---|---|---|---|"]
    for r in sorted(writes, key=lambda r: r["batch"]):
        lines.append(f"| {r['batch']} | {r['kernel']} | {_fmt(r['ms'], '.4f')} "
                     f"| {_fmt(r['tbps'], '.3f')} |")
    return lines


def summary(results: Results) -> str:
    """Markdown tables of the run's rows."""
    rows = results.rows()
    tables = [decode_summary(rows), prefill_summary(rows), kv_write_summary(rows)]
    return "\n\n".join("\n".join(t) for t in tables if t)


# ---------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a subset for a fast first run (~2 min)")
    size.add_argument("--tiny", action="store_true", help="tiny shapes, for --interpret on CPU")
    parser.add_argument("--interpret", action="store_true",
                        help="run the Pallas kernels in interpret mode (CPU)")
    parser.add_argument("--only", action="append", choices=("decode", "prefill", "kv_write"),
                        help="a section to run (repeatable); default all")
    parser.add_argument("--model", action="append",
                        choices=[h.model for h in (LLAMA_8B, LLAMA_1B)],
                        help="decode heads to run (repeatable); default the plan's")
    parser.add_argument("--iters", type=int, default=None,
                        help="timed programs per kernel (default 20; tiny 3)")
    parser.add_argument("--reps", type=int, default=0,
                        help="calls per timed program (default: by shape, ~1 ms a program)")
    parser.add_argument("--out", default=None,
                        help="JSON path (default scripts/results/kernels_<device>_<date>_<time>.json)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no shape after this many seconds (default 450; quick 100)")
    parser.add_argument("--decode-param-sweep", action="store_true",
                        help="also time the decode kernel's block_kv / warps / stages at the table's splits")
    parser.add_argument("--compile-threads", type=int, default=8,
                        help="threads compiling a shape's variants; 1 compiles one at a time")
    return parser.parse_args(argv)


def default_out_path(device_kind: str, now: datetime.datetime) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", device_kind.lower()).strip("-")
    name = f"kernels_{slug}_{now:%Y-%m-%d}_{now:%H%M%S}.json"
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)


def main(argv=None) -> None:
    start = time.time()
    args = parse_args(argv)
    plan = PLANS["tiny" if args.tiny else "quick" if args.quick else "full"]
    if args.model:
        plan = dataclasses.replace(
            plan, decode_heads=tuple(h for h in plan.decode_heads if h.model in args.model))
    sections = args.only or ["decode", "prefill", "kv_write"]
    device = jax.devices()[0]
    now = datetime.datetime.now()
    out = args.out or default_out_path(device.device_kind, now)
    iters = args.iters or (3 if args.tiny else 20)
    results = Results(out, dict(
        date=now.isoformat(timespec="seconds"), device=device.device_kind,
        jax_version=jax.__version__,
        command=" ".join(sys.argv if argv is None else ["bench_kernels.py", *argv]),
        interpret=args.interpret, iters=iters,
        timing="median over iters (fewer past 3 s) of samples of back-to-back programs of "
               "reps chained calls (each call's output is the next call's query; decode "
               "rotates block tables over disjoint pages spanning >= 2x L2), one "
               "block_until_ready per sample, / programs / reps"))
    bench = Bench(plan=plan, iters=iters, reps=args.reps, interpret=args.interpret,
                  threads=args.compile_threads,
                  deadline=start + (args.budget_s if args.budget_s is not None else plan.budget_s),
                  memory_bytes=device_memory_bytes(device),
                  num_sms=getattr(device, "core_count", None) or 132, results=results,
                  decode_params=args.decode_param_sweep)
    log(f"{device.device_kind}, jax {jax.__version__}, {bench.memory_bytes / 2**30:.1f} GiB, "
        f"{bench.num_sms} SMs; writing {out}")

    bandwidth = bandwidth_tbps(plan.copy_bytes, iters)
    bench.copy_tbps = results.record["copy_tbps"] = bandwidth["copy"]
    results.record["elementwise_tbps"] = bandwidth["elementwise"]
    log(f"copy {bandwidth['copy']:.3f} TB/s, x+1 {bandwidth['elementwise']:.3f} TB/s "
        f"({plan.copy_bytes / 2**30:.2f} GiB bf16, read + written)")
    results.write()

    rng = np.random.default_rng(0)
    # Cheapest first, so that decode's long sweep is what the time budget cuts.
    if "kv_write" in sections:
        bench_kv_write(bench, rng)
    if "prefill" in sections:
        bench_prefill(bench)
    if "decode" in sections:
        bench_decode(bench, rng)
        table = suggested_split_table(results.record["sweeps"])
        results.record["suggested_split_table"] = table
        log("\nSuggested split table (pallas_kernels/paged_decode_attention.py):\n" + table)
    results.record["wall_s"] = round(time.time() - start, 1)
    results.write()
    log("\n" + summary(results))
    log(f"\n{results.record['wall_s']} s; results in {out}")


if __name__ == "__main__":
    main()
