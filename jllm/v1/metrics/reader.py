"""Prometheus metrics read back as plain values, vLLM's `vllm.v1.metrics.reader`: what
`LLM.get_metrics()` returns.

vLLM reads the process-wide Prometheus registry; jllm keeps none, so the snapshot reads the
registry it is given (each LLM's own, see `LLM.get_metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.samples import Sample


@dataclass
class Metric:
    """One series: a vLLM metric name and its labels (model_name, engine, ...); one name may
    have several series that differ in their labels."""

    name: str
    labels: dict[str, str]


@dataclass
class Counter(Metric):
    value: int


@dataclass
class Vector(Metric):
    """Counters labelled by "position", as one list indexed by it (vLLM's form of
    vllm:spec_decode_num_accepted_tokens_per_pos; Prometheus has no such type)."""

    values: list[int]


@dataclass
class Gauge(Metric):
    value: float


@dataclass
class Histogram(Metric):
    """`buckets`: each upper bound as Prometheus writes it ("0.5", "+Inf") -> the number of
    observations up to it (cumulative); `count` is that of "+Inf"."""

    count: int
    sum: float
    buckets: dict[str, int]


def get_metrics_snapshot(registry: CollectorRegistry) -> list[Metric]:
    """The vllm:* counters, gauges and histograms of `registry`, one entry per series.
    Other collector types (summary, info, ...) have no form here and are left out, as vLLM does."""
    metrics: list[Metric] = []
    for family in registry.collect():
        if not family.name.startswith("vllm:"):
            continue
        if family.type == "gauge":
            metrics.extend(Gauge(family.name, s.labels, s.value) for s in family.samples)
        elif family.type == "counter":
            totals = [s for s in family.samples if s.name == family.name + "_total"]
            if any("position" in s.labels for s in totals):
                metrics.extend(_vectors(family.name, totals))
            else:
                metrics.extend(Counter(family.name, s.labels, int(s.value)) for s in totals)
        elif family.type == "histogram":
            metrics.extend(_histograms(family.name, family.samples))
    return metrics


def _without(labels: dict[str, str], key: str) -> dict[str, str]:
    return {k: v for k, v in labels.items() if k != key}


def _histograms(name: str, samples: list[Sample]) -> list[Histogram]:
    """A histogram family's _bucket/_count/_sum samples, gathered per series (its labels
    but "le")."""
    by_series: dict[frozenset, Histogram] = {}
    for sample in samples:
        labels = _without(sample.labels, "le")
        key = frozenset(labels.items())
        histogram = by_series.get(key)
        if histogram is None:
            histogram = by_series[key] = Histogram(name, labels, 0, 0.0, {})
        suffix = sample.name[len(name) :]
        if suffix == "_bucket":
            histogram.buckets[sample.labels["le"]] = int(sample.value)
        elif suffix == "_count":
            histogram.count = int(sample.value)
        elif suffix == "_sum":
            histogram.sum = sample.value
    return list(by_series.values())


def _vectors(name: str, samples: list[Sample]) -> list[Vector]:
    """Counters per position, one list per series (their labels but "position"); positions
    never counted read 0."""
    by_series: dict[frozenset, tuple[dict[str, str], dict[int, int]]] = {}
    for sample in samples:
        labels = _without(sample.labels, "position")
        _, values = by_series.setdefault(frozenset(labels.items()), (labels, {}))
        values[int(sample.labels["position"])] = int(sample.value)
    vectors = []
    for labels, values in by_series.values():
        dense = [0] * (max(values) + 1)
        for position, value in values.items():
            dense[position] = value
        vectors.append(Vector(name, labels, dense))
    return vectors
