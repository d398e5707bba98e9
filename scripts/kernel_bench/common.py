"""What every section of the kernel benchmark shares: the model heads, the plan of shapes,
the run's state, and compiling, checking and timing a list of kernel variants."""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Callable

import jax
import jax.numpy as jnp

warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"jax\..*")
warnings.filterwarnings("ignore", message=".*(Triton|deprecated).*", category=DeprecationWarning)

from scripts.bench_utils import (  # noqa: E402
    Job,
    Results,
    chained,
    compile_all,
    first_alternative,
    first_line,
    kernel_seconds_each,
    log,
    median_seconds,
    programs_per_sample,
    reps_for,
)

# Rows compared with the reference per kernel call: the reference gathers every key for
# every row, which at 32k tokens costs ~270 MB a row.
CHECK_ROWS = 8
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
    "full": Plan(
        (LLAMA_8B, LLAMA_1B),
        (1, 8, 64, 256),
        (512, 2048, 8192, 32768),
        LLAMA_8B,
        (2048, 8192, 32768),
        (256, 8192),
        16384,
        2 << 30,
        budget_s=450,
    ),
    "quick": Plan((LLAMA_8B,), (1, 64), (2048, 8192), LLAMA_8B, (2048, 8192), (256,), 16384, 1 << 30, budget_s=100),
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
    # Leading arguments that fn returns for the next call (bench_utils.chained); the first
    # is the output that gets checked.
    carry: int = 1
    ms: float | None = None
    max_rel_err: float | None = None
    error: str | None = None
    kernel_ms: float | None = None  # Profiled device time per call (profile_kernel_ms).
    # The timed program, its arguments, calls per program and programs per sample, kept
    # after timing so that the picked variants can be profiled (kernel_ms).
    program: tuple | None = None

    @property
    def label(self) -> str:
        return self.kernel + "".join(f" {k}={v}" for k, v in self.params.items())


def random_normal(seed: int, shape, dtype=jnp.bfloat16) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def run_variants(
    bench: Bench, variants: list[Variant], seconds_per_call: float, check, figure, profile: bool = False
) -> None:
    """Compiles every variant (in parallel), then checks and times them one at a time;
    with `profile`, then sets their kernel times from one profiler trace.

    seconds_per_call: a rough guess, to size the timed programs; check(output of one
    call) -> max relative error; figure(ms) -> text for the progress line.
    """
    reps = bench.reps_for(seconds_per_call)
    back_to_back = bench.programs_per_sample(reps * seconds_per_call)
    jobs = {v.label: Job(chained(v.fn, reps, v.rotating, v.carry), v.args) for v in variants}
    compiled = compile_all(jobs, bench.threads)
    for v in variants:
        exe, args = compiled[v.label], jobs[v.label].args
        try:
            if isinstance(exe, Exception):
                raise exe
            out = jax.jit(v.fn)(*first_alternative(v.args, v.rotating))
            v.max_rel_err = check(out[0] if v.carry > 1 else out)
            v.ms = 1e3 * median_seconds(lambda: exe(*args), bench.iters, back_to_back=back_to_back) / reps
            v.program = (exe, args, reps, back_to_back)
            log(f"  {v.label:<60} {v.ms:9.4f} ms  {figure(v.ms)}  err {v.max_rel_err:.1e}")
        except Exception as error:  # noqa: BLE001 - one kernel's failure must not end the run.
            v.error = first_line(error)
            log(f"  {v.label:<60} failed: {v.error}")
    if profile:
        profile_kernel_ms(bench, variants)


def profile_kernel_ms(bench: Bench, variants: list[Variant]) -> None:
    """Sets each timed variant's `kernel_ms` (where not yet set), its device time per call,
    all from one profiler trace (bench_utils.kernel_seconds_each). Nothing in interpret
    mode."""
    timed = [v for v in variants if v.program is not None and v.kernel_ms is None]
    if bench.interpret or not timed:
        return
    runs = [
        (lambda exe=exe, args=args: exe(*args), back_to_back, reps)
        for exe, args, reps, back_to_back in (v.program for v in timed)
    ]
    for v, seconds in zip(timed, kernel_seconds_each(runs)):
        v.kernel_ms = None if seconds is None else 1e3 * seconds


def fastest(variants: list[Variant], by: str = "ms") -> Variant | None:
    """The variant with the least `by` ("ms": wall time, or "kernel_ms")."""
    timed = [v for v in variants if getattr(v, by) is not None]
    return min(timed, key=lambda v: getattr(v, by)) if timed else None


def fastest_on_device(variants: list[Variant]) -> Variant | None:
    """The variant with the least kernel time, or wall time where none was profiled: what
    a sweep builds on, since at small shapes the wall time's launch gaps are noise."""
    return fastest(variants, by="kernel_ms") or fastest(variants)
