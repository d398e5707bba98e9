"""DataParallelEngine: `data_parallel_size` LLMEngine replicas, each on its own devices,
behind LLMEngine's interface (vLLM's data-parallel client with load balancing,
`DPLBAsyncMPClient`, in one process).

A new request goes to the replica with the fewest unfinished requests (ties: the lowest
rank) and stays there: all its samples, its abort. Each step, every replica with work
steps on its own thread and the steps are joined; JAX releases the GIL while the device
runs, so one replica's device work overlaps the others' host work and device work.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, wait

from jllm.engine.arg_utils import EngineArgs
from jllm.engine.llm_engine import LLMEngine
from jllm.outputs import PoolingRequestOutput, RequestOutput
from jllm.pooling_params import PoolingParams
from jllm.sampling_params import SamplingParams


class DataParallelEngine:
    def __init__(self, engines: list[LLMEngine]) -> None:
        self.engines = engines
        # The replicas share one model: what the entry points read comes from the first.
        first = engines[0]
        self.model_config = first.model_config
        self.scheduler_config = first.scheduler_config
        self.cache_config = first.cache_config
        self.tokenizer = first.tokenizer
        self.generation_config = first.generation_config
        self.hf_config = first.hf_config
        self.vocab_size = first.vocab_size
        # Unseeded requests get their seeds here, in arrival order from the model's seed as
        # one engine draws them: each replica's own generator starts from that same seed,
        # so two replicas would otherwise sample two identical prompts identically.
        self._rng = random.Random(first.model_config.seed)
        # user request id -> index of its replica in `engines`
        self._owner: dict[str, int] = {}
        # One thread per replica, so a replica always steps on the same thread.
        self._threads = [ThreadPoolExecutor(1, thread_name_prefix=f"jllm-dp{i}") for i in range(len(engines))]

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> DataParallelEngine:
        """One replica per rank, each building its own tokenizer, weights and KV pool on the
        rank-th group of tensor_parallel_size devices."""
        return cls(
            [
                LLMEngine.from_engine_args(dataclasses.replace(engine_args, data_parallel_rank=rank))
                for rank in range(engine_args.data_parallel_size)
            ]
        )

    # ----- requests -------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt,
        params: SamplingParams | PoolingParams | None = None,
        arrival_time: float | None = None,
    ) -> None:
        if request_id in self._owner:
            raise ValueError(f"Request id {request_id} already running.")
        if not isinstance(params, PoolingParams):
            params = (params or SamplingParams()).clone()
            if params.seed is None:
                params.seed = self._rng.getrandbits(64)
        index = min(range(len(self.engines)), key=lambda i: self.engines[i].get_num_unfinished_requests())
        self.engines[index].add_request(request_id, prompt, params, arrival_time)
        self._owner[request_id] = index

    def shutdown(self) -> None:
        for engine in self.engines:
            engine.shutdown()

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        by_replica: dict[int, list[str]] = {}
        for request_id in request_ids:
            index = self._owner.pop(request_id, None)
            if index is not None:
                by_replica.setdefault(index, []).append(request_id)
        for index, ids in by_replica.items():
            self.engines[index].abort_request(ids)

    def engine_index_of(self, request_id: str) -> int:
        """The engine index (data-parallel rank) of the replica running `request_id`."""
        return self.engines[self._owner[request_id]].engine_index

    def has_unfinished_requests(self) -> bool:
        return any(engine.has_unfinished_requests() for engine in self.engines)

    def get_num_unfinished_requests(self) -> int:
        return sum(engine.get_num_unfinished_requests() for engine in self.engines)

    # ----- the step -------------------------------------------------------------------

    def step(self) -> list[RequestOutput | PoolingRequestOutput]:
        """One step of every replica with work, run together. A step that raises is raised
        as it is (the lowest rank's first), once every replica's step has returned."""
        futures = [
            self._threads[i].submit(engine.step)
            for i, engine in enumerate(self.engines)
            if engine.has_unfinished_requests()
        ]
        wait(futures)
        outputs = [output for future in futures for output in future.result()]
        for output in outputs:
            if output.finished:
                self._owner.pop(output.request_id, None)
        return outputs


def engine_replicas(engine: LLMEngine | DataParallelEngine) -> list[LLMEngine]:
    """The LLMEngines behind `engine`: its replicas, or itself."""
    return engine.engines if isinstance(engine, DataParallelEngine) else [engine]
