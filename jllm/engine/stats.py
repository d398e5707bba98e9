"""Engine statistics per step, as vLLM V1 gathers them for its stat loggers.

`SchedulerStats` is a snapshot of the queues and the KV pool after a step;
`IterationStats` holds what one step produced (tokens, first-token and inter-token
latencies, finished requests). `RequestStatsTracker` turns the stream of DELTA outputs
(the server's), or each step's sampled requests (the offline LLM's, `EngineStatsRecorder`),
into those numbers; stat loggers (the Prometheus one, the periodic log line here) only
read them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from jllm.outputs import PoolingRequestOutput, RequestOutput

if TYPE_CHECKING:
    from jllm.core.scheduler import Scheduler
    from jllm.engine.request import Request

logger = logging.getLogger("jllm")

# vLLM logs its throughput line every 5 s (VLLM_LOG_STATS_INTERVAL).
LOG_STATS_INTERVAL_S = 5.0


@dataclass
class SchedulerStats:
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    # Fraction of KV pages held by requests.
    kv_cache_usage: float = 0.0
    # Cumulative since the engine started; loggers turn them into counter increments.
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


def scheduler_stats(scheduler: Scheduler) -> SchedulerStats:
    """The scheduler's queues and KV pool now."""
    running, waiting = scheduler.get_request_counts()
    prefix = scheduler.block_manager.prefix_cache_stats
    return SchedulerStats(
        num_running_reqs=running,
        num_waiting_reqs=waiting,
        kv_cache_usage=scheduler.block_manager.usage,
        num_preemptions=scheduler.num_preemptions,
        prefix_cache_queries=prefix.queries,
        prefix_cache_hits=prefix.hits,
    )


def record_stats(stat_loggers, scheduler: Scheduler, iteration: IterationStats, engine_idx: int = 0) -> None:
    """Feeds every stat logger engine `engine_idx`'s scheduler state now and `iteration`; a
    logger that raises is logged and skipped: statistics never stop the engine."""
    if not stat_loggers:
        return
    stats = scheduler_stats(scheduler)
    for stat_logger in tuple(stat_loggers):
        try:
            stat_logger.record(stats, iteration, engine_idx)
        except Exception:  # noqa: BLE001 - statistics must never stop the engine
            logger.exception("Stat logger %r failed.", stat_logger)


@dataclass
class FinishedRequestStats:
    finish_reason: str
    e2e_latency: float
    num_prompt_tokens: int
    num_generation_tokens: int
    # Arrival to first schedule, and first schedule to the last token (None if never
    # scheduled).
    queue_time: float | None
    inference_time: float | None
    # First schedule to first token, and first token to last token (None without a token).
    prefill_time: float | None = None
    decode_time: float | None = None
    # The decode time per token after the first; 0 with fewer than two (vLLM's rule).
    mean_time_per_output_token: float = 0.0
    # The request's n and max_tokens parameters, and its longest sample's token count.
    n: int = 1
    max_tokens: int | None = None
    max_num_generation_tokens: int = 0


@dataclass
class IterationStats:
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    # Whether the step produced any output (vLLM observes iteration tokens only then).
    has_outputs: bool = False
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    finished_requests: list[FinishedRequestStats] = field(default_factory=list)


@dataclass
class _RequestTimes:
    arrival_time: float
    n: int = 1
    max_tokens: int | None = None
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    # Tokens per sample index, for the longest sample.
    sample_tokens: dict[int, int] = field(default_factory=dict)
    first_token_time: float | None = None
    last_token_time: float | None = None


class RequestStatsTracker:
    """Per-request bookkeeping between steps; lives on the engine thread only."""

    def __init__(self) -> None:
        self._requests: dict[str, _RequestTimes] = {}

    def add(self, request_id: str, arrival_time: float, n: int = 1, max_tokens: int | None = None) -> None:
        self._requests[request_id] = _RequestTimes(arrival_time, n, max_tokens)

    def record_outputs(self, outputs: list[RequestOutput | PoolingRequestOutput], now: float) -> IterationStats:
        """`outputs` are DELTA outputs: each completion carries only its new tokens."""
        stats = IterationStats(has_outputs=bool(outputs))
        for output in outputs:
            times = self._requests.get(output.request_id)
            if times is None:
                continue
            if isinstance(output, PoolingRequestOutput):
                self._record_pooled(output, times, now, stats)
                continue
            new_tokens = 0
            for completion in output.outputs:
                new_tokens += len(completion.token_ids)
                times.sample_tokens[completion.index] = times.sample_tokens.get(completion.index, 0) + len(
                    completion.token_ids
                )
            if new_tokens:
                if times.last_token_time is None:
                    times.num_prompt_tokens = len(output.prompt_token_ids or ())
                    times.first_token_time = now
                    stats.num_prompt_tokens += times.num_prompt_tokens
                    stats.time_to_first_tokens.append(now - times.arrival_time)
                else:
                    stats.inter_token_latencies.append(now - times.last_token_time)
                times.last_token_time = now
                times.num_generation_tokens += new_tokens
                stats.num_generation_tokens += new_tokens
            if output.finished:
                reason = next((c.finish_reason for c in output.outputs if c.finish_reason), "stop")
                stats.finished_requests.append(self._finish(output.request_id, reason, now, output))
        return stats

    def _record_pooled(
        self, output: PoolingRequestOutput, times: _RequestTimes, now: float, stats: IterationStats
    ) -> None:
        """A pooling request ends in the step that reads its prompt; vLLM counts its prompt
        tokens and a time to first token then, and no generation tokens."""
        times.num_prompt_tokens = len(output.prompt_token_ids or ())
        times.first_token_time = times.last_token_time = now
        stats.num_prompt_tokens += times.num_prompt_tokens
        stats.time_to_first_tokens.append(now - times.arrival_time)
        reason = "error" if output.error is not None else "stop"
        stats.finished_requests.append(self._finish(output.request_id, reason, now, output))

    def record_sampled(self, sampled: list[Request], outputs: list[RequestOutput], now: float) -> IterationStats:
        """The same numbers from inside `LLMEngine.step`, whatever kind of outputs its requests
        asked for (the offline LLM's are FINAL_ONLY): `sampled` are the sample Requests that got
        a token this step, one each; of `outputs` only the finished ones are read. Requests need
        no `add`: each is known from its first token."""
        stats = IterationStats(num_generation_tokens=len(sampled), has_outputs=bool(sampled or outputs))
        for request in sampled:
            times = self._requests.get(request.parent_id)
            if times is None:
                params = request.sampling_params
                times = self._requests[request.parent_id] = _RequestTimes(
                    request.arrival_time, params.n, params.max_tokens
                )
            if times.last_token_time is None:
                times.num_prompt_tokens = request.num_prompt_tokens
                times.first_token_time = now
                stats.num_prompt_tokens += times.num_prompt_tokens
                stats.time_to_first_tokens.append(now - times.arrival_time)
            elif times.last_token_time != now:  # a sibling sample stepped at `now`: one latency per request
                stats.inter_token_latencies.append(now - times.last_token_time)
            times.last_token_time = now
            times.num_generation_tokens += 1
            times.sample_tokens[request.index] = request.num_output_tokens
        for output in outputs:
            if output.finished:
                if output.request_id not in self._requests:  # ended before its first token
                    self.add(output.request_id, output.metrics.arrival_time or now, len(output.outputs))
                reason = next((c.finish_reason for c in output.outputs if c.finish_reason), "stop")
                stats.finished_requests.append(self._finish(output.request_id, reason, now, output))
        return stats

    def record_abort(self, request_id: str, now: float) -> FinishedRequestStats | None:
        if request_id not in self._requests:
            return None
        return self._finish(request_id, "abort", now, None)

    def _finish(
        self, request_id: str, reason: str, now: float, output: RequestOutput | PoolingRequestOutput | None
    ) -> FinishedRequestStats:
        times = self._requests.pop(request_id)
        # A PoolingRequestOutput has no metrics (nor has vLLM's).
        metrics = output.metrics if isinstance(output, RequestOutput) else None
        scheduled = metrics.first_scheduled_time if metrics is not None else None
        first, last = times.first_token_time, times.last_token_time
        decode_time = last - first if first is not None else None
        num_tokens = times.num_generation_tokens
        return FinishedRequestStats(
            finish_reason=reason,
            e2e_latency=now - times.arrival_time,
            num_prompt_tokens=times.num_prompt_tokens,
            num_generation_tokens=num_tokens,
            queue_time=scheduled - times.arrival_time if scheduled is not None else None,
            inference_time=(last if last is not None else now) - scheduled if scheduled is not None else None,
            prefill_time=first - scheduled if first is not None and scheduled is not None else None,
            decode_time=decode_time,
            mean_time_per_output_token=decode_time / (num_tokens - 1) if num_tokens > 1 else 0.0,
            n=times.n,
            max_tokens=times.max_tokens,
            max_num_generation_tokens=max(times.sample_tokens.values(), default=0),
        )


class StatLogger(Protocol):
    """Called after every step (and after aborts) of engine `engine_idx` (vLLM's engine
    index, the data-parallel rank): on the engine thread, or with data parallelism on
    that replica's own thread, so a logger keeps each engine's state apart."""

    def record(self, scheduler_stats: SchedulerStats, iteration_stats: IterationStats, engine_idx: int = 0) -> None: ...


@dataclass
class _LogWindow:
    """One engine's counts since its last log line."""

    start: float
    prompt_tokens: int = 0
    generation_tokens: int = 0
    last_scheduler_stats: SchedulerStats = field(default_factory=SchedulerStats)


class LoggingStatLogger:
    """vLLM's periodic throughput line per engine: "Engine 000: Avg prompt throughput: ..."."""

    def __init__(self, interval_s: float = LOG_STATS_INTERVAL_S) -> None:
        self.interval_s = interval_s
        # Each engine's first window opens here, as vLLM's does.
        self._start = time.monotonic()
        self._windows: dict[int, _LogWindow] = {}

    def record(self, scheduler_stats: SchedulerStats, iteration_stats: IterationStats, engine_idx: int = 0) -> None:
        now = time.monotonic()
        window = self._windows.get(engine_idx)
        if window is None:
            window = self._windows[engine_idx] = _LogWindow(self._start)
        window.prompt_tokens += iteration_stats.num_prompt_tokens
        window.generation_tokens += iteration_stats.num_generation_tokens
        elapsed = now - window.start
        if elapsed < self.interval_s:
            return
        previous = window.last_scheduler_stats
        queries = scheduler_stats.prefix_cache_queries - previous.prefix_cache_queries
        hits = scheduler_stats.prefix_cache_hits - previous.prefix_cache_hits
        logger.info(
            "Engine %03d: Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
            "Running: %d reqs, Waiting: %d reqs, GPU KV cache usage: %.1f%%, Prefix cache hit rate: %.1f%%",
            engine_idx,
            window.prompt_tokens / elapsed,
            window.generation_tokens / elapsed,
            scheduler_stats.num_running_reqs,
            scheduler_stats.num_waiting_reqs,
            100 * scheduler_stats.kv_cache_usage,
            100 * hits / queries if queries else 0.0,
        )
        self._windows[engine_idx] = _LogWindow(now, last_scheduler_stats=scheduler_stats)
