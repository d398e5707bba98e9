"""Timing, compiling and result-file helpers for scripts/bench_kernels.py, and the header
every benchmark's result record starts with."""

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


def run_header() -> dict:
    """When, on what card, with which jax and by which command a result was measured."""
    import datetime
    import sys

    return {
        "date": datetime.date.today().isoformat(),
        "device": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "command": " ".join(sys.argv),
    }


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
    themselves (no loop counter, no slicing of per-call inputs). XLA may still fuse one
    call's last op with the next call's first (JAX's paged_attention: its split merge
    with the next call's q padding), which a model's projections between calls prevent;
    `bench_kernels.py --reps 1` times calls one program each. The calls are
    unrolled, not a `fori_loop`: an XLA while loop adds several microseconds per
    iteration.

    The arguments at positions `rotating` are tuples of alternatives; call i takes
    alternative i % len: decode rotates block tables over disjoint pages, so that calls
    on small shapes cannot find the previous calls' K/V in L2.
    """

    def run(*args):
        out, rest = tuple(args[:carry]), args[carry:]
        for i in range(reps):
            per_call = [a[i % len(a)] if n in rotating else a for n, a in enumerate(rest, start=carry)]
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


def reps_for(seconds_per_call: float, target_s: float = 1e-3, least: int = 3, most: int = 32) -> int:
    """Calls chained in one timed program: about `target_s` of them, at least `least`,
    at most `most` (each unrolled call is compiled anew, so this bounds compile time)."""
    return _count_to_fill(target_s, seconds_per_call, least, most)


def programs_per_sample(seconds_per_program: float, target_s: float = 5e-3, most: int = 20) -> int:
    """Programs dispatched back to back per timing sample: enough that a sample runs
    about `target_s`, so that the one host sync at its end (~50 µs) costs about 1 %."""
    return _count_to_fill(target_s, seconds_per_program, 1, most)


def median_seconds(
    call: Callable[[], Any], iters: int, warmup: int = 1, max_seconds: float = 3.0, back_to_back: int = 1
) -> float:
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
                events += [
                    (event.start_ns, event.duration_ns, *([event.name] if names else [])) for event in line.events
                ]
    return sorted(events) if found else None


def host_spans(profile, names) -> dict[str, tuple[int, int]]:
    """(start_ns, end_ns) of the host events (jax.profiler.TraceAnnotation) named one of
    `names` in a `jax.profiler.ProfileData`, the last of each name."""
    spans = {}
    for plane in profile.planes:
        if plane.name.startswith("/host:"):
            for line in plane.lines:
                for event in line.events:
                    if event.name in names:
                        spans[event.name] = (event.start_ns, event.start_ns + event.duration_ns)
    return spans


def busy_ns_per_window(events: list[tuple[int, int]], windows: list[tuple[int, int]]) -> list[int | None]:
    """Summed durations of the (start_ns, duration_ns) events that start within each
    [start, end) window; None for a window that holds none."""
    busy = []
    for lo, hi in windows:
        inside = [d for start, d in events if lo <= start < hi]
        busy.append(sum(inside) if inside else None)
    return busy


def traced_profile(work: Callable[[], Any]):
    """The `jax.profiler.ProfileData` of a trace of `work()` (which should wait for its
    results), or None if the trace wrote none."""
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            work()
        traces = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)
        return jax.profiler.ProfileData.from_file(traces[0]) if traces else None


def traced_gpu_events(work: Callable[[], Any], names: bool = False) -> list[tuple] | None:
    """gpu_events of a profiler trace of `work()` (which should wait for its results);
    None without a trace or a GPU plane in it."""
    profile = traced_profile(work)
    return gpu_events(profile, names) if profile is not None else None


# An idle pause between two profiled variants, so that no device event lies near the edge
# of two variants' host spans.
_PAUSE_S = 1e-3


def kernel_seconds_each(runs: list[tuple[Callable[[], Any], int, int]]) -> list[float | None]:
    """Device time per call of each (call, programs, calls_per_program): `programs` runs
    of `call()` (each `calls_per_program` chained calls), all under one profiler trace
    (starting and reading a trace takes seconds, a variant's programs a few ms), each
    variant inside its own host annotation that waits for its results; the GPU events
    that start within a variant's annotation are its own (a variant launches nothing
    before its annotation opens, and its last program ends before the annotation
    closes), summed, / programs / calls. Unlike the wall time this leaves out the gaps
    between kernels, so it does not move with the host's launch speed, which at a few
    microseconds a call can dominate the wall time. (It replaces splitting the trace at
    its longest idle gaps, which a host stall inside a variant could fool: a 1 x 512 run
    on 2026-11-26 got a JAX kernel time of 0.39 us and an XLA one above its wall time.)
    Nones off the GPU, or where a variant's annotation or events are missing."""
    if not runs:
        return []
    labels = [f"kernel_seconds_each {i}" for i in range(len(runs))]

    def run_all():
        for label, (call, programs, _) in zip(labels, runs):
            with jax.profiler.TraceAnnotation(label):
                for _ in range(programs):
                    out = call()
                jax.block_until_ready(out)
            time.sleep(_PAUSE_S)

    profile = traced_profile(run_all)
    events = gpu_events(profile) if profile is not None else None
    spans = host_spans(profile, labels) if events else {}
    if len(spans) < len(labels):
        return [None] * len(runs)
    busy = busy_ns_per_window(events, [spans[label] for label in labels])
    return [None if b is None else b / 1e9 / (programs * calls) for b, (_, programs, calls) in zip(busy, runs)]


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
