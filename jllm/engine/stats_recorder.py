"""Statistics gathered inside `LLMEngine.step`, for the offline `LLM` with
disable_log_stats=False (the server's AsyncLLMEngine reads its own off the DELTA outputs it
streams). An engine holds a recorder only when asked, so without one statistics cost nothing."""

from __future__ import annotations

import time

from jllm.core.scheduler import Scheduler
from jllm.engine.request import Request
from jllm.engine.stats import IterationStats, RequestStatsTracker, StatLogger, record_stats
from jllm.outputs import PoolingRequestOutput, RequestOutput


class EngineStatsRecorder:
    def __init__(self, scheduler: Scheduler, stat_loggers: list[StatLogger], engine_index: int = 0) -> None:
        self.scheduler = scheduler
        self.stat_loggers = stat_loggers
        self.engine_index = engine_index
        self._tracker = RequestStatsTracker()

    def record_step(self, sampled: list[Request], outputs: list[RequestOutput], now: float) -> None:
        """`sampled`: the sample Requests that got a token this step; `outputs`: the step's."""
        self._record(self._tracker.record_sampled(sampled, outputs, now))

    def record_pooled(self, pooled: list[tuple[Request, PoolingRequestOutput]], now: float) -> None:
        """A step's finished pooling requests: their prompt tokens, time to first output and success."""
        for request, _ in pooled:
            self._tracker.add(request.request_id, request.arrival_time)
        self._record(self._tracker.record_outputs([output for _, output in pooled], now))

    def record_abort(self, request_id: str) -> None:
        finished = self._tracker.record_abort(request_id, time.time())
        if finished is not None:
            self._record(IterationStats(finished_requests=[finished]))

    def _record(self, iteration: IterationStats) -> None:
        record_stats(self.stat_loggers, self.scheduler, iteration, self.engine_index)
