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
a num_splits sweep, the config table's choice, JAX's Pallas `paged_attention` at its best
sweep settings and the jitted XLA gather reference), ending with a suggested `DECODE_TABLES`
for pallas_kernels/tuning.py; `--decode-param-sweep` adds block sizes, warps and stages at
the best split counts.

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

Decode rows and sweep entries also carry `kernel_ms`: each variant's device time per call
from one profiler trace per batch of variants timed together (bench_utils.kernel_seconds_each), which leaves out the
launch gaps between kernels; at the smallest shapes those gaps move the wall time from run
to run. The picked rows add `best_kernel_ms`, the least kernel time of any of that
kernel's variants, and the table suggestion ranks configs by kernel time.

Shapes whose data would not fit print "skipped (memory)"; shapes past `--budget-s` print
"skipped (time budget)", so the run ends before the 10-minute cap. The JSON record under
scripts/results/ is rewritten after every shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from scripts.bench_utils import Results, bandwidth_tbps, device_memory_bytes, log  # noqa: E402
from scripts.kernel_bench.common import LLAMA_1B, LLAMA_8B, PLANS, Bench, Plan  # noqa: E402
from scripts.kernel_bench.decode import bench_decode, suggested_decode_table  # noqa: E402
from scripts.kernel_bench.kv_write import bench_kv_write  # noqa: E402
from scripts.kernel_bench.prefill import bench_prefill  # noqa: E402
from scripts.kernel_bench.summary import summary  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a subset for a fast first run (~2 min)")
    size.add_argument("--tiny", action="store_true", help="tiny shapes, for --interpret on CPU")
    parser.add_argument("--interpret", action="store_true", help="run the Pallas kernels in interpret mode (CPU)")
    parser.add_argument(
        "--only",
        action="append",
        choices=("decode", "prefill", "kv_write"),
        help="a section to run (repeatable); default all",
    )
    parser.add_argument(
        "--model",
        action="append",
        choices=[h.model for h in (LLAMA_8B, LLAMA_1B)],
        help="decode heads to run (repeatable); default the plan's",
    )
    parser.add_argument(
        "--batch", action="append", type=int, help="decode batch sizes to run (repeatable); default the plan's"
    )
    parser.add_argument("--iters", type=int, default=None, help="timed programs per kernel (default 20; tiny 3)")
    parser.add_argument(
        "--reps", type=int, default=0, help="calls per timed program (default: by shape, ~1 ms a program)"
    )
    parser.add_argument(
        "--out", default=None, help="JSON path (default scripts/results/kernels_<device>_<date>_<time>.json)"
    )
    parser.add_argument(
        "--budget-s", type=float, default=None, help="start no shape after this many seconds (default 450; quick 100)"
    )
    parser.add_argument(
        "--decode-param-sweep",
        action="store_true",
        help="also time the decode kernel's block_kv / warps / stages at the best and the table's splits",
    )
    parser.add_argument(
        "--compile-threads", type=int, default=8, help="threads compiling a shape's variants; 1 compiles one at a time"
    )
    return parser.parse_args(argv)


def default_out_path(device_kind: str, now: datetime.datetime) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", device_kind.lower()).strip("-")
    name = f"kernels_{slug}_{now:%Y-%m-%d}_{now:%H%M%S}.json"
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)


def select_plan(args) -> Plan:
    """The size's plan, narrowed to the models and batch sizes asked for."""
    plan = PLANS["tiny" if args.tiny else "quick" if args.quick else "full"]
    if args.model:
        plan = dataclasses.replace(plan, decode_heads=tuple(h for h in plan.decode_heads if h.model in args.model))
    if args.batch:
        plan = dataclasses.replace(plan, batches=tuple(b for b in plan.batches if b in args.batch))
    return plan


def main(argv=None) -> None:
    start = time.time()
    args = parse_args(argv)
    plan = select_plan(args)
    sections = args.only or ["decode", "prefill", "kv_write"]
    device = jax.devices()[0]
    now = datetime.datetime.now()
    out = args.out or default_out_path(device.device_kind, now)
    iters = args.iters or (3 if args.tiny else 20)
    results = Results(
        out,
        dict(
            date=now.isoformat(timespec="seconds"),
            device=device.device_kind,
            jax_version=jax.__version__,
            command=" ".join(sys.argv if argv is None else ["bench_kernels.py", *argv]),
            interpret=args.interpret,
            iters=iters,
            timing="median over iters (fewer past 3 s) of samples of back-to-back programs of "
            "reps chained calls (each call's output is the next call's query; decode "
            "rotates block tables over disjoint pages spanning >= 2x L2), one "
            "block_until_ready per sample, / programs / reps",
            xla_flags=os.environ.get("XLA_FLAGS", ""),
        ),
    )
    bench = Bench(
        plan=plan,
        iters=iters,
        reps=args.reps,
        interpret=args.interpret,
        threads=args.compile_threads,
        deadline=start + (args.budget_s if args.budget_s is not None else plan.budget_s),
        memory_bytes=device_memory_bytes(device),
        num_sms=getattr(device, "core_count", None) or 132,
        results=results,
        decode_params=args.decode_param_sweep,
    )
    log(
        f"{device.device_kind}, jax {jax.__version__}, {bench.memory_bytes / 2**30:.1f} GiB, "
        f"{bench.num_sms} SMs; writing {out}"
    )

    bandwidth = bandwidth_tbps(plan.copy_bytes, iters)
    bench.copy_tbps = results.record["copy_tbps"] = bandwidth["copy"]
    results.record["elementwise_tbps"] = bandwidth["elementwise"]
    log(
        f"copy {bandwidth['copy']:.3f} TB/s, x+1 {bandwidth['elementwise']:.3f} TB/s "
        f"({plan.copy_bytes / 2**30:.2f} GiB bf16, read + written)"
    )
    results.write()

    rng = np.random.default_rng(0)
    # Cheapest first, so that decode's long sweep is what the time budget cuts.
    if "kv_write" in sections:
        bench_kv_write(bench, rng)
    if "prefill" in sections:
        bench_prefill(bench)
    if "decode" in sections:
        bench_decode(bench, rng)
        table = suggested_decode_table(results.record["sweeps"])
        results.record["suggested_decode_table"] = table
        log("\nSuggested config table (pallas_kernels/tuning.py):\n" + table)
    results.record["wall_s"] = round(time.time() - start, 1)
    results.write()
    log("\n" + summary(results))
    log(f"\n{results.record['wall_s']} s; results in {out}")


if __name__ == "__main__":
    main()
