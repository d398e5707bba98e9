"""The kernel benchmark's timing harness (scripts/bench_utils.py, scripts/kernel_bench/):
what each timed program computes, the page sets decode rotates over, and a tiny CPU run
of the script end to end (Pallas interpret mode)."""

import dataclasses
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scripts import bench_kernels
from scripts.bench_utils import (
    chained,
    busy_ns_per_window,
    first_alternative,
    gpu_events,
    host_spans,
    kernel_seconds_each,
    programs_per_sample,
    reps_for,
)
from scripts.kernel_bench import decode
from pallas_kernels import DecodeConfig
from scripts.kernel_bench.common import LLAMA_8B


def test_chained_feeds_each_output_into_the_next_call_and_rotates_alternatives():
    calls = []

    def fn(x, scale, offset):
        calls.append(offset)
        return x * scale + offset

    run = chained(fn, reps=5, rotating=(2,))
    offsets = (jnp.float32(1.0), jnp.float32(10.0), jnp.float32(100.0))
    out = jax.jit(run)(jnp.float32(0.5), jnp.float32(2.0), offsets)
    want = 0.5
    for i in range(5):
        want = want * 2.0 + (1.0, 10.0, 100.0)[i % 3]
    assert float(out) == want
    assert len(calls) == 5  # Unrolled: traced once per call, no loop.
    assert first_alternative((1, offsets, 3), (1,)) == (1, offsets[0], 3)


def test_chained_threads_several_carried_arguments():
    def write(a, b, step):
        return a + step, b * 2.0

    run = chained(write, reps=3, carry=2)
    a, b = jax.jit(run)(jnp.float32(0.0), jnp.float32(1.0), jnp.float32(5.0))
    assert (float(a), float(b)) == (15.0, 8.0)


def test_program_sizes_stay_in_their_bounds():
    assert reps_for(1e-9) == 32 and reps_for(1.0) == 3
    assert reps_for(1e-4) == 10
    assert programs_per_sample(1.0) == 1 and programs_per_sample(1e-9) == 20


def test_decode_tables_rotate_over_disjoint_pages_spanning_twice_the_l2():
    rng = np.random.default_rng(0)
    heads = LLAMA_8B
    batch, context, page = 1, 512, 16
    per_call = decode.kv_bytes(heads, batch, context)
    q, seq_lens, tables = decode.decode_batch(rng, heads, batch, context, 100_000, page)
    assert q.shape == (1, 32, 128) and seq_lens.tolist() == [512]
    assert len(tables) * per_call >= 2 * decode.L2_BYTES
    pages = np.concatenate([np.asarray(t).ravel() for t in tables])
    assert len(np.unique(pages)) == len(pages)  # No page read by two calls.
    # A small cache caps the count: every table still gets whole, distinct pages.
    _, _, few = decode.decode_batch(rng, heads, 4, 512, 200, page)
    assert len(few) == 200 // (4 * 512 // page)
    assert all(t.shape == (4, 32) for t in few)


def _sweep(head_dim, splits, ms, kernel_ms=None, **launch):
    config = dataclasses.asdict(DecodeConfig(splits, **launch))
    return dict(kernel="jllm_decode", batch=1, context=512, head_dim=head_dim, **config, ms=ms, kernel_ms=kernel_ms)


def test_decode_table_suggestion_takes_each_head_dims_fastest_config():
    sweeps = [
        _sweep(128, 4, 2.0),
        _sweep(128, 8, 1.0),
        _sweep(64, 8, 1.5),
        _sweep(64, 4, 1.4),
        _sweep(128, 16, 0.9, num_warps=2),
        _sweep(64, 16, 4.2, num_warps=2),
    ]
    lines = [line.strip() for line in decode.suggested_decode_table(sweeps).splitlines()]
    assert lines[0] == "DECODE_TABLES = {"
    d64, d128 = lines.index("64: ("), lines.index("128: (")
    assert lines[d64 + 1].startswith("(_C(4), ")
    assert lines[d64 + 2].startswith("(_C(4, 64, 2)?, ")  # Not measured: kept.
    assert lines[d128 + 1].startswith("(_C(16, 64, 2), ")


def test_decode_table_suggestion_prefers_default_settings_within_the_tie_margin():
    sweeps = [_sweep(64, 8, 1.0, kernel_ms=1.000), _sweep(64, 8, 1.0, kernel_ms=0.995, num_stages=2)]
    first_row = decode.suggested_decode_table(sweeps).splitlines()[2].strip()
    assert first_row.startswith("(_C(8), ")
    sweeps[1]["kernel_ms"] = 0.9  # Clearly faster: taken.
    first_row = decode.suggested_decode_table(sweeps).splitlines()[2].strip()
    assert first_row.startswith("(_C(8, 64, 4, 2), ")


def test_decode_table_suggestion_ranks_by_kernel_time_when_every_variant_has_one():
    sweeps = [
        _sweep(64, 8, 1.0, kernel_ms=0.9),
        _sweep(64, 16, 1.1, kernel_ms=0.5, block_kv=32, num_warps=2, num_stages=2),
    ]
    assert decode.suggested_decode_table(sweeps).splitlines()[2].strip().startswith("(_C(16, 32, 2, 2), ")
    sweeps[0]["kernel_ms"] = None  # Then the wall time decides.
    assert decode.suggested_decode_table(sweeps).splitlines()[2].strip().startswith("(_C(8), ")


def test_launch_setting_sweep_covers_each_split_count_once_and_skips_idle_splits():
    configs = decode.launch_setting_configs((8, 8, 16), 512, tried={DecodeConfig(8)})
    assert len(configs) == len(set(configs)) and DecodeConfig(8) not in configs
    assert DecodeConfig(8, num_warps=2, num_stages=2) in configs
    assert DecodeConfig(16, 32, 2, 2) in configs  # 32-key blocks at twice the splits too.
    assert DecodeConfig(32, 32, 2, 2) in configs
    assert DecodeConfig(16, 128) not in configs  # 2048 keys of blocks for 512: idle splits.
    assert all(c.num_splits * c.block_kv <= 1024 for c in configs)


def test_config_code_leaves_out_trailing_defaults():
    assert decode.config_code(DecodeConfig(8)) == "_C(8)"
    assert decode.config_code(DecodeConfig(8, num_warps=2)) == "_C(8, 64, 2)"
    assert decode.config_code(DecodeConfig(2, 32, 4, 1)) == "_C(2, 32, 4, 1)"


def test_kernel_time_takes_the_gpu_events_that_start_within_each_variants_host_span():
    # A long host stall inside the first variant (between its events at 10 and 1_500_010)
    # does not matter: only the annotations' spans decide.
    events = [(10, 10), (1_500_010, 10), (6_500_000, 7), (6_500_020, 3), (10_500_000, 1)]
    windows = [(0, 2_000_000), (6_000_000, 6_600_000), (10_000_000, 11_000_000), (12_000_000, 13_000_000)]
    assert busy_ns_per_window(events, windows) == [20, 10, 1, None]
    assert busy_ns_per_window([], [(0, 1)]) == [None]


def test_host_spans_are_the_named_host_events():
    profile = _profile(
        [
            ("/host:CPU", [("python", [10_000, 20_000])]),
            ("/device:GPU:0", [("Stream #13(Compute)", [20_000])]),
        ]
    )
    # _profile names an event of duration d "op{d}" and starts event i at 100 * i.
    assert host_spans(profile, ["op20000", "missing"]) == {"op20000": (100, 20_100)}


def test_kv_write_section_runs_end_to_end_in_interpret_mode(tmp_path):
    out = tmp_path / "kernels.json"
    bench_kernels.main(["--interpret", "--tiny", "--iters", "1", "--only", "kv_write", "--out", str(out)])
    record = json.loads(out.read_text())
    rows = {r["kernel"]: r for r in record["rows"]}
    assert rows["jllm_kv_write"]["max_rel_err"] == 0.0
    assert rows["jllm_kv_write"]["ms"] > 0
    assert record["kv_write_hlo"]["verdict"].startswith("ok")
    assert record["copy_tbps"] > 0


def test_plan_narrows_to_the_models_and_batches_asked_for():
    args = bench_kernels.parse_args(["--model", "llama-3.2-1b", "--batch", "1", "--batch", "256"])
    plan = bench_kernels.select_plan(args)
    assert [h.model for h in plan.decode_heads] == ["llama-3.2-1b"]
    assert plan.batches == (1, 256)
    full = bench_kernels.select_plan(bench_kernels.parse_args([]))
    assert plan.contexts == full.contexts and len(full.batches) == 4


def _profile(planes):
    """A stand-in for jax.profiler.ProfileData: planes of lines of events."""
    ns = types.SimpleNamespace

    def line(name, durations):
        return ns(
            name=name, events=[ns(start_ns=100 * i, duration_ns=d, name=f"op{d}") for i, d in enumerate(durations)]
        )

    return ns(planes=[ns(name=name, lines=[line(*spec) for spec in lines]) for name, lines in planes])


def test_gpu_events_are_the_gpu_stream_events_only_in_start_order():
    profile = _profile(
        [
            ("/host:CPU", [("python", [10_000])]),
            (
                "/device:GPU:0",
                [("Stream #13(Compute)", [1_000, 2_500]), ("XLA Ops", [9_999]), ("Stream #14(MemcpyD2D)", [500])],
            ),
        ]
    )
    assert gpu_events(profile) == [(0, 500), (0, 1_000), (100, 2_500)]
    assert gpu_events(profile, names=True) == [(0, 500, "op500"), (0, 1_000, "op1000"), (100, 2_500, "op2500")]
    assert gpu_events(_profile([("/host:CPU", [("python", [10_000])])])) is None


def test_kernel_seconds_traces_the_calls_and_finds_no_gpu_on_the_cpu():
    calls = []

    def call():
        calls.append(1)
        return jnp.ones(4) + len(calls)

    assert kernel_seconds_each([(call, 3, 2), (call, 1, 2)]) == [None, None]
    assert len(calls) == 4


@pytest.mark.slow
def test_decode_section_runs_end_to_end_in_interpret_mode(tmp_path):
    out = tmp_path / "kernels.json"
    bench_kernels.main(["--interpret", "--tiny", "--iters", "1", "--only", "decode", "--batch", "3", "--out", str(out)])
    record = json.loads(out.read_text())
    rows = [r for r in record["rows"] if r["batch"] == 3]
    assert {r["context"] for r in rows} == {64, 128}
    for kernel in ("jllm_decode", "jllm_decode_table", "jax_paged_attention", "xla_reference"):
        picked = [r for r in rows if r["kernel"] == kernel]
        assert len(picked) == 2 and all(r["ms"] > 0 for r in picked)
        assert all(r["kernel_ms"] is None for r in picked)  # No GPU to profile.
    assert all(r["max_rel_err"] < 2e-2 for r in rows)
    assert "DECODE_TABLES = {" in record["suggested_decode_table"]
    sweeps = [s for s in record["sweeps"] if s["kernel"] == "jllm_decode"]
    assert sweeps and all(s["num_warps"] and "kernel_ms" in s for s in sweeps)
    assert "xla_flags" in record


def test_decode_summary_compares_each_kernels_least_kernel_time():
    from scripts.kernel_bench.summary import decode_summary

    shape = dict(model="m", batch=1, context=512)
    rows = [
        dict(shape, kernel="jllm_decode", ms=0.010, kernel_ms=0.006, best_kernel_ms=0.004, tbps=0.2, num_splits=8),
        dict(
            shape,
            kernel="jax_paged_attention",
            ms=0.012,
            kernel_ms=0.005,
            best_kernel_ms=0.005,
            tbps=0.17,
            k_splits=8,
            pages_per_compute_block=4,
        ),
    ]
    line = decode_summary(rows)[-1]
    assert line.endswith("| 1.20x | 1.25x |")  # Wall 12/10; kernel 5/4, not 5/6.
