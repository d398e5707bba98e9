"""Timing, compiling and result-file helpers for scripts/bench_kernels.py."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import json
import os
import re
import statistics
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


def log(*parts) -> None:
    # Flushed at once, so a run killed at the time cap still shows what it measured.
    print(*parts, flush=True)


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def chained(fn: Callable, reps: int, rotating: tuple[int, ...] = (), carry: int = 1) -> Callable:
    """`reps` calls of `fn` back to back in one program, each call's output fed in as the
    next call's first argument (so `fn` must return an array shaped like that argument),
    or, with `carry` > 1, as its first `carry` arguments (`fn` returns a tuple of them:
    a KV write returns the caches it was given).

    A lone jitted call costs tens of microseconds of dispatch and sync, more than a small
    decode kernel runs; in one program that cost comes once per `reps` calls. The chain
    makes every call depend on the one before, as the layers of a model step do, so XLA
    can neither hoist nor drop a call and the timed program holds nothing but the calls
    themselves (no loop counter, no slicing of per-call inputs). The calls are unrolled,
    not a `fori_loop`: an XLA while loop adds several microseconds per iteration.

    The arguments at positions `rotating` are tuples of alternatives; call i takes
    alternative i % len: decode rotates block tables over disjoint pages, so that calls
    on small shapes cannot find the previous calls' K/V in L2.
    """
    def run(*args):
        out, rest = tuple(args[:carry]), args[carry:]
        for i in range(reps):
            per_call = [a[i % len(a)] if n in rotating else a
                        for n, a in enumerate(rest, start=carry)]
            out = fn(*out, *per_call)
            out = (out,) if carry == 1 else tuple(out)
        return out[0] if carry == 1 else out

    return run


def first_alternative(args: tuple, rotating: tuple[int, ...]) -> tuple:
    """`args` of a `chained` program with each rotating tuple replaced by its first entry:
    the arguments of one plain call."""
    return tuple(a[0] if n in rotating else a for n, a in enumerate(args))


def _count_to_fill(target_s: float, seconds_each: float, least: int, most: int) -> int:
    """How many things of `seconds_each` fill `target_s`, within [least, most]."""
    return max(least, min(most, round(target_s / max(seconds_each, 1e-9))))


def reps_for(seconds_per_call: float, target_s: float = 1e-3, least: int = 3,
             most: int = 32) -> int:
    """Calls chained in one timed program: about `target_s` of them, at least `least`,
    at most `most` (each unrolled call is compiled anew, so this bounds compile time)."""
    return _count_to_fill(target_s, seconds_per_call, least, most)


def programs_per_sample(seconds_per_program: float, target_s: float = 5e-3,
                        most: int = 20) -> int:
    """Programs dispatched back to back per timing sample: enough that a sample runs
    about `target_s`, so that the one host sync at its end (~50 µs) costs about 1 %."""
    return _count_to_fill(target_s, seconds_per_program, 1, most)


def median_seconds(call: Callable[[], Any], iters: int, warmup: int = 1,
                   max_seconds: float = 3.0, back_to_back: int = 1) -> float:
    """Median wall time of `call()` after `warmup` runs, over `iters` samples (or fewer, at
    least 3, once `max_seconds` have passed, so that a slow kernel setting does not eat
    the run's time budget). A sample dispatches `back_to_back` calls, waits for the last
    and divides by their number: the host dispatches the next program while the device
    runs the one before, so the device never idles between them."""
    for _ in range(warmup):
        jax.block_until_ready(call())
    times, deadline = [], time.perf_counter() + max_seconds
    while len(times) < iters and (len(times) < 3 or time.perf_counter() < deadline):
        start = time.perf_counter()
        for _ in range(back_to_back):
            out = call()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / back_to_back)
    return statistics.median(times)


def gpu_events(profile, names: bool = False) -> list[tuple] | None:
    """(start_ns, duration_ns) of the events on a `jax.profiler.ProfileData`'s GPU stream
    lines (kernels, memsets and copies as the device ran them), in start order, with
    each event's name third if `names`; None with no GPU plane."""
    events, found = [], False
    for plane in profile.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if "stream" in line.name.lower():
                found = True
                events += [(event.start_ns, event.duration_ns, *([event.name] if names else []))
                           for event in line.events]
    return sorted(events) if found else None


def busy_ns_per_burst(events: list[tuple[int, int]], count: int, min_gap_ns: int) -> list[int] | None:
    """Summed event durations of each of `count` bursts, split at the `count - 1` longest
    idle gaps of the device; None if one of those gaps is shorter than `min_gap_ns` (then
    the bursts are not told apart) or there are fewer events than bursts. Splitting at
    the longest gaps, not at every long one, keeps a burst whole when the host stalls
    mid-burst (profiler buffer flushes do) for less than the pause between bursts."""
    if count < 1 or len(events) < count:
        return None
    gaps, end = [], None  # (idle ns before event i, i)
    for i, (start, duration) in enumerate(events):
        if end is not None:
            gaps.append((start - end, i))
        end = start + duration if end is None else max(end, start + duration)
    cuts = sorted(gaps, reverse=True)[: count - 1]
    if any(gap < min_gap_ns for gap, _ in cuts):
        return None
    bounds = [0, *sorted(i for _, i in cuts), len(events)]
    return [sum(d for _, d in events[a:b]) for a, b in zip(bounds, bounds[1:])]


def traced_gpu_events(work: Callable[[], Any], names: bool = False) -> list[tuple] | None:
    """gpu_events of a profiler trace of `work()` (which should wait for its results);
    None without a trace or a GPU plane in it."""
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            work()
        traces = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)
        return gpu_events(jax.profiler.ProfileData.from_file(traces[0]), names) if traces else None


# The pause between two profiled variants, and the least idle time that tells their bursts
# of events apart: a variant's programs go out back to back, so its device gaps are launch
# gaps (tens of microseconds) or the odd host stall.
_PAUSE_S, _MIN_GAP_NS = 10e-3, 2_000_000


def kernel_seconds_each(runs: list[tuple[Callable[[], Any], int, int]]) -> list[float | None]:
    """Device time per call of each (call, programs, calls_per_program): `programs` runs
    of `call()` (each `calls_per_program` chained calls), all under one profiler trace
    (starting and reading a trace takes seconds, a variant's programs a few ms) with a
    pause after each, the GPU events of each burst (busy_ns_per_burst) summed, / programs
    / calls. Unlike the wall time it leaves out the gaps between kernels, so it does not
    move with the host's launch speed, which at a few microseconds a call can dominate
    the wall time.
    Nones off the GPU, or if the bursts cannot be told apart."""
    if not runs:
        return []

    def run_all():
        for call, programs, _ in runs:
            for _ in range(programs):
                out = call()
            jax.block_until_ready(out)
            time.sleep(_PAUSE_S)

    bursts = busy_ns_per_burst(traced_gpu_events(run_all) or [], len(runs), _MIN_GAP_NS)
    if bursts is None:
        return [None] * len(runs)
    return [busy / 1e9 / (programs * calls) for busy, (_, programs, calls) in zip(bursts, runs)]


@dataclasses.dataclass
class Job:
    """One function to compile ahead of timing, with example arguments."""
    fn: Callable
    args: tuple
    donate_argnums: tuple[int, ...] = ()


def compile_all(jobs: dict[str, Job], threads: int) -> dict[str, Any]:
    """Name -> compiled executable, or the exception its tracing or compiling raised.

    Compiling on several threads overlaps XLA's and Triton's native compile work (it
    drops the GIL): a shape's split sweep is a dozen kernels that differ only in their
    static settings.
    """
    def compile_one(job: Job):
        return jax.jit(job.fn, donate_argnums=job.donate_argnums).lower(*job.args).compile()

    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        futures = {name: pool.submit(compile_one, job) for name, job in jobs.items()}
        compiled = {}
        for name, future in futures.items():
            try:
                compiled[name] = future.result()
            except Exception as error:  # noqa: BLE001 - reported per kernel, the run goes on.
                compiled[name] = error
    return compiled


@jax.jit
def _max_abs_diff_and_ref(out, ref):
    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    return jnp.max(jnp.abs(out - ref)), jnp.max(jnp.abs(ref))


def rel_err(pairs) -> float:
    """max |out - ref| / max |ref| over (out, ref) pairs of arrays, computed on the device."""
    diff, scale = 0.0, 0.0
    for out, ref in pairs:
        d, s = _max_abs_diff_and_ref(out, ref)
        diff, scale = max(diff, float(d)), max(scale, float(s))
    return diff / scale if scale else diff


def bandwidth_tbps(nbytes: int, iters: int) -> dict[str, float]:
    """Read + write TB/s of a jitted copy and of x + 1 over an `nbytes` bf16 array.

    The copy is the ceiling a memory-bound kernel can hope for; x + 1 is what an
    XLA elementwise fusion gets.
    """
    x = jnp.zeros((nbytes // 2,), jnp.bfloat16)
    figures = {}
    for name, fn in (("copy", jnp.copy), ("elementwise", lambda a: a + 1)):
        step = jax.jit(fn)
        seconds = median_seconds(lambda: step(x), iters)
        figures[name] = 2 * x.nbytes / seconds / 1e12
    return figures


def full_copies_in_hlo(hlo_text: str, shapes: list[tuple[int, ...]]) -> list[str]:
    """Lines of optimized HLO that copy a whole array of one of `shapes`."""
    dims = "|".join(",".join(map(str, s)) for s in shapes)
    pattern = re.compile(rf"= \w+\[({dims})\]\S* copy(-start)?\(")
    return [line.strip() for line in hlo_text.splitlines() if pattern.search(line)]


def device_memory_bytes(device) -> int:
    """What the device can hold: the allocator's limit, or the host's RAM on CPU."""
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class Results:
    """The run's JSON record, rewritten after every shape so a killed run leaves its results."""

    def __init__(self, path: str, header: dict):
        self.path = path
        self.record = {**header, "rows": [], "sweeps": []}

    def add_row(self, **row) -> None:
        self.record["rows"].append(row)

    def add_sweep(self, **entry) -> None:
        self.record["sweeps"].append(entry)

    def rows(self, prefix: str = "") -> list[dict]:
        return [r for r in self.record["rows"] if r["kernel"].startswith(prefix)]

    def write(self) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.record, f, indent=1)
        os.replace(tmp, self.path)  # Never a half-written file, even if killed mid-write.
