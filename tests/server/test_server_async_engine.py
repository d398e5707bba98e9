"""AsyncLLMEngine on a stand-in engine core (no model): output kinds, errors at
admission, aborts when a caller leaves, several event loops, engine death, statistics."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from jllm.core.block_manager import PrefixCacheStats
from jllm.engine.async_llm_engine import AsyncLLMEngine, EngineDeadError
from jllm.outputs import CompletionOutput, RequestOutput
from jllm.sampling_params import RequestOutputKind, SamplingParams


class FakeEngineCore:
    """LLMEngine's surface: each request gets token k (text "t{k} ") at its k-th step,
    as DELTA outputs, until max_tokens; `fail_at_step` makes that step raise."""

    def __init__(self, fail_at_step: int | None = None, step_seconds: float = 0.001) -> None:
        self.requests: dict[str, list] = {}
        self.aborted: list[str] = []
        self.kinds: list[RequestOutputKind] = []
        self.added: list[str] = []
        self.fail_at_step = fail_at_step
        self.step_seconds = step_seconds
        self.num_steps = 0
        self.engine_index = 0
        self.scheduler = SimpleNamespace(
            get_request_counts=lambda: (len(self.requests), 0),
            num_preemptions=0,
            block_manager=SimpleNamespace(usage=0.0, prefix_cache_stats=PrefixCacheStats()),
        )

    def add_request(self, request_id, prompt, params, arrival_time=None) -> None:
        if prompt == "bad":
            raise ValueError("The decoder prompt cannot be empty")
        if request_id in self.requests:
            raise ValueError(f"Request id {request_id} already running.")
        self.kinds.append(params.output_kind)
        self.added.append(request_id)
        self.requests[request_id] = [prompt, params, 0]

    def abort_request(self, request_ids) -> None:
        for request_id in request_ids:
            if self.requests.pop(request_id, None) is not None:
                self.aborted.append(request_id)

    def engine_index_of(self, request_id) -> int:
        return self.engine_index

    def shutdown(self) -> None:
        """Nothing outlives a fake engine's requests."""

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        self.num_steps += 1
        if self.num_steps == self.fail_at_step:
            raise RuntimeError("device lost")
        time.sleep(self.step_seconds)
        outputs = []
        for request_id, entry in list(self.requests.items()):
            prompt, params, k = entry
            entry[2] = k = k + 1
            done = k >= params.max_tokens
            outputs.append(
                RequestOutput(
                    request_id,
                    prompt,
                    [1, 2, 3],
                    None,
                    [CompletionOutput(0, f"t{k} ", [k], None, None, "length" if done else None)],
                    done,
                )
            )
            if done:
                del self.requests[request_id]
        return outputs


class RecordingStatLogger:
    def __init__(self) -> None:
        self.iterations = []

    def record(self, scheduler_stats, iteration_stats, engine_idx=0) -> None:
        self.iterations.append(iteration_stats)


def params(max_tokens: int, kind: RequestOutputKind) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, output_kind=kind)


async def collect(engine: AsyncLLMEngine, request_id: str, p: SamplingParams, prompt="hello"):
    return [out async for out in engine.generate(prompt, p, request_id)]


@pytest.fixture
def core():
    return FakeEngineCore()


@pytest.fixture
def engine(core):
    engine = AsyncLLMEngine(core)
    yield engine
    engine.shutdown()


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_delta_outputs_carry_one_token_each(engine, core):
    outputs = asyncio.run(collect(engine, "r", params(3, RequestOutputKind.DELTA)))
    assert [o.outputs[0].text for o in outputs] == ["t1 ", "t2 ", "t3 "]
    assert [o.finished for o in outputs] == [False, False, True]
    assert core.kinds == [RequestOutputKind.DELTA]  # the core always streams deltas


def test_final_only_is_one_output_with_everything(engine):
    [output] = asyncio.run(collect(engine, "r", params(3, RequestOutputKind.FINAL_ONLY)))
    assert output.finished and output.outputs[0].text == "t1 t2 t3 " and output.outputs[0].token_ids == [1, 2, 3]
    assert output.outputs[0].finish_reason == "length"


def test_cumulative_outputs_are_snapshots(engine):
    outputs = asyncio.run(collect(engine, "r", params(3, RequestOutputKind.CUMULATIVE)))
    assert [o.outputs[0].text for o in outputs] == ["t1 ", "t1 t2 ", "t1 t2 t3 "]
    assert [o.outputs[0].token_ids for o in outputs] == [[1], [1, 2], [1, 2, 3]]


def test_a_refused_request_raises_in_its_caller_and_others_go_on(engine, core):
    async def main():
        with pytest.raises(ValueError, match="The decoder prompt cannot be empty"):
            await engine.add_request("bad-one", "bad", params(3, RequestOutputKind.DELTA))
        return await collect(engine, "good", params(2, RequestOutputKind.FINAL_ONLY))

    [output] = asyncio.run(main())
    assert output.outputs[0].text == "t1 t2 " and "bad-one" not in core.requests


def test_a_duplicate_request_id_is_refused(engine):
    async def main():
        stream = await engine.add_request("same", "hello", params(1000, RequestOutputKind.DELTA))
        with pytest.raises(ValueError, match="Request id same already running."):
            await engine.add_request("same", "hello", params(3, RequestOutputKind.DELTA))
        engine.abort(stream.request_id)

    asyncio.run(main())


def test_closing_the_generator_early_aborts_the_request(engine, core):
    async def main():
        generator = engine.generate("hello", params(10_000, RequestOutputKind.DELTA), "long")
        first = [await anext(generator), await anext(generator)]
        await generator.aclose()
        return first

    first = asyncio.run(main())
    assert [o.outputs[0].text for o in first] == ["t1 ", "t2 "]
    wait_until(lambda: core.aborted == ["long"] and not core.requests)
    assert engine.get_num_unfinished_requests() == 0


def test_a_cancelled_consumer_aborts_its_request(engine, core):
    async def main():
        task = asyncio.create_task(collect(engine, "cancelled", params(10_000, RequestOutputKind.DELTA)))
        while core.num_steps < 3:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    wait_until(lambda: core.aborted == ["cancelled"])


def test_a_caller_that_leaves_before_admission_never_runs(core):
    core.step_seconds = 0.05  # the engine is mid-step when the caller gives up
    engine = AsyncLLMEngine(core)

    async def main():
        busy = asyncio.create_task(collect(engine, "busy", params(10, RequestOutputKind.FINAL_ONLY)))
        while core.num_steps < 1:
            await asyncio.sleep(0.001)
        waiting = asyncio.create_task(engine.add_request("left", "hello", params(10_000, RequestOutputKind.DELTA)))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await busy

    asyncio.run(main())
    wait_until(lambda: engine.get_num_unfinished_requests() == 0)
    engine.shutdown()
    assert core.added == ["busy"]


def test_several_event_loops_each_get_their_own_outputs(engine):
    results = {}

    def client(name: str, n: int) -> None:
        async def main():
            return await asyncio.gather(
                *(collect(engine, f"{name}-{i}", params(i + 1, RequestOutputKind.FINAL_ONLY)) for i in range(n))
            )

        results[name] = asyncio.run(main())

    threads = [threading.Thread(target=client, args=(f"loop{j}", 20)) for j in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for name, outputs in results.items():
        assert [o[0].request_id for o in outputs] == [f"{name}-{i}" for i in range(20)]
        assert [len(o[0].outputs[0].token_ids) for o in outputs] == list(range(1, 21))
    assert len(results) == 3


def test_a_failed_step_ends_the_engine_for_everyone():
    core = FakeEngineCore(fail_at_step=3)
    engine = AsyncLLMEngine(core)

    async def main():
        with pytest.raises(EngineDeadError, match="device lost"):
            await collect(engine, "r", params(100, RequestOutputKind.DELTA))
        with pytest.raises(EngineDeadError):
            await engine.add_request("later", "hello", params(1, RequestOutputKind.DELTA))

    asyncio.run(main())
    assert engine.errored
    with pytest.raises(EngineDeadError):
        engine.check_health()


def test_stat_loggers_see_every_token_once(core):
    logger = RecordingStatLogger()
    engine = AsyncLLMEngine(core, [logger])

    async def main():
        await asyncio.gather(*(collect(engine, f"r{i}", params(4, RequestOutputKind.FINAL_ONLY)) for i in range(5)))

    asyncio.run(main())
    engine.shutdown()
    iterations = logger.iterations
    assert sum(it.num_generation_tokens for it in iterations) == 20
    assert sum(len(it.time_to_first_tokens) for it in iterations) == 5
    assert sum(len(it.inter_token_latencies) for it in iterations) == 15
    finished = [f for it in iterations for f in it.finished_requests]
    assert sorted(f.finish_reason for f in finished) == ["length"] * 5
    assert all(f.num_generation_tokens == 4 and f.num_prompt_tokens == 3 for f in finished)


def test_an_abort_is_counted_as_a_finished_request(core):
    logger = RecordingStatLogger()
    engine = AsyncLLMEngine(core, [logger])

    async def main():
        generator = engine.generate("hello", params(10_000, RequestOutputKind.DELTA), "gone")
        await anext(generator)
        await generator.aclose()

    asyncio.run(main())
    wait_until(lambda: core.aborted == ["gone"])
    wait_until(lambda: any(it.finished_requests for it in logger.iterations))
    engine.shutdown()
    [aborted] = [f for it in logger.iterations for f in it.finished_requests]
    assert aborted.finish_reason == "abort" and aborted.num_generation_tokens >= 1


def test_shutdown_fails_the_requests_still_running(core):
    core.step_seconds = 0.01
    engine = AsyncLLMEngine(core)

    async def main():
        generator = engine.generate("hello", params(10_000, RequestOutputKind.DELTA), "r")
        await anext(generator)
        threading.Thread(target=engine.shutdown).start()
        with pytest.raises(EngineDeadError, match="shut down"):
            async for _ in generator:
                pass

    asyncio.run(main())
