"""The engine's pooling requests: admitted as one `Request` each (the whole prompt,
scheduled in one step), and finished by the step that returns their pooled output.

They share the scheduler and the step with nothing else: a pooling model serves only
pooling requests (jllm/engine/task_config.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from jllm.config import ModelConfig
from jllm.core.scheduler import Scheduler
from jllm.engine.pooling_output import classifier_activation, postprocess
from jllm.engine.prompts import process_pooling_prompt
from jllm.engine.request import Request, RequestStatus
from jllm.outputs import PoolingOutput, PoolingRequestOutput
from jllm.pooling_params import PoolingParams


@dataclass
class _PoolingState:
    request: Request
    params: PoolingParams
    activation: str


class PoolingRequests:
    def __init__(self, model_config: ModelConfig, hf_config, tokenizer, vocab_size: int, scheduler: Scheduler):
        self.model_config = model_config
        self.hf_config = hf_config
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.scheduler = scheduler
        self._states: dict[str, _PoolingState] = {}
        self._activations: dict[str, str] = {}
        # The tasks a request may name: the model's, and "score" for a cross-encoder.
        self.tasks = model_config.supported_tasks + (("score",) if model_config.is_cross_encoder else ())

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._states

    def __len__(self) -> int:
        return len(self._states)

    def add(self, request_id: str, prompt, params: PoolingParams, arrival_time: float | None = None) -> None:
        model_config = self.model_config
        params = params.clone()
        if params.task is None:
            raise ValueError(f"PoolingParams.task must name the pooling task, one of {list(self.tasks)}.")
        if params.task not in self.tasks:
            raise ValueError(
                f"Task {params.task!r} is not supported by this model; supported tasks: {list(self.tasks)}."
            )
        if params.task == "score" and model_config.num_labels != 1:
            raise ValueError("Score API is only enabled for num_labels == 1.")
        params.verify(params.task, model_config)
        _, prompt_ids, token_types = process_pooling_prompt(
            prompt, params, self.tokenizer, model_config.max_model_len, self.vocab_size
        )
        request = Request(
            request_id=request_id,
            prompt_token_ids=prompt_ids,
            sampling_params=None,
            arrival_time=arrival_time if arrival_time is not None else time.time(),
            max_tokens=0,
            pooling_task=params.task,
            token_type_ids=token_types,
        )
        activation = self._activations.get(params.task)
        if activation is None:  # per task, once: HF config attribute reads are slow
            activation = classifier_activation(self.hf_config, model_config.num_labels, params.task)
            self._activations[params.task] = activation
        self._states[request_id] = _PoolingState(request, params, activation)
        self.scheduler.add_request(request)

    def abort(self, request_id: str) -> bool:
        if self._states.pop(request_id, None) is None:
            return False
        self.scheduler.abort_requests(request_id)
        return True

    def finish(self, pooler_output: dict, now: float) -> list[tuple[Request, PoolingRequestOutput]]:
        """The requests this step pooled, with their outputs; they are done."""
        outputs = []
        for request_id, data in pooler_output.items():
            state = self._states.pop(request_id, None)
            if state is None:
                continue  # aborted while the step ran
            request = state.request
            request.first_token_time = request.last_token_time = request.finished_time = now
            output = PoolingRequestOutput(
                request_id,
                PoolingOutput(postprocess(data, state.params, state.activation)),
                request.prompt_token_ids,
                finished=True,
                num_cached_tokens=max(request.num_cached_tokens, 0),
            )
            outputs.append((request, output))
        # One call: each rebuilds the scheduler's queues.
        self.scheduler.finish_requests([request.request_id for request, _ in outputs], RequestStatus.FINISHED_STOPPED)
        return outputs

    def fail(self, request_id: str, error: BaseException) -> PoolingRequestOutput | None:
        state = self._states.pop(request_id, None)
        if state is None:
            return None
        self.scheduler.finish_requests(request_id, RequestStatus.FINISHED_ERROR)
        return PoolingRequestOutput(
            request_id, PoolingOutput(None), state.request.prompt_token_ids, finished=True, error=error
        )
