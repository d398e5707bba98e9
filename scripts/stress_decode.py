"""On the GPU: a paged decode kernel against its plain-jnp reference on many fresh
random batches, to catch races in its in-kernel merge of kv splits (a wrong ticket order
or a stale read shows up as an error that moves between runs on the same shapes).

    PYTHONPATH=. python scripts/stress_decode.py --trials 20 [--kernel mgpu]

--kernel triton (the default) is `paged_decode_attention`, whose splits merge through a
global-memory ticket; --kernel mgpu is `paged_decode_attention_mgpu`, whose splits merge
through the leader block's shared memory in a cluster (16-bit dtypes only).

Each trial draws new lengths (0, 1, page edges, up to the context), new pages, q, K and
V; every (head_dim, dtype, splits, window, soft cap) case must stay within the bf16 /
f32 tolerance on every trial. The kernel's split tickets go from trial to trial as the
engine hands them from step to step, and must come back zero after each (a ticket left
over would skip or repeat a merge on the next call). Prints a table of the worst
relative error per case.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)

from pallas_kernels import (  # noqa: E402
    new_decode_tickets,
    paged_decode_attention,
    paged_decode_attention_reference,
)
from pallas_kernels.paged_decode_attention_mgpu import MERGES, paged_decode_attention_mgpu  # noqa: E402

# max |out - ref| / max |ref| allowed: bf16 operands round at ~4e-3.
TOLERANCE = {jnp.bfloat16: 2e-2, jnp.float32: 2e-3}
PAGE, NUM_KV_HEADS, GROUP = 16, 8, 4
# (head_dim, dtype, num_splits, sliding_window, soft_cap), by kernel.
CASES = {
    "triton": [(d, dt, s, w, c) for d in (64, 128) for dt in (jnp.bfloat16, jnp.float32)
               for s in (2, 3, 8, 32) for w, c in ((None, None), (300, 30.0))],
    "mgpu": [(d, jnp.bfloat16, s, w, c) for d in (64, 128) for s in (1, 2, 4, 8)
             for w, c in ((None, None), (300, 30.0))],
}


def draw(rng, key, batch, max_context, head_dim, dtype):
    """Lengths and pages from numpy (small); q, K, V drawn on the device (fast)."""
    lens = rng.integers(0, max_context + 1, batch)
    lens[: 6] = [0, 1, PAGE - 1, PAGE, PAGE + 1, max_context][: batch]
    pages = max_context // PAGE
    num_blocks = batch * pages + 7
    tables = rng.permutation(num_blocks)[: batch * pages].reshape(batch, pages)
    kq, kk, kv = jax.random.split(key, 3)
    cache = (NUM_KV_HEADS, num_blocks, PAGE, head_dim)
    k = jax.random.normal(kk, cache, dtype)
    v = jax.random.normal(kv, cache, dtype)
    q = jax.random.normal(kq, (batch, NUM_KV_HEADS * GROUP, head_dim), dtype)
    return q, k, v, jnp.asarray(lens, jnp.int32), jnp.asarray(tables, jnp.int32)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--kernel", choices=sorted(CASES), default="triton")
    parser.add_argument("--merge", choices=MERGES, default=MERGES[0],
                        help="--kernel mgpu: where its splits' states meet")
    parser.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    key = jax.random.key(0)
    worst, failed = {}, 0
    cases = CASES[args.kernel]
    launcher = paged_decode_attention if args.kernel == "triton" else paged_decode_attention_mgpu
    extra = {"merge": args.merge} if args.kernel == "mgpu" else {}
    for head_dim, dtype, splits, window, cap in cases:
        kw = dict(scale=head_dim ** -0.5, sliding_window=window, soft_cap=cap)
        kernel = jax.jit(functools.partial(launcher, num_splits=splits, interpret=args.interpret,
                                           **extra, **kw))
        reference = jax.jit(functools.partial(paged_decode_attention_reference, **kw))
        case = (head_dim, jnp.dtype(dtype).name, splits, window, cap)
        tickets = new_decode_tickets(NUM_KV_HEADS, args.batch)
        for _ in range(args.trials):
            key, sub = jax.random.split(key)
            batch = draw(rng, sub, args.batch, args.context, head_dim, dtype)
            if args.kernel == "triton":
                out, tickets = kernel(*batch, decode_tickets=tickets)
            else:  # No tickets: its merge is counted on a cluster barrier.
                out = kernel(*batch)
            ref = reference(*batch)
            err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32)))
                        / jnp.max(jnp.abs(ref.astype(jnp.float32))))
            zero_rows = np.asarray(batch[3]) == 0
            if (not np.isfinite(err) or np.any(np.asarray(out, np.float32)[zero_rows])
                    or np.asarray(tickets).any()):
                err = float("inf")
            worst[case] = max(worst.get(case, 0.0), err)
        failed += worst[case] > TOLERANCE[dtype]
        print(f"{case}: worst rel err {worst[case]:.2e}", flush=True)
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {args.kernel} kernel, "
          f"{args.trials} trials of {args.batch} sequences up to {args.context} tokens per case\n")
    print("| head_dim | dtype | splits | window | soft cap | worst rel err |")
    print("|---|---|---|---|---|---|")
    for (d, dt, s, w, c), err in worst.items():
        print(f"| {d} | {dt} | {s} | {w} | {c} | {err:.2e} |")
    print(f"\n{failed} of {len(cases)} cases over tolerance")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
