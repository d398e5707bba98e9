"""The ORCA load report (vLLM's orca_metrics): a client that sends
`endpoint-load-metrics-format: text|json` gets the engine's load in an
`endpoint-load-metrics` header on a non-streaming completion, for load balancers that
route by it."""

from __future__ import annotations

import json
import logging
from statistics import fmean

from fastapi import Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry

logger = logging.getLogger(__name__)

FORMAT_HEADER = "endpoint-load-metrics-format"
METRICS_HEADER = "endpoint-load-metrics"
# Prometheus gauge -> ORCA named metric, in vLLM's order, and how the series of several
# data-parallel engines combine: waiting requests add up; the replicas' KV pools are the
# same size, so the usage of all of them is the mean.
ORCA_METRICS = {
    "vllm:num_requests_waiting": ("num_requests_waiting", sum),
    "vllm:kv_cache_usage_perc": ("kv_cache_usage_perc", fmean),
}


def named_metrics(registry: CollectorRegistry) -> dict[str, float]:
    values: dict[str, list[float]] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name in ORCA_METRICS:
                values.setdefault(sample.name, []).append(float(sample.value))
    return {name: combine(values[gauge]) for gauge, (name, combine) in ORCA_METRICS.items() if gauge in values}


def orca_header(format_name: str, registry: CollectorRegistry) -> str | None:
    """The header's value in the asked format, or None for no or an unknown format."""
    format_name = format_name.strip().lower()
    if not format_name:
        return None
    if format_name == "text":
        return "TEXT " + ", ".join(f"named_metrics.{name}={value}" for name, value in named_metrics(registry).items())
    if format_name == "json":
        return "JSON " + json.dumps({"named_metrics": named_metrics(registry)})
    logger.warning("Unknown %s %r: only 'text' and 'json' are supported.", FORMAT_HEADER, format_name)
    return None


def add_load_report(response, raw_request: Request):
    """Adds the report to a successful JSON (non-streaming) response when asked for."""
    if isinstance(response, JSONResponse) and response.status_code == 200:
        value = orca_header(raw_request.headers.get(FORMAT_HEADER, ""), raw_request.app.state.metrics_registry)
        if value is not None:
            response.headers[METRICS_HEADER] = value
    return response
