"""LLMEngine: requests in, one scheduled and jitted model step at a time, outputs out."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from jllm.core.scheduler import Scheduler
from jllm.engine.arg_utils import EngineArgs
from jllm.engine.detokenizer import IncrementalDetokenizer
from jllm.engine.engine_setup import EngineParts, build_engine_parts
from jllm.engine.output_processor import RequestState, SampleState, check_stop, past_min_tokens
from jllm.engine.pooling_requests import PoolingRequests
from jllm.engine.prompts import bad_words_token_ids, process_prompt
from jllm.engine.request import Request, RequestStatus
from jllm.engine.sampling_settings import sampling_settings
from jllm.outputs import PoolingRequestOutput, RequestOutput
from jllm.pooling_params import PoolingParams
from jllm.sampling_params import SamplingParams
from jllm.worker.model_runner import ModelRunnerOutput

if TYPE_CHECKING:
    from jllm.engine.data_parallel import DataParallelEngine
    from jllm.engine.stats_recorder import EngineStatsRecorder

logger = logging.getLogger(__name__)

_SEED_MASK = (1 << 64) - 1
# Spreads the seeds of a request's n samples apart (the 64-bit golden ratio).
_SAMPLE_SEED_STRIDE = 0x9E3779B97F4A7C15


class LLMEngine:
    def __init__(self, parts: EngineParts):
        self.parts = parts
        self.model_config = parts.model_config
        self.scheduler_config = parts.scheduler_config
        self.cache_config = parts.cache_config
        self.tokenizer = parts.tokenizer
        self.runner = parts.runner
        self.scheduler = Scheduler(parts.scheduler_config, parts.cache_config)
        self.generation_config = parts.generation_config
        self.hf_config = parts.hf_config
        # vLLM's engine index: the data-parallel rank, the `engine` label of this engine's metrics.
        self.engine_index = parts.parallel_config.data_parallel_rank
        self.vocab_size = parts.spec.vocab_size
        self._rng = random.Random(parts.model_config.seed)
        # user request id -> state; each sample's Request id -> (state, sample index)
        self._states: dict[str, RequestState] = {}
        self._sample_of: dict[str, tuple[RequestState, SampleState]] = {}
        self._pooling = PoolingRequests(
            parts.model_config, parts.hf_config, parts.tokenizer, self.vocab_size, self.scheduler
        )
        # Set by LLM(disable_log_stats=False); it sees every sampled token, whatever output kind.
        self.stats_recorder: EngineStatsRecorder | None = None

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> LLMEngine | DataParallelEngine:
        """This engine, or with data_parallel_size > 1 and no rank given, every replica
        behind one DataParallelEngine."""
        if engine_args.data_parallel_size > 1 and engine_args.data_parallel_rank is None:
            # Imported here: data_parallel builds its replicas from this module.
            from jllm.engine.data_parallel import DataParallelEngine

            return DataParallelEngine.from_engine_args(engine_args)
        return cls(build_engine_parts(engine_args))

    # ----- requests -------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt,
        params: SamplingParams | PoolingParams | None = None,
        arrival_time: float | None = None,
    ) -> None:
        if request_id in self._states or request_id in self._pooling:
            raise ValueError(f"Request id {request_id} already running.")
        runner_type = self.model_config.runner_type
        if isinstance(params, PoolingParams):
            if runner_type != "pooling":
                raise ValueError(
                    "Pooling requests need a pooling model. Try passing `--runner pooling` to use the model "
                    "as a pooling model."
                )
            self._pooling.add(request_id, prompt, params, arrival_time)
            return
        if runner_type != "generate":
            raise ValueError(
                "Generation requests need a generative model; this one is a pooling model. Try passing "
                "`--runner generate` to use the model as a generative model."
            )
        params = (params or SamplingParams()).clone()
        prompt_text, prompt_ids, cache_salt = process_prompt(
            prompt, params, self.tokenizer, self.model_config.max_model_len, self.vocab_size
        )
        params.verify(self.vocab_size, self.model_config.max_logprobs)
        eos_token_id = self.parts.eos_token_id
        params.update_from_generation_config(self.generation_config or {}, eos_token_id)
        max_model_len = self.model_config.max_model_len
        max_tokens = max_model_len - len(prompt_ids) if params.max_tokens is None else params.max_tokens
        bad_words = bad_words_token_ids(params, self.tokenizer, self.vocab_size)
        arrival = arrival_time if arrival_time is not None else time.time()
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(64)
        state = RequestState(
            request_id,
            prompt_text,
            prompt_ids,
            params,
            [],
            self.tokenizer,
            prompt_logprobs=[None] * len(prompt_ids) if params.prompt_logprobs is not None else None,
            arrival_time=arrival,
        )
        for index in range(params.n):
            sample_id = request_id if params.n == 1 else f"{index}_{request_id}"
            seed = (base_seed + index * _SAMPLE_SEED_STRIDE) & _SEED_MASK
            req = Request(
                request_id=sample_id,
                prompt_token_ids=list(prompt_ids),
                sampling_params=params,
                arrival_time=arrival,
                index=index,
                parent_id=request_id,
                cache_salt=cache_salt,
                eos_token_id=eos_token_id,
                max_tokens=max_tokens,
                seed=seed,
                sampling_settings=sampling_settings(params, seed, bad_words, with_prompt_logprobs=index == 0),
            )
            state.samples.append(
                SampleState(
                    req,
                    IncrementalDetokenizer(self.tokenizer, prompt_ids, params),
                    [] if params.logprobs is not None else None,
                    0.0 if params.logprobs is not None else None,
                )
            )
        # Registered only once all of it is built: a request that fails above leaves nothing.
        self._states[request_id] = state
        for sample in state.samples:
            self._sample_of[sample.request.request_id] = (state, sample)
            self.scheduler.add_request(sample.request)

    def shutdown(self) -> None:
        """Releases what outlives the requests: in a multi-host run, the other processes."""
        self.runner.shutdown()

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for request_id in request_ids:
            state = self._states.pop(request_id, None)
            if state is None:
                self._pooling.abort(request_id)
                continue
            ids = [s.request.request_id for s in state.samples]
            self.scheduler.abort_requests(ids)
            self._forget(ids)
            if self.stats_recorder is not None:
                self.stats_recorder.record_abort(request_id)

    def _forget(self, sample_ids: list[str]) -> None:
        for sid in sample_ids:
            self._sample_of.pop(sid, None)

    def engine_index_of(self, request_id: str) -> int:
        """The engine index of the engine running `request_id` (DataParallelEngine's
        question): this one."""
        return self.engine_index

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return len(self._states) + len(self._pooling)

    # ----- the step -------------------------------------------------------------------

    def step(self) -> list[RequestOutput | PoolingRequestOutput]:
        """One scheduled model step. A request whose own processing raises (its logits
        processor, logprobs, detokenization, stop checks) ends with finish_reason
        "error" and its exception in `RequestOutput.error`; the others go on."""
        sched = self.scheduler.schedule()
        failed: dict[str, RequestState] = {}
        try:
            # Even a step that runs nothing tells the worker which requests finished.
            result = self.runner.execute_model(sched)
        except Exception as e:
            if not self.runner.kv_cache_alive():
                raise  # the step consumed the KV cache: no request can go on
            # Raised before the device ran (the cache is intact), so one of this step's
            # requests may be the cause and no other has lost anything: those fail.
            logger.exception(
                "A model step failed; its %d requests fail, the engine goes on.", len(sched.num_scheduled_tokens)
            )
            pooled = [out for r in sched.num_scheduled_tokens if (out := self._pooling.fail(r, e)) is not None]
            for sample_id in sched.num_scheduled_tokens:
                self._fail(sample_id, e, failed)
            return [*pooled, *self._make_outputs(list(failed.values()))]
        if sched.is_empty:
            return []
        now = time.time()
        if result.pooler_output:
            pooled = self._pooling.finish(result.pooler_output, now)
            if self.stats_recorder is not None:
                self.stats_recorder.record_pooled(pooled, now)
            return [output for _, output in pooled]
        for sample_id, error in result.failed.items():
            self._fail(sample_id, error, failed)
        self._record_prompt_logprobs(result, failed)
        updated = self.scheduler.update_from_output(sched, result.sampled_token_ids)
        touched = self._process_sampled(updated, result, now, failed)
        outputs = self._make_outputs([*touched.values(), *(s for r, s in failed.items() if r not in touched)])
        if self.stats_recorder is not None:
            self.stats_recorder.record_step(updated, outputs, now)
        return outputs

    def _fail(self, sample_id: str, error: BaseException, failed: dict[str, RequestState]) -> None:
        """Ends the user request that sample `sample_id` belongs to (all its samples)
        with "error"; its pages are freed now and its output is made this step."""
        entry = self._sample_of.get(sample_id)
        if entry is None:
            return
        state = entry[0]
        if state.error is None:
            state.error = error
            logger.error("Request %s failed: %r", state.request_id, error, exc_info=error)
        self.scheduler.finish_requests([s.request.request_id for s in state.samples], RequestStatus.FINISHED_ERROR)
        failed[state.request_id] = state

    def _process_sampled(
        self, updated: list[Request], result: ModelRunnerOutput, now: float, failed: dict[str, RequestState]
    ) -> dict[str, RequestState]:
        """Per new token: timestamps, logprobs, stop checks and text; ends the requests
        that stopped. Returns the user requests touched, by id."""
        touched: dict[str, RequestState] = {}
        finished_ids: dict[RequestStatus, list[str]] = {}
        max_model_len = self.model_config.max_model_len
        for req in updated:
            state, sample = self._sample_of[req.request_id]
            if state.error is not None:
                continue
            touched[state.request_id] = state
            if req.first_token_time is None:
                req.first_token_time = now
            req.last_token_time = now
            token = req.output_token_ids[-1]
            try:
                if sample.logprobs is not None:
                    i = result.req_id_to_index[req.request_id]
                    state.add_sampled_logprobs(
                        sample,
                        token,
                        result.sampled_logprobs[i],
                        result.sampled_ranks[i],
                        result.topk_token_ids[i],
                        result.topk_logprobs[i],
                    )
                stopped = check_stop(req, max_model_len)
                stop_str = sample.detokenizer.update(
                    [token], stopped and req.status == RequestStatus.FINISHED_STOPPED, past_min_tokens(req)
                )
            except Exception as e:  # noqa: BLE001 - this request's fault alone
                self._fail(req.request_id, e, failed)
                continue
            if stop_str is not None:
                req.status = RequestStatus.FINISHED_STOPPED
                req.stop_reason = stop_str
                stopped = True
            if stopped:
                req.finished_time = now
                finished_ids.setdefault(req.status, []).append(req.request_id)
        for status, ids in finished_ids.items():
            self.scheduler.finish_requests(ids, status)
        return touched

    def _make_outputs(self, touched: list[RequestState]) -> list[RequestOutput]:
        """The RequestOutputs of this step; forgets the requests that finished."""
        outputs = []
        for state in touched:
            out = None
            if state.error is None:
                try:
                    out = state.make_output()
                except Exception as e:  # noqa: BLE001 - e.g. its detokenizer; this request's alone
                    self._fail(state.samples[0].request.request_id, e, {})
            if state.error is not None:
                out = state.make_error_output()
            if out is None:
                continue  # FINAL_ONLY and still running
            outputs.append(out)
            if out.finished:
                self._states.pop(state.request_id, None)
                self._forget([s.request.request_id for s in state.samples])
        return outputs

    def _record_prompt_logprobs(self, result: ModelRunnerOutput, failed: dict[str, RequestState]) -> None:
        for sample_id, lp in result.prompt_logprobs.items():
            entry = self._sample_of.get(sample_id)
            if entry is None or entry[0].error is not None or not len(lp.target_logprobs):
                continue
            positions = range(lp.first_position, lp.first_position + len(lp.target_logprobs))
            try:
                entry[0].add_prompt_logprobs(
                    positions, lp.target_logprobs, lp.target_ranks, lp.topk_token_ids, lp.topk_logprobs
                )
            except Exception as e:  # noqa: BLE001 - this request's fault alone
                self._fail(sample_id, e, failed)
