"""Prometheus metrics under vLLM's names (V1's PrometheusStatLogger), so dashboards and
alerts written for vLLM read jllm unchanged. Every server has its own CollectorRegistry."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from jllm.config import CacheConfig
from jllm.engine.stats import IterationStats, SchedulerStats

# vLLM's bucket boundaries (seconds).
TTFT_BUCKETS = [
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
]
ITL_BUCKETS = [
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
]
REQUEST_LATENCY_BUCKETS = [
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
]
ITERATION_TOKENS_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
REQUEST_PARAMS_N_BUCKETS = [1, 2, 5, 10, 20]
# vLLM's FinishReason strings; every series exists (at 0) from the start.
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's token-count buckets)."""
    buckets, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return buckets
            buckets.append(value)
        exponent += 1


class PrometheusStatLogger:
    def __init__(
        self,
        registry: CollectorRegistry,
        model_name: str,
        max_model_len: int,
        cache_config: CacheConfig | None = None,
        engine_indexes: Sequence[int] = (0,),
    ):
        """Every metric has one series per engine index (the `engine` label: with data
        parallelism each replica's rank, as vLLM labels them); `record` feeds one engine's."""
        # vLLM's /metrics has no `_created` series; prometheus_client's switch for
        # that is process-wide, and no jllm metric wants them.
        prometheus_client.disable_created_metrics()
        names = ["model_name", "engine"]

        def per_engine(family):
            return {i: family.labels(model_name=model_name, engine=str(i)) for i in engine_indexes}

        def gauge(name: str, doc: str) -> dict[int, Gauge]:
            return per_engine(Gauge(name, doc, names, registry=registry))

        def counter(name: str, doc: str) -> dict[int, Counter]:
            return per_engine(Counter(name, doc, names, registry=registry))

        def histogram(name: str, doc: str, buckets) -> dict[int, Histogram]:
            return per_engine(Histogram(name, doc, names, buckets=buckets, registry=registry))

        self.num_requests_running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.num_requests_waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_cache_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.num_preemptions = counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self.prefix_cache_queries = counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."
        )
        self.prefix_cache_hits = counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        )
        success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            names + ["finished_reason"],
            registry=registry,
        )
        self.request_success = {
            i: {
                reason: success.labels(model_name=model_name, engine=str(i), finished_reason=reason)
                for reason in FINISH_REASONS
            }
            for i in engine_indexes
        }
        self.time_to_first_token = histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self.inter_token_latency = histogram(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS
        )
        # The same observations under the name vLLM used before 0.11, which its metrics
        # test and older dashboards still read.
        self.time_per_output_token = histogram(
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds.DEPRECATED: Use vllm:inter_token_latency_seconds instead.",
            ITL_BUCKETS,
        )
        self.request_time_per_output_token = histogram(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            ITL_BUCKETS,
        )
        self.iteration_tokens = histogram(
            "vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.", ITERATION_TOKENS_BUCKETS
        )
        self.e2e_request_latency = histogram(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", REQUEST_LATENCY_BUCKETS
        )
        self.request_queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_inference_time = histogram(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_prefill_time = histogram(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_decode_time = histogram(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        token_buckets = build_1_2_5_buckets(max_model_len)
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", token_buckets
        )
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", token_buckets
        )
        self.request_max_num_generation_tokens = histogram(
            "vllm:request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.",
            token_buckets,
        )
        self.request_params_n = histogram(
            "vllm:request_params_n", "Histogram of the n request parameter.", REQUEST_PARAMS_N_BUCKETS
        )
        self.request_params_max_tokens = histogram(
            "vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", token_buckets
        )
        if cache_config is not None:
            # Info emulated by a gauge of 1, every CacheConfig field a label (vLLM's).
            info = {name: str(value) for name, value in dataclasses.asdict(cache_config).items()}
            cache_info = Gauge(
                "vllm:cache_config_info",
                "Information of the LLMEngine CacheConfig",
                [*info, "engine"],
                registry=registry,
            )
            for i in engine_indexes:
                cache_info.labels(**info, engine=str(i)).set(1)
        # The scheduler's counts are cumulative; counters advance by the difference.
        self._last = {i: SchedulerStats() for i in engine_indexes}

    def record(self, scheduler_stats: SchedulerStats, iteration_stats: IterationStats, engine_idx: int = 0) -> None:
        e = engine_idx
        self.num_requests_running[e].set(scheduler_stats.num_running_reqs)
        self.num_requests_waiting[e].set(scheduler_stats.num_waiting_reqs)
        self.kv_cache_usage[e].set(scheduler_stats.kv_cache_usage)
        last = self._last[e]
        self.num_preemptions[e].inc(max(0, scheduler_stats.num_preemptions - last.num_preemptions))
        self.prefix_cache_queries[e].inc(max(0, scheduler_stats.prefix_cache_queries - last.prefix_cache_queries))
        self.prefix_cache_hits[e].inc(max(0, scheduler_stats.prefix_cache_hits - last.prefix_cache_hits))
        self._last[e] = scheduler_stats

        self.prompt_tokens[e].inc(iteration_stats.num_prompt_tokens)
        self.generation_tokens[e].inc(iteration_stats.num_generation_tokens)
        for ttft in iteration_stats.time_to_first_tokens:
            self.time_to_first_token[e].observe(ttft)
        if iteration_stats.has_outputs:
            self.iteration_tokens[e].observe(iteration_stats.num_prompt_tokens + iteration_stats.num_generation_tokens)
        for itl in iteration_stats.inter_token_latencies:
            self.inter_token_latency[e].observe(itl)
            self.time_per_output_token[e].observe(itl)
        for finished in iteration_stats.finished_requests:
            if finished.finish_reason in self.request_success[e]:
                self.request_success[e][finished.finish_reason].inc()
            self.e2e_request_latency[e].observe(finished.e2e_latency)
            if finished.queue_time is not None:
                self.request_queue_time[e].observe(finished.queue_time)
            if finished.inference_time is not None:
                self.request_inference_time[e].observe(finished.inference_time)
            if finished.prefill_time is not None:
                self.request_prefill_time[e].observe(finished.prefill_time)
            if finished.decode_time is not None:
                self.request_decode_time[e].observe(finished.decode_time)
            self.request_time_per_output_token[e].observe(finished.mean_time_per_output_token)
            self.request_prompt_tokens[e].observe(finished.num_prompt_tokens)
            self.request_generation_tokens[e].observe(finished.num_generation_tokens)
            self.request_max_num_generation_tokens[e].observe(finished.max_num_generation_tokens)
            self.request_params_n[e].observe(finished.n)
            if finished.max_tokens:
                self.request_params_max_tokens[e].observe(finished.max_tokens)
