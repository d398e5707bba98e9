"""Scheduler: token-budget scheduling, chunked prefill, preemption, aborts, and a
randomized simulation against a fake model that checks the page bookkeeping. The
fake worker knows only what the scheduler's messages tell it (a request's prompt and
pages once, then deltas), so the simulation checks the message protocol too."""

import random
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from jllm.config import CacheConfig, SchedulerConfig
from jllm.core.block_manager import cdiv
from jllm.core.scheduler import Scheduler
from jllm.engine.request import Request, RequestStatus

BLOCK_SIZE = 4


def make_scheduler(
    *,
    max_num_batched_tokens=64,
    max_num_seqs=8,
    max_model_len=64,
    num_gpu_blocks=64,
    enable_chunked_prefill=True,
    enable_prefix_caching=True,
):
    return Scheduler(
        SchedulerConfig(max_num_batched_tokens, max_num_seqs, max_model_len, enable_chunked_prefill),
        CacheConfig(block_size=BLOCK_SIZE, num_gpu_blocks=num_gpu_blocks, enable_prefix_caching=enable_prefix_caching),
    )


def make_request(request_id, prompt, *, max_tokens=16, cache_salt=None, prompt_logprobs=None):
    params = SimpleNamespace(prompt_logprobs=prompt_logprobs, max_tokens=max_tokens)
    return Request(request_id, list(prompt), params, cache_salt=cache_salt)


@dataclass
class Row:
    """A scheduled request as the worker sees it, beside the scheduler's request (for checks)."""

    request: Request
    num_scheduled_tokens: int
    num_computed_tokens: int
    block_ids: list
    sample: bool
    is_new: bool
    resumed_from_preemption: bool

    @property
    def token_ids(self):
        return self.request.all_token_ids[
            self.num_computed_tokens : self.num_computed_tokens + self.num_scheduled_tokens
        ]


@dataclass
class WorkerView:
    """Each request's pages and token count as a worker rebuilds them from the messages."""

    block_ids: dict = field(default_factory=dict)
    num_tokens: dict = field(default_factory=dict)

    def apply(self, scheduler, output) -> list[Row]:
        for req_id in output.finished_req_ids:
            self.block_ids.pop(req_id, None)
            self.num_tokens.pop(req_id, None)
        for req_id in output.preempted_req_ids:
            self.block_ids[req_id] = []
        rows = []
        for new in output.scheduled_new_reqs:
            assert new.req_id not in self.block_ids, "a known request sent as new"
            self.block_ids[new.req_id] = list(new.block_ids)
            self.num_tokens[new.req_id] = len(new.prompt_token_ids)
            rows.append((new.req_id, new.num_computed_tokens, True, False))
        cached = output.scheduled_cached_reqs
        for req_id, resumed, new_block_ids, computed in zip(
            cached.req_ids, cached.resumed_from_preemption, cached.new_block_ids, cached.num_computed_tokens
        ):
            assert req_id in self.block_ids, "a delta for a request never sent"
            if resumed:
                assert self.block_ids[req_id] == [], "resumed without being preempted"
            self.block_ids[req_id] += new_block_ids
            rows.append((req_id, computed, False, resumed))
        out = []
        for req_id, computed, is_new, resumed in rows:
            n = output.num_scheduled_tokens[req_id]
            out.append(
                Row(
                    scheduler.requests[req_id],
                    n,
                    computed,
                    list(self.block_ids[req_id]),
                    computed + n == self.num_tokens[req_id],
                    is_new,
                    resumed,
                )
            )
        return out


@dataclass
class Step:
    """A step's SchedulerOutput and its rows as the worker sees them."""

    output: object
    scheduled_requests: list[Row]

    def __getattr__(self, name):
        return getattr(self.output, name)


def schedule(scheduler) -> Step:
    view = scheduler.__dict__.setdefault("test_worker_view", WorkerView())
    output = scheduler.schedule()
    return Step(output, view.apply(scheduler, output))


def step(scheduler, token=0):
    """One engine step with a fake model that samples `token` wherever asked."""
    scheduled = schedule(scheduler)
    sampled = {s.request.request_id: token for s in scheduled.scheduled_requests if s.sample}
    record(scheduler, sampled)
    scheduler.update_from_output(scheduled.output, sampled)
    return scheduled


def record(scheduler, sampled):
    view = scheduler.test_worker_view
    for req_id in sampled:
        view.num_tokens[req_id] += 1


def scheduled_tokens(output):
    return {s.request.request_id: s.num_scheduled_tokens for s in output.scheduled_requests}


def test_prompt_that_fits_is_prefilled_in_one_step_and_sampled():
    scheduler = make_scheduler()
    request = make_request("a", range(10))
    scheduler.add_request(request)
    output = schedule(scheduler)
    [scheduled] = output.scheduled_requests
    assert (scheduled.num_computed_tokens, scheduled.num_scheduled_tokens) == (0, 10)
    assert scheduled.sample and scheduled.is_new and not scheduled.resumed_from_preemption
    assert scheduled.token_ids == list(range(10))
    assert scheduled.block_ids == request.block_ids and len(request.block_ids) == 3
    assert output.total_num_scheduled_tokens == 10 == output.num_scheduled_tokens["a"]
    assert request.status == RequestStatus.RUNNING
    assert request.first_scheduled_time is not None and request.num_cached_tokens == 0


def test_decode_schedules_one_token_and_samples_it():
    scheduler = make_scheduler()
    request = make_request("a", range(10))
    scheduler.add_request(request)
    step(scheduler, token=42)
    output = step(scheduler, token=43)
    [scheduled] = output.scheduled_requests
    assert (scheduled.num_computed_tokens, scheduled.num_scheduled_tokens) == (10, 1)
    assert scheduled.token_ids == [42] and scheduled.sample and not scheduled.is_new
    assert request.output_token_ids == [42, 43]


def test_chunked_prefill_splits_a_prompt_under_the_token_budget():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    request = make_request("a", range(20))
    scheduler.add_request(request)
    chunks = []
    for _ in range(3):
        [scheduled] = step(scheduler).scheduled_requests
        chunks.append((scheduled.num_computed_tokens, scheduled.num_scheduled_tokens, scheduled.sample))
    assert chunks == [(0, 8, False), (8, 8, False), (16, 4, True)]
    assert request.output_token_ids == [0]


def test_decodes_are_scheduled_before_waiting_prefills():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    scheduler.add_request(make_request("a", range(4)))
    step(scheduler)
    scheduler.add_request(make_request("b", range(100, 120)))
    assert scheduled_tokens(step(scheduler)) == {"a": 1, "b": 7}


def test_max_num_seqs_caps_the_running_requests():
    scheduler = make_scheduler(max_num_seqs=2)
    for i in range(3):
        scheduler.add_request(make_request(str(i), range(10 * i, 10 * i + 5)))
    assert scheduled_tokens(step(scheduler)) == {"0": 5, "1": 5}
    assert scheduled_tokens(step(scheduler)) == {"0": 1, "1": 1}
    scheduler.finish_requests("0", RequestStatus.FINISHED_STOPPED)
    assert scheduled_tokens(step(scheduler)) == {"1": 1, "2": 5}


def test_never_schedules_more_tokens_than_a_request_needs():
    scheduler = make_scheduler(max_num_batched_tokens=64)
    scheduler.add_request(make_request("a", range(5)))
    assert step(scheduler).total_num_scheduled_tokens == 5


def test_without_chunking_a_prompt_waits_for_a_step_it_fits_in_whole():
    scheduler = make_scheduler(max_num_batched_tokens=16, max_model_len=16, enable_chunked_prefill=False)
    for i, request_id in enumerate("abc"):
        scheduler.add_request(make_request(request_id, range(10 * i, 10 * i + 10)))
    # b does not fit the 6 tokens left, and c may not overtake it.
    assert scheduled_tokens(step(scheduler)) == {"a": 10}
    assert scheduled_tokens(step(scheduler)) == {"a": 1, "b": 10}


def test_config_rejects_a_budget_below_max_model_len_without_chunking():
    with pytest.raises(ValueError, match="smaller than max_model_len"):
        SchedulerConfig(max_num_batched_tokens=8, max_num_seqs=4, max_model_len=16, enable_chunked_prefill=False)


def test_scheduler_rejects_a_pool_too_small_for_one_max_len_request():
    with pytest.raises(ValueError, match="max seq len"):
        make_scheduler(max_model_len=64, num_gpu_blocks=15)


def test_prefix_cache_hit_is_skipped_and_recorded_as_cached_tokens():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", range(10)))
    step(scheduler)
    b = make_request("b", list(range(10)) + [7, 7])
    scheduler.add_request(b)
    output = step(scheduler)
    [scheduled] = [s for s in output.scheduled_requests if s.request is b]
    assert (scheduled.num_computed_tokens, scheduled.num_scheduled_tokens) == (8, 4)
    assert b.num_cached_tokens == 8
    assert scheduled.block_ids[:2] == scheduler.requests["a"].block_ids[:2]


def test_prompt_logprobs_request_computes_its_whole_prompt():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", range(10)))
    step(scheduler)
    scheduler.add_request(make_request("b", range(10), prompt_logprobs=0))
    assert scheduled_tokens(step(scheduler))["b"] == 10


def test_running_out_of_pages_preempts_the_last_running_request():
    scheduler = make_scheduler(max_model_len=16, num_gpu_blocks=4, enable_prefix_caching=False)
    a, b = make_request("a", range(7)), make_request("b", range(100, 107))
    scheduler.add_request(a)
    scheduler.add_request(b)
    step(scheduler)  # Both prefilled: 2 pages each, the pool is full.
    c = make_request("c", range(200, 205))
    scheduler.add_request(c)
    step(scheduler)  # Token 8 of a and b still fits their pages; c gets none.
    output = step(scheduler, token=5)  # a needs a third page: b goes.
    assert scheduled_tokens(output) == {"a": 1}
    assert output.preempted_req_ids == {"b"}
    assert b.status == RequestStatus.PREEMPTED
    assert (b.num_computed_tokens, b.block_ids, b.num_preemptions) == (0, [], 1)
    assert b.output_token_ids == [0, 0]
    # Ahead of c, which arrived later.
    assert list(scheduler.waiting) == [b, c] and scheduler.num_preemptions == 1

    scheduler.finish_requests("a", RequestStatus.FINISHED_STOPPED)
    [resumed] = step(scheduler, token=9).scheduled_requests
    # Recomputed from scratch: prompt and the tokens generated before preemption.
    assert resumed.request is b and resumed.resumed_from_preemption and not resumed.is_new
    assert (resumed.num_computed_tokens, resumed.num_scheduled_tokens) == (0, 9)
    assert resumed.token_ids == list(range(100, 107)) + [0, 0] and resumed.sample
    assert b.output_token_ids == [0, 0, 9]


def test_request_preempts_itself_when_it_is_the_last_running():
    scheduler = make_scheduler(max_model_len=16, num_gpu_blocks=4, enable_prefix_caching=False)
    scheduler.add_request(make_request("a", range(6)))
    scheduler.add_request(make_request("b", range(100, 108)))
    step(scheduler)
    # a's next token still fits its 2 pages; b's needs a third and only b can give.
    output = step(scheduler)
    assert scheduled_tokens(output) == {"a": 1}
    assert output.preempted_req_ids == {"b"}
    assert list(scheduler.waiting) == [scheduler.requests["b"]]


def test_preempted_request_is_not_readmitted_in_the_same_step():
    # A budget of 2 leaves room for a one-token chunk of the preempted request,
    # and its freed page would hold it.
    scheduler = make_scheduler(
        max_num_batched_tokens=2, max_num_seqs=2, max_model_len=12, num_gpu_blocks=3, enable_prefix_caching=False
    )
    scheduler.add_request(make_request("a", range(3)))
    scheduler.add_request(make_request("b", range(100, 106)))
    for _ in range(10):
        output = step(scheduler)
        if output.preempted_req_ids:
            break
    assert output.preempted_req_ids == {"b"}
    assert scheduled_tokens(output) == {"a": 1}


def test_waiting_request_without_enough_pages_stays_waiting():
    scheduler = make_scheduler(max_model_len=16, num_gpu_blocks=4, enable_chunked_prefill=False)
    scheduler.add_request(make_request("a", range(12)))
    step(scheduler)
    b = make_request("b", range(100, 108))
    scheduler.add_request(b)
    assert scheduled_tokens(step(scheduler)) == {"a": 1}
    assert b.status == RequestStatus.WAITING and b.block_ids == []
    scheduler.finish_requests("a", RequestStatus.FINISHED_LENGTH_CAPPED)
    assert scheduled_tokens(step(scheduler)) == {"b": 8}


def test_abort_returns_pages_and_reports_the_ids_next_step():
    scheduler = make_scheduler(max_num_seqs=1)
    a, b = make_request("a", range(10)), make_request("b", range(10))
    scheduler.add_request(a)
    scheduler.add_request(b)
    step(scheduler)
    scheduler.abort_requests(["a", "b", "unknown"])
    assert a.status == b.status == RequestStatus.FINISHED_ABORTED
    assert not scheduler.has_unfinished_requests()
    assert scheduler.block_manager.num_free_blocks == 64
    assert scheduler.schedule().finished_req_ids == {"a", "b"}
    scheduler.block_manager.check_no_leaks()


def test_abort_during_a_step_drops_its_sampled_token():
    scheduler = make_scheduler()
    a = make_request("a", range(10))
    scheduler.add_request(a)
    output = scheduler.schedule()
    scheduler.abort_requests("a")
    assert scheduler.update_from_output(output, {"a": 1}) == []
    assert a.output_token_ids == []


def test_update_from_output_appends_tokens_only_where_sampled():
    scheduler = make_scheduler(max_num_batched_tokens=12)
    a, b = make_request("a", range(4)), make_request("b", range(100, 120))
    scheduler.add_request(a)
    scheduler.add_request(b)
    output = scheduler.schedule()
    assert scheduler.update_from_output(output, {"a": 7}) == [a]
    assert (a.output_token_ids, b.output_token_ids) == ([7], [])


def test_finish_requests_rejects_a_non_terminal_status():
    scheduler = make_scheduler()
    with pytest.raises(ValueError):
        scheduler.finish_requests("a", RequestStatus.RUNNING)


def check_invariants(scheduler, output=None):
    """Everything the page bookkeeping promises, checked from the outside."""
    config, bm = scheduler.scheduler_config, scheduler.block_manager
    live = list(scheduler.requests.values())
    assert sorted(map(id, live)) == sorted(map(id, scheduler.running + list(scheduler.waiting)))
    assert len(scheduler.running) <= config.max_num_seqs

    holders = Counter(block_id for request in live for block_id in request.block_ids)
    hashed = [block for block in bm.blocks if block.block_hash is not None]
    for block in bm.blocks:
        assert block.ref_cnt == holders[block.block_id]
        assert (block.ref_cnt == 0) == (block.block_id in bm.free_block_queue)
        # Only a cached prefix page may be shared between live requests.
        assert block.ref_cnt <= 1 or block.block_hash is not None
    assert len(bm.cached_block_hash_to_block) == len(hashed)
    assert all(bm.cached_block_hash_to_block[b.block_hash] is b for b in hashed)

    for request in live:
        assert len(set(request.block_ids)) == len(request.block_ids)
        assert len(request.block_ids) == cdiv(request.num_computed_tokens, BLOCK_SIZE)
        for i, block_id in enumerate(request.block_ids):
            # A shared page holds the same prefix in every request holding it.
            if bm.blocks[block_id].block_hash is not None:
                assert request.block_hashes[i] == bm.blocks[block_id].block_hash
        if request in scheduler.running:
            assert request.status == RequestStatus.RUNNING
        else:
            assert request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            assert request.num_computed_tokens == 0

    if output is None:
        return
    assert output.total_num_scheduled_tokens == sum(output.num_scheduled_tokens.values())
    assert output.total_num_scheduled_tokens <= config.max_num_batched_tokens
    assert len(output.scheduled_requests) <= config.max_num_seqs
    for scheduled in output.scheduled_requests:
        request = scheduled.request
        end = scheduled.num_computed_tokens + scheduled.num_scheduled_tokens
        assert 0 < scheduled.num_scheduled_tokens and end == request.num_computed_tokens
        assert end <= request.num_tokens
        assert scheduled.sample == (end == request.num_tokens)
        if not config.enable_chunked_prefill:
            assert scheduled.sample


class FakeModel:
    """Writes each scheduled token into a fake paged KV pool, checks that every
    position the step attends to holds the right token, and samples randomly."""

    def __init__(self, rng, vocab_size):
        self.rng, self.vocab_size = rng, vocab_size
        self.kv = {}

    def execute(self, scheduler, output):
        bm = scheduler.block_manager
        sampled = {}
        for scheduled in output.scheduled_requests:
            tokens = scheduled.request.all_token_ids
            start, end = scheduled.num_computed_tokens, scheduled.num_computed_tokens + scheduled.num_scheduled_tokens
            for pos in range(start, end):
                block_id = scheduled.block_ids[pos // BLOCK_SIZE]
                assert bm.blocks[block_id].ref_cnt == 1, "writing into a shared page"
                self.kv[block_id, pos % BLOCK_SIZE] = tokens[pos]
            for pos in range(end):
                assert self.kv[scheduled.block_ids[pos // BLOCK_SIZE], pos % BLOCK_SIZE] == tokens[pos]
            if scheduled.sample:
                sampled[scheduled.request.request_id] = self.rng.randrange(self.vocab_size)
        return sampled


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    "enable_chunked_prefill,enable_prefix_caching,max_num_batched_tokens",
    [(True, True, 16), (True, False, 24), (False, True, 48)],
)
def test_random_workload_keeps_page_invariants(
    seed, enable_chunked_prefill, enable_prefix_caching, max_num_batched_tokens
):
    rng = random.Random(seed)
    max_model_len, vocab_size = 48, 5
    scheduler = make_scheduler(
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=6,
        max_model_len=max_model_len,
        num_gpu_blocks=20,
        enable_chunked_prefill=enable_chunked_prefill,
        enable_prefix_caching=enable_prefix_caching,
    )
    model = FakeModel(rng, vocab_size)
    shared_prefixes = [[rng.randrange(vocab_size) for _ in range(12)] for _ in range(3)]
    num_requests, num_added = 60, 0

    for _ in range(5000):
        if num_added < num_requests and rng.random() < 0.4:
            prompt = rng.choice(shared_prefixes)[: rng.randrange(13)]
            prompt += [rng.randrange(vocab_size) for _ in range(rng.randrange(1, 20))]
            scheduler.add_request(
                make_request(
                    str(num_added),
                    prompt,
                    max_tokens=rng.randrange(1, max_model_len - len(prompt) + 1),
                    cache_salt=rng.choice([None, None, "salt"]),
                    prompt_logprobs=rng.choice([None] * 5 + [1]),
                )
            )
            num_added += 1
        output = schedule(scheduler)
        check_invariants(scheduler, output)
        sampled = model.execute(scheduler, output)
        record(scheduler, sampled)
        if scheduler.requests and rng.random() < 0.05:  # An abort arriving mid-step.
            scheduler.abort_requests(rng.choice(list(scheduler.requests)))
        for request in scheduler.update_from_output(output.output, sampled):
            if request.num_output_tokens >= request.sampling_params.max_tokens:
                scheduler.finish_requests(request.request_id, RequestStatus.FINISHED_LENGTH_CAPPED)
        check_invariants(scheduler)
        if num_added == num_requests and not scheduler.has_unfinished_requests():
            break
    else:
        pytest.fail("requests never finished")

    scheduler.block_manager.check_no_leaks()
    assert scheduler.num_preemptions > 0
    if enable_prefix_caching:
        assert scheduler.block_manager.prefix_cache_stats.hits > 0
