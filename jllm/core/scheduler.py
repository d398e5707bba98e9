"""Chooses, each step, which requests run and how many of their tokens (vLLM V1's Scheduler).

Prefill and decode are one thing: a request has `num_tokens` known tokens of which
`num_computed_tokens` are in the KV cache, and wants the rest computed. A step has a
budget of `max_num_batched_tokens` tokens and `max_num_seqs` sequences, spent first on
running requests (a decode costs one token), then on waiting ones in arrival order,
splitting a prompt that does not fit (chunked prefill). When pages run out the most
recently admitted request is preempted and later recomputed from scratch.

Each step's decision goes to the worker as one `SchedulerOutput`: a request's prompt,
settings and pages once, then only its new pages and progress.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping

from jllm.config import CacheConfig, SchedulerConfig
from jllm.core.block_manager import BlockManager, cdiv
from jllm.core.scheduler_output import NewRequestData, SchedulerOutput
from jllm.engine.request import Request, RequestStatus

logger = logging.getLogger(__name__)

# Preemption is logged as a warning once per this many; the rest at debug level.
PREEMPTION_WARNING_INTERVAL = 50


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig):
        self.scheduler_config = scheduler_config
        self.cache_config = cache_config
        num_blocks = cache_config.num_gpu_blocks
        if num_blocks is None:
            raise ValueError("cache_config.num_gpu_blocks must be set before the scheduler is built.")
        # A request of max_model_len tokens that cannot fit alone would preempt itself forever.
        blocks_per_seq = cdiv(scheduler_config.max_model_len, cache_config.block_size)
        if blocks_per_seq > num_blocks:
            raise ValueError(
                f"To serve at least one request with the model's max seq len "
                f"({scheduler_config.max_model_len}), {blocks_per_seq} KV cache blocks are "
                f"needed, which is more than the available {num_blocks} blocks. Try "
                "increasing `gpu_memory_utilization` or decreasing `max_model_len`."
            )
        self.block_manager = BlockManager(
            cache_config.block_size,
            num_blocks,
            cache_config.enable_prefix_caching,
            cache_config.prefix_caching_hash_algo,
        )
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.finished_req_ids: set[str] = set()
        self.num_preemptions = 0

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"Request id {request.request_id} already running.")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def get_request_counts(self) -> tuple[int, int]:
        """(running, waiting), for metrics."""
        return len(self.running), len(self.waiting)

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput(finished_req_ids=self.finished_req_ids)
        self.finished_req_ids = set()
        token_budget = self.scheduler_config.max_num_batched_tokens

        req_index = 0
        while req_index < len(self.running) and token_budget > 0:
            request = self.running[req_index]
            num_new_tokens = min(request.num_tokens - request.num_computed_tokens, token_budget)
            if num_new_tokens == 0:
                # Its sampled token has not come back yet (schedule called twice).
                req_index += 1
                continue
            num_known_blocks = len(request.block_ids)  # what the worker has
            if not self._allocate_or_preempt(request, num_new_tokens, output):
                break  # It preempted itself: everything after it is gone too.
            self._add_cached(output, request, num_new_tokens, request.block_ids[num_known_blocks:], False)
            token_budget -= num_new_tokens
            req_index += 1

        # Admitting new work right after evicting some would only thrash the cache.
        if not output.preempted_req_ids:
            self._schedule_waiting(output, token_budget)

        # Advanced now, as vLLM does: the tokens are in the cache once the step runs.
        requests = self.requests
        for request_id, num_tokens in output.num_scheduled_tokens.items():
            requests[request_id].num_computed_tokens += num_tokens
        return output

    def _allocate_or_preempt(self, request: Request, num_new_tokens: int, output: SchedulerOutput) -> bool:
        """Preempt running requests from the back until `request` gets its pages;
        False if it had to preempt itself."""
        while not self.block_manager.allocate_slots(request, num_new_tokens):
            preempted = self.running.pop()
            self._preempt(preempted)
            output.preempted_req_ids.add(preempted.request_id)
            if preempted is request:
                return False
        return True

    def _schedule_waiting(self, output: SchedulerOutput, token_budget: int) -> None:
        config = self.scheduler_config
        while self.waiting and token_budget > 0 and len(self.running) < config.max_num_seqs:
            request = self.waiting[0]
            computed_blocks, num_computed_tokens = self.block_manager.get_computed_blocks(request)
            num_new_tokens = request.num_tokens - num_computed_tokens
            if num_new_tokens > token_budget:
                if not config.enable_chunked_prefill:
                    break  # FCFS: nobody overtakes the head of the queue.
                num_new_tokens = token_budget
            if not self.block_manager.allocate_slots(request, num_new_tokens, computed_blocks):
                break
            self.waiting.popleft()
            self.running.append(request)
            resumed = request.status == RequestStatus.PREEMPTED
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_computed_tokens
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.time()
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_computed_tokens
            if resumed:
                self._add_cached(output, request, num_new_tokens, list(request.block_ids), True)
            else:
                output.scheduled_new_reqs.append(
                    NewRequestData(
                        request.request_id,
                        request.prompt_token_ids,
                        request.sampling_settings,
                        list(request.block_ids),
                        num_computed_tokens,
                        request.pooling_task,
                        request.token_type_ids,
                    )
                )
                self._count(output, request, num_new_tokens)
            token_budget -= num_new_tokens

    def _add_cached(
        self, output: SchedulerOutput, request: Request, num_new_tokens: int, new_block_ids: list[int], resumed: bool
    ) -> None:
        """A request the worker knows: only its new pages (all of them if resumed) and
        progress. Lists are copies: an abort during the step must not change them."""
        cached = output.scheduled_cached_reqs
        cached.req_ids.append(request.request_id)
        cached.resumed_from_preemption.append(resumed)
        cached.new_block_ids.append(new_block_ids)
        cached.num_computed_tokens.append(request.num_computed_tokens)
        self._count(output, request, num_new_tokens)

    @staticmethod
    def _count(output: SchedulerOutput, request: Request, num_new_tokens: int) -> None:
        output.num_scheduled_tokens[request.request_id] = num_new_tokens
        output.total_num_scheduled_tokens += num_new_tokens

    def _preempt(self, request: Request) -> None:
        """Recompute preemption: drop the request's pages; it restarts from waiting."""
        log = logger.warning if self.num_preemptions % PREEMPTION_WARNING_INTERVAL == 0 else logger.debug
        log(
            "Sequence group %s is preempted by PreemptionMode.RECOMPUTE mode because there "
            "is not enough KV cache space. This can affect the end-to-end performance. "
            "Increase gpu_memory_utilization or tensor_parallel_size to provide more KV "
            "cache memory. total_num_cumulative_preemption=%d",
            request.request_id,
            self.num_preemptions + 1,
        )
        self.num_preemptions += 1
        self.block_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        # At the front: it arrived before everything still waiting.
        self.waiting.appendleft(request)

    def update_from_output(
        self, scheduler_output: SchedulerOutput, sampled_token_ids: Mapping[str, int]
    ) -> list[Request]:
        """Append each sampling request's new token and cache its newly full pages.

        Returns the requests that got a token, for the engine's stop checks; it ends
        them with `finish_requests`.
        """
        updated = []
        requests = self.requests
        for request_id in scheduler_output.num_scheduled_tokens:
            request = requests.get(request_id)
            if request is None:
                continue  # Ended while the step ran; its pages are gone.
            token = sampled_token_ids.get(request_id)
            if token is not None:
                request.append_output_token_id(token)
                updated.append(request)
            self.block_manager.cache_full_blocks(request)
        return updated

    def finish_requests(self, request_ids: str | Iterable[str], finished_status: RequestStatus) -> None:
        """End requests with a terminal status and free their pages; unknown or
        already finished ids are ignored (an abort may race a normal finish)."""
        if not finished_status.is_finished:
            raise ValueError(f"{finished_status!r} is not a finished status.")
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        finished = set()
        for request_id in request_ids:
            request = self.requests.pop(request_id, None)
            if request is None:
                continue
            request.status = finished_status
            self.block_manager.free(request)
            finished.add(request_id)
        if finished:
            self.running = [r for r in self.running if r.request_id not in finished]
            self.waiting = deque(r for r in self.waiting if r.request_id not in finished)
            self.finished_req_ids |= finished

    def abort_requests(self, request_ids: str | Iterable[str]) -> None:
        self.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def reset_prefix_cache(self) -> bool:
        return self.block_manager.reset_prefix_cache()
