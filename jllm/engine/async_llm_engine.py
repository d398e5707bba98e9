"""AsyncLLMEngine: the engine core stepped on its own thread while requests arrive,
stream and finish on asyncio event loops (vLLM's AsyncLLMEngine / AsyncLLM).

An engine step is a blocking JAX call, so it never runs on an event loop. Only the
engine thread touches the LLMEngine: callers queue additions and aborts under a lock,
the thread applies them between steps, and each step's outputs travel back to the
loop of the request that asked (`call_soon_threadsafe`). A request is accepted only
once `LLMEngine.add_request` has validated it, so a bad request fails in `add_request`
with the engine's ValueError before any response has started.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from collections import defaultdict
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from jllm.engine.arg_utils import EngineArgs
from jllm.engine.data_parallel import DataParallelEngine, engine_replicas
from jllm.engine.llm_engine import LLMEngine
from jllm.engine.stats import IterationStats, LoggingStatLogger, RequestStatsTracker, StatLogger, record_stats
from jllm.outputs import PoolingRequestOutput, RequestOutput
from jllm.pooling_params import PoolingParams
from jllm.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop has stopped (a step failed, or the engine was shut down)."""


class RequestStream:
    """One request's outputs on its event loop; items are RequestOutputs (a pooling
    request's one PoolingRequestOutput) or an exception."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.loop = loop
        self.finished = False
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    async def get(self) -> RequestOutput:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item


@dataclass
class _PendingAdd:
    request_id: str
    prompt: object
    params: SamplingParams | PoolingParams
    output_kind: RequestOutputKind
    arrival_time: float
    stream: RequestStream
    accepted: asyncio.Future
    # Set when the caller stops waiting; the engine thread then skips the addition.
    cancelled: bool = False


class _OutputAccumulator:
    """Turns the engine's DELTA outputs into the kind the caller asked for.

    The engine always streams deltas so that per-token statistics are exact whatever
    the caller wants; FINAL_ONLY and CUMULATIVE are rebuilt here.
    """

    def __init__(self, kind: RequestOutputKind) -> None:
        self.kind = kind
        self.whole: RequestOutput | None = None

    def convert(self, output: RequestOutput | PoolingRequestOutput) -> RequestOutput | PoolingRequestOutput | None:
        if self.kind == RequestOutputKind.DELTA or isinstance(output, PoolingRequestOutput):
            return output  # a pooling request's output comes once, whole
        if self.whole is None:
            self.whole = output
        else:
            self.whole.add(output, aggregate=True)
            self.whole.metrics = output.metrics
        if self.kind == RequestOutputKind.FINAL_ONLY:
            return self.whole if output.finished else None
        return _snapshot(self.whole)


def _snapshot(output: RequestOutput) -> RequestOutput:
    """A copy whose completions later aggregation will not change."""
    snap = copy.copy(output)
    snap.outputs = []
    for completion in output.outputs:
        c = copy.copy(completion)
        c.token_ids = list(completion.token_ids)
        c.logprobs = list(completion.logprobs) if completion.logprobs is not None else None
        snap.outputs.append(c)
    return snap


def _deliver(items: list[tuple[RequestStream, RequestOutput | BaseException]]) -> None:
    for stream, item in items:
        stream.put(item)


def _resolve_value(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _resolve(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():  # the caller stopped waiting (its client went away)
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine | DataParallelEngine, stat_loggers: list[StatLogger] | None = None) -> None:
        self.engine = engine
        # Statistics are recorded per engine index (each data-parallel replica's own).
        self._replicas = {replica.engine_index: replica for replica in engine_replicas(engine)}
        self._stat_loggers: list[StatLogger] = list(stat_loggers or ())
        # Guards the two inboxes below; never held while the engine steps.
        self._lock = threading.Lock()
        self._pending_adds: list[_PendingAdd] = []
        self._pending_aborts: set[str] = set()
        # Additions taken from the inbox and not yet in the engine.
        self._num_adding = 0
        self._wakeup = threading.Event()
        # Engine-thread state: each running request's stream, output conversion and engine index.
        self._streams: dict[str, tuple[RequestStream, _OutputAccumulator, int]] = {}
        self._stats = RequestStatsTracker()
        self._dead: EngineDeadError | None = None
        self._errored = False
        self._stopping = False
        # (loop, future) of each wait_until_dead caller.
        self._death_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._thread = threading.Thread(target=self._run, name="jllm-engine-loop", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs, stat_loggers: list[StatLogger] | None = None) -> AsyncLLMEngine:
        loggers = list(stat_loggers or ())
        if not engine_args.disable_log_stats:
            loggers.append(LoggingStatLogger())
        return cls(LLMEngine.from_engine_args(engine_args), loggers)

    # ----- what the server reads ------------------------------------------------------

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_config(self):
        return self.engine.model_config

    @property
    def cache_config(self):
        return self.engine.cache_config

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    @property
    def generation_config(self) -> dict | None:
        return self.engine.generation_config

    @property
    def hf_config(self):
        return self.engine.hf_config

    @property
    def engine_indexes(self) -> list[int]:
        """The `engine` labels of the metrics: one per data-parallel replica."""
        return list(self._replicas)

    @property
    def errored(self) -> bool:
        """The loop died of an error (a shutdown is not one)."""
        return self._errored

    def add_stat_logger(self, stat_logger: StatLogger) -> None:
        self._stat_loggers.append(stat_logger)

    def check_health(self) -> None:
        if self._dead is not None:
            raise self._dead

    async def wait_until_dead(self) -> EngineDeadError:
        """Returns once the engine loop has died of an error (not on shutdown): the
        server then exits, as vLLM's does, rather than answer 500 for ever."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if self._errored:
                return self._dead
            self._death_waiters.append((loop, future))
        return await future

    def get_num_unfinished_requests(self) -> int:
        with self._lock:
            return len(self._streams) + len(self._pending_adds) + self._num_adding

    # ----- requests -------------------------------------------------------------------

    async def add_request(
        self, request_id: str, prompt, params: SamplingParams | PoolingParams, arrival_time: float | None = None
    ) -> RequestStream:
        """Queue a request and wait until the engine has accepted it.

        Raises what `LLMEngine.add_request` raises (ValueError for a bad prompt or
        parameters), or EngineDeadError.
        """
        [stream] = await self.add_requests([(request_id, prompt, params)], arrival_time)
        return stream

    async def add_requests(
        self, requests: list[tuple[str, object, SamplingParams | PoolingParams]], arrival_time: float | None = None
    ) -> list[RequestStream]:
        """Queue (request_id, prompt, params) requests together, so that the engine thread
        takes them in one go (into the same step, where they fit), and wait until it has
        accepted each. All are accepted or none stays: the first refusal is raised and
        the others are aborted."""
        self.check_health()
        loop = asyncio.get_running_loop()
        arrival = arrival_time if arrival_time is not None else time.time()
        pendings = []
        for request_id, prompt, params in requests:
            engine_params = params.clone()
            engine_params.output_kind = RequestOutputKind.DELTA
            stream = RequestStream(request_id, loop)
            pendings.append(
                _PendingAdd(
                    request_id, prompt, engine_params, params.output_kind, arrival, stream, loop.create_future()
                )
            )
        with self._lock:
            if self._dead is not None:
                raise self._dead
            self._pending_adds.extend(pendings)
        self._wakeup.set()
        try:
            results = await asyncio.gather(*(p.accepted for p in pendings), return_exceptions=True)
        except asyncio.CancelledError:
            for pending in pendings:
                pending.cancelled = True
                self.abort(pending.request_id)  # in case the engine took it in meanwhile
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for pending, result in zip(pendings, results):
                if not isinstance(result, BaseException):
                    self.abort(pending.request_id)
            raise errors[0]
        return [p.stream for p in pendings]

    async def generate(
        self, prompt, sampling_params: SamplingParams, request_id: str, arrival_time: float | None = None
    ) -> AsyncGenerator[RequestOutput, None]:
        """Outputs of one request as the engine produces them, in the kind that
        `sampling_params.output_kind` names. Closing or cancelling the generator before
        the request finishes aborts it, which frees its KV pages."""
        stream = await self.add_request(request_id, prompt, sampling_params, arrival_time)
        async for _, output in self.stream_outputs([stream]):
            yield output

    async def encode(
        self, prompt, pooling_params: PoolingParams, request_id: str, arrival_time: float | None = None
    ) -> AsyncGenerator[PoolingRequestOutput, None]:
        """The pooled output of one prompt (vLLM's EngineClient.encode): a pooling request
        runs in one step, so this yields once, its final PoolingRequestOutput. Closing or
        cancelling the generator before then aborts the request."""
        stream = await self.add_request(request_id, prompt, pooling_params, arrival_time)
        async for _, output in self.stream_outputs([stream]):
            yield output

    async def stream_outputs(self, streams: list[RequestStream]) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        """(index into `streams`, output) as outputs arrive, until every stream has
        finished. Leaving early (an error, a cancelled task, a closed generator) aborts
        the streams that have not finished."""
        try:
            if len(streams) == 1:
                stream = streams[0]
                while not stream.finished:
                    yield 0, await stream.get()
                return
            waiting = {asyncio.ensure_future(s.get()): i for i, s in enumerate(streams) if not s.finished}
            try:
                while waiting:
                    done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                    for task in sorted(done, key=waiting.__getitem__):
                        index = waiting.pop(task)
                        output = task.result()
                        if not output.finished:
                            waiting[asyncio.ensure_future(streams[index].get())] = index
                        yield index, output
            finally:
                for task in waiting:
                    task.cancel()
        finally:
            for stream in streams:
                if not stream.finished:
                    self.abort(stream.request_id)

    def abort(self, request_id: str) -> None:
        """Thread-safe; unknown or finished ids are ignored."""
        with self._lock:
            self._pending_aborts.add(request_id)
        self._wakeup.set()

    def shutdown(self, timeout: float = 30.0) -> None:
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.engine.shutdown()

    # ----- the engine thread ----------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._wakeup.clear()
                self._process_inputs()
                if not self.engine.has_unfinished_requests():
                    self._wakeup.wait()
                    continue
                outputs = self.engine.step()
                self._process_outputs(outputs)
        except BaseException as e:  # noqa: BLE001 - anything that escapes a step ends the engine
            logger.exception("The engine loop failed; no further requests can be served.")
            error = EngineDeadError(f"Engine loop has died: {e!r}")
            self._errored = True
            self._fail_all(error)
            with self._lock:
                waiters, self._death_waiters = self._death_waiters, []
            for loop, future in waiters:
                self._call_soon(loop, _resolve_value, future, error)
            return
        self._fail_all(EngineDeadError("The engine has been shut down."))

    def _process_inputs(self) -> None:
        with self._lock:
            adds, self._pending_adds = self._pending_adds, []
            aborts, self._pending_aborts = self._pending_aborts, set()
            self._num_adding = len(adds)
        for add in adds:
            loop = add.stream.loop
            if add.cancelled:
                continue
            try:
                self.engine.add_request(add.request_id, add.prompt, add.params, add.arrival_time)
            except Exception as e:  # noqa: BLE001 - the caller gets it back as its own error
                self._call_soon(loop, _resolve, add.accepted, e)
                continue
            self._streams[add.request_id] = (
                add.stream,
                _OutputAccumulator(add.output_kind),
                self.engine.engine_index_of(add.request_id),
            )
            if isinstance(add.params, SamplingParams):
                self._stats.add(add.request_id, add.arrival_time, add.params.n, add.params.max_tokens)
            else:
                self._stats.add(add.request_id, add.arrival_time)
            self._call_soon(loop, _resolve, add.accepted, None)
        with self._lock:
            self._num_adding = 0
        if not aborts:
            return
        known = [r for r in aborts if r in self._streams]
        if not known:
            return
        self.engine.abort_request(known)
        now = time.time()
        iterations = {index: IterationStats() for index in self._replicas}
        for request_id in known:
            finished = self._stats.record_abort(request_id, now)
            if finished is not None:
                iterations[self._streams[request_id][2]].finished_requests.append(finished)
        logger.info("Aborted request(s) %s.", ", ".join(sorted(known)))
        # Counted before the requests leave _streams, so no one sees them gone but uncounted.
        self._record_stats(iterations)
        for request_id in known:
            del self._streams[request_id]

    def _process_outputs(self, outputs: list[RequestOutput | PoolingRequestOutput]) -> None:
        # Each engine's step statistics come from its own requests' outputs (vLLM's per engine).
        by_engine: dict[int, list] = {index: [] for index in self._replicas}
        for output in outputs:
            entry = self._streams.get(output.request_id)
            if entry is not None:
                by_engine[entry[2]].append(output)
        now = time.time()
        iterations = {index: self._stats.record_outputs(group, now) for index, group in by_engine.items()}
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for output in outputs:
            entry = self._streams.get(output.request_id)
            if entry is None:
                continue
            stream, accumulator, _ = entry
            if output.finished:
                del self._streams[output.request_id]
            if output.error is not None:
                item = output.error
            else:
                try:
                    item = accumulator.convert(output)
                except Exception as e:  # noqa: BLE001 - this request's output alone
                    logger.exception("Request %s's output could not be built.", output.request_id)
                    item = e
                    self.abort(output.request_id)  # applied before the next step
            if item is not None:
                by_loop[stream.loop].append((stream, item))
        # Statistics first: a client that has its last token may read /metrics at once.
        self._record_stats(iterations)
        for loop, items in by_loop.items():
            self._call_soon(loop, _deliver, items)

    def _record_stats(self, iterations: dict[int, IterationStats]) -> None:
        """Every engine's scheduler state and its requests' part of this step."""
        for index, replica in self._replicas.items():
            record_stats(self._stat_loggers, replica.scheduler, iterations[index], index)

    def _fail_all(self, error: EngineDeadError) -> None:
        with self._lock:
            self._dead = error
            adds, self._pending_adds = self._pending_adds, []
        for add in adds:
            self._call_soon(add.stream.loop, _resolve, add.accepted, error)
        for stream, _, _ in self._streams.values():
            self._call_soon(stream.loop, _deliver, [(stream, error)])
        self._streams.clear()

    @staticmethod
    def _call_soon(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # that loop has closed: nobody is waiting any more
