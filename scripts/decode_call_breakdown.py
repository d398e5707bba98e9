"""On the GPU: what one decode-attention call costs on the device, event by event, for
jllm's kernel (at its table config), its Mosaic GPU kernel (at given splits) and JAX's
paged_attention (at given settings).

    python scripts/decode_call_breakdown.py [--head-dim 64] [--batch 1] [--context 512]
        [--jax 8,4 --jax 4,8] [--mgpu 4 --mgpu 8]

Each call is its own jitted program, as a model layer sees it: no neighbour to fuse
with. That is the difference from bench_kernels.py's kernel time, which chains calls in
one program so that dispatch does not swamp the small shapes; there XLA fuses one call's
epilogue (JAX's split merge) with the next call's prologue (its q padding), which the
layers of a model, with projections between their attention calls, do not allow. jllm's
kernel runs twice: on split tickets threaded from call to call, as the engine runs it,
and on tickets zeroed for each call (a memset), as a caller without them does. The
table lists every device event of a call (median over --calls calls on rotating block
tables, K/V past the L2) and their sum.
"""
from __future__ import annotations

import argparse
import collections
import functools
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged  # noqa: E402

from pallas_kernels import decode_config, new_decode_tickets, paged_decode_attention  # noqa: E402
from pallas_kernels.paged_decode_attention_mgpu import MERGES, paged_decode_attention_mgpu  # noqa: E402
from scripts.bench_utils import traced_gpu_events  # noqa: E402
from scripts.kernel_bench.common import LLAMA_1B, LLAMA_8B, random_normal  # noqa: E402
from scripts.kernel_bench.decode import L2_BYTES, decode_batch, kv_bytes  # noqa: E402

PAGE = 16  # As bench_kernels.py.


def events_per_call(call, tables, calls: int) -> dict[str, list[int]]:
    """Durations (ns) of each named device event over `calls` calls, one per table in turn."""
    for table in tables[:2]:
        jax.block_until_ready(call(table))

    def run_calls():
        for i in range(calls):
            out = call(tables[i % len(tables)])
        jax.block_until_ready(out)

    durations = collections.defaultdict(list)
    for _, duration, name in traced_gpu_events(run_calls, names=True) or []:
        durations[name].append(duration)
    return durations


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--head-dim", type=int, default=64, choices=(64, 128),
                        help="Llama-3.2-1B's heads (64) or Llama-3.1-8B's (128)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--jax", action="append", default=None,
                        help="JAX's k_splits,pages_per_compute_block (repeatable; 4 warps); "
                             "default 8,4 and 4,8, its fastest at 1 x 512 in bench_kernels.py")
    parser.add_argument("--mgpu", action="append", type=int, default=None,
                        help="splits of the Mosaic GPU kernel to time, each with both its merges "
                             "(repeatable); default 2, 4, 8")
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu":
        sys.exit("decode_call_breakdown.py profiles GPU kernels: run it on the GPU")
    heads = {64: LLAMA_1B, 128: LLAMA_8B}[args.head_dim]
    d, batch, context = heads.head_dim, args.batch, args.context
    # Pages for tables whose K/V together span twice the L2, as bench_kernels.py's.
    tables_past_l2 = -(-2 * L2_BYTES // kv_bytes(heads, batch, context))
    pool = batch * (context // PAGE) * max(2, tables_past_l2)
    cache_shape = (heads.num_kv_heads, pool, PAGE, d)
    k_cache, v_cache = random_normal(1, cache_shape), random_normal(2, cache_shape)
    q, lens, tables = decode_batch(np.random.default_rng(0), heads, batch, context, pool, PAGE)
    scale = d ** -0.5
    config = decode_config(batch, context, d)
    ours = functools.partial(paged_decode_attention, scale=scale, config=config)
    tickets = [new_decode_tickets(heads.num_kv_heads, batch)]

    def ours_threaded(table):  # The tickets are donated and come back zeroed.
        out, tickets[0] = ours(q, k_cache, v_cache, lens, table, decode_tickets=tickets[0])
        return out

    variants = {f"jllm_decode {config}, threaded tickets": ours_threaded,
                f"jllm_decode {config}, tickets zeroed per call":
                    lambda t: ours(q, k_cache, v_cache, lens, t)}
    for splits in args.mgpu or [2, 4, 8]:
        for merge in MERGES:
            mgpu = functools.partial(paged_decode_attention_mgpu, scale=scale,
                                     num_splits=splits, merge=merge)
            variants[f"jllm_decode_mgpu num_splits={splits} merge={merge}"] = (
                lambda t, f=mgpu: f(q, k_cache, v_cache, lens, t))
    q_scaled = q * jnp.asarray(scale, q.dtype)  # JAX's kernel takes no scale.
    for setting in args.jax or ["8,4", "4,8"]:
        k_splits, per_block = map(int, setting.split(","))
        theirs = jax.jit(functools.partial(jax_paged.paged_attention, k_splits=k_splits,
                                           pages_per_compute_block=per_block, num_warps=4))
        variants[f"jax_paged_attention k_splits={k_splits} pages_per_compute_block={per_block}"] = (
            lambda t, f=theirs: f(q_scaled, k_cache, v_cache, t, lens))
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}: d {d}, batch {batch}, "
          f"context {context}, {heads.num_q_heads} q / {heads.num_kv_heads} kv heads, page {PAGE}")
    print("| variant | device event | per call | median us |")
    print("|---|---|---|---|")
    for label, call in variants.items():
        total = 0.0
        for name, durations in events_per_call(call, tables, args.calls).items():
            per_call = len(durations) / args.calls
            median_us = statistics.median(durations) / 1e3
            total += per_call * median_us
            print(f"| {label} | {name[:60]} | {per_call:.2f} | {median_us:.2f} |")
        print(f"| {label} | **sum** | | **{total:.2f}** |")


if __name__ == "__main__":
    main()
