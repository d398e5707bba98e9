"""Markdown tables of a kernel benchmark run's rows."""

from __future__ import annotations

from scripts.bench_utils import Results


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


DECODE_KERNELS = ("jllm_decode", "jllm_decode_table", "jax_paged_attention", "xla_reference")


def _times(value):
    return "-" if value is None else f"{value:.2f}x"


def _ratio(numerator, denominator):
    return numerator / denominator if numerator and denominator else None


def decode_summary(rows: list[dict]) -> list[str]:
    """TB/s per decode shape: jllm's best variant (its splits and share of the copy
    bandwidth), the table's config, JAX's paged_attention at its best settings, the XLA
    reference; and jllm's speedup over JAX's kernel in wall time and in kernel (profiled
    device) time, each kernel at its fastest variant by that measure."""
    shapes: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r["kernel"] in DECODE_KERNELS:
            shapes.setdefault((r["model"], r["batch"], r["context"]), {})[r["kernel"]] = r
    if not shapes:
        return []
    lines = [
        "### Decode attention, TB/s",
        "",
        "| model | batch | context | jllm (splits, % of copy) | table (splits) "
        "| jax paged (k_splits/ppcb) | xla ref | jllm speedup vs jax paged "
        "| same, kernel time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    models = list(dict.fromkeys(model for model, _, _ in shapes))
    for (model, batch, context), k in sorted(shapes.items(), key=lambda item: (models.index(item[0][0]), *item[0][1:])):
        jllm, table = k.get("jllm_decode", {}), k.get("jllm_decode_table", {})
        jaxp, xla = k.get("jax_paged_attention", {}), k.get("xla_reference", {})
        if jllm.get("skipped"):
            lines.append(f"| {model} | {batch} | {context} | skipped ({jllm['skipped']}) | | | | | |")
            continue
        jax_kernel_ms = jaxp.get("best_kernel_ms") or jaxp.get("kernel_ms")
        share = jllm.get("share_of_copy")
        share = "" if share is None else f", {share:.0%}"
        speedup = _ratio(jaxp.get("ms"), jllm.get("ms"))
        # Each kernel's least kernel time over its variants (older records: the pick's).
        kernel_speedup = _ratio(jax_kernel_ms, jllm.get("best_kernel_ms") or jllm.get("kernel_ms"))
        jax_settings = f"{jaxp.get('k_splits')}/{jaxp.get('pages_per_compute_block')}"
        lines.append(
            f"| {model} | {batch} | {context} "
            f"| {_fmt(jllm.get('tbps'), '.2f')} ({jllm.get('num_splits')}{share}) "
            f"| {_fmt(table.get('tbps'), '.2f')} ({table.get('num_splits')}) "
            f"| {_fmt(jaxp.get('tbps'), '.2f')} ({jax_settings}) "
            f"| {_fmt(xla.get('tbps'), '.2f')} | {_times(speedup)} | {_times(kernel_speedup)} |"
        )
    return lines


def prefill_summary(rows: list[dict]) -> list[str]:
    prefill = [r for r in rows if r.get("query_len") is not None]
    if not prefill:
        return []
    lines = [
        "### Prefill attention, causal TFLOP/s",
        "",
        "| tokens | query tokens | kernel | ms | TFLOP/s | max rel err |",
        "|---|---|---|---|---|---|",
    ]
    for r in prefill:
        settings = ", ".join(f"{k} {r[k]}" for k in ("block_q", "block_kv", "num_warps", "num_stages") if k in r)
        kernel = f"{r['kernel']} ({settings})" if settings else r["kernel"]
        tflops = "failed" if r.get("error") else _fmt(r["tflops"], ".1f")
        lines.append(
            f"| {r['context']} | {r['query_len']} | {kernel} | {_fmt(r['ms'], '.3f')} "
            f"| {tflops} | {_fmt(r['max_rel_err'], '.1e')} |"
        )
    return lines


def kv_write_summary(rows: list[dict]) -> list[str]:
    writes = [r for r in rows if r["kernel"] in ("jllm_kv_write", "xla_reference_kv_write")]
    if not writes:
        return []
    lines = ["### KV write", "", "| tokens | kernel | ms | TB/s |", "|---|---|---|---|"]
    for r in sorted(writes, key=lambda r: r["batch"]):
        lines.append(f"| {r['batch']} | {r['kernel']} | {_fmt(r['ms'], '.4f')} | {_fmt(r['tbps'], '.3f')} |")
    return lines


def summary(results: Results) -> str:
    """Markdown tables of the run's rows."""
    rows = results.rows()
    tables = [decode_summary(rows), prefill_summary(rows), kv_write_summary(rows)]
    return "\n\n".join("\n".join(t) for t in tables if t)
