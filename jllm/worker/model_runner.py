"""The model runner: weights and KV pool on the device, one jitted call per engine step.

`execute_model` takes the scheduler's one message per step (SchedulerOutput), applies
its request changes to the worker's persistent rows, turns it into bucketed arrays
packed into one buffer (one host-to-device transfer), runs the jitted step (model
forward with the KV pool donated, logits of the rows that sample, on-device sampling)
and brings back only the sampled tokens and any logprobs asked for.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jllm.core.scheduler_output import SchedulerOutput
from jllm.distributed.mesh import replicated
from jllm.distributed.step_sync import STOP, StepSync, host_copy
from jllm.layers.attention_metadata import AttentionMetadata
from jllm.layers.sampler import SamplingMetadata, compute_logprobs, sample
from jllm.worker.attention_plan import AttentionPlanner
from jllm.worker.input_batch import InputBatchBuilder, ModelInputs, StepBatch, StepShape
from jllm.worker.packing import PackedLayout, pack, unpack

logger = logging.getLogger(__name__)


@dataclass
class PromptLogprobs:
    """A request's prompt logprobs from one step: of the prompt tokens at positions
    first_position .. first_position + len - 1."""

    first_position: int
    target_logprobs: np.ndarray  # [len]
    target_ranks: np.ndarray
    topk_token_ids: np.ndarray  # [len, k]
    topk_logprobs: np.ndarray


@dataclass
class ModelRunnerOutput:
    """Host copies of one step's results (vLLM's ModelRunnerOutput)."""

    req_ids: list[str]  # the step's rows, in order
    req_id_to_index: dict[str, int]
    # The token each request that reached its last known token sampled.
    sampled_token_ids: dict[str, int]
    # Per row, where the step computed logprobs ([n, k], [n, k], [n], [n]).
    topk_token_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None
    sampled_logprobs: np.ndarray | None = None
    sampled_ranks: np.ndarray | None = None
    prompt_logprobs: dict[str, PromptLogprobs] = field(default_factory=dict)
    # Requests whose own logits processor raised; they sampled nothing.
    failed: dict[str, BaseException] = field(default_factory=dict)
    # Pooling runs: each request's float32 output, [out] per sequence or [tokens, out].
    pooler_output: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class StepResults:
    """What a step brought to the host, by row: the sampled tokens, compute_logprobs'
    tuples for the sampled rows and the prompt (None where not asked for), and the
    requests whose logits processor raised."""

    sampled: np.ndarray
    logprobs: tuple | None = None
    prompt: tuple | None = None
    failed: dict[str, BaseException] = field(default_factory=dict)


def _forward(model, params, kv_caches, constants, inputs: ModelInputs):
    return model.apply(params, kv_caches, inputs.input_ids, inputs.attn, constants, inputs.token_type_ids)


def _whole(logits, mesh: Mesh):
    """Logits come out of a vocabulary-parallel head split over the mesh; sampling (top-k,
    the Gumbel race over the vocabulary) reads them whole on every device."""
    return jax.lax.with_sharding_constraint(logits, replicated(mesh))


def _step(
    model,
    mesh: Mesh,
    params,
    kv_caches,
    constants,
    packed_inputs: jax.Array,
    *,
    layout: PackedLayout,
    num_logprobs: int,
    num_prompt_logprobs: int,
):
    """(ModelInputs, SamplingMetadata) arrive packed in one int32 buffer (one transfer).

    Returns the pool, the sampled tokens, and the sampled rows' and the prompt's logprobs
    (compute_logprobs' tuples) or None where not asked for, so that only what the host
    reads leaves the device.
    """
    inputs, sampling_md = unpack(packed_inputs, layout)
    kv_caches, hidden = _forward(model, params, kv_caches, constants, inputs)
    logits = _whole(model.apply(params, hidden[inputs.logits_indices], method=type(model).compute_logits), mesh)
    out = sample(logits, sampling_md, num_logprobs=num_logprobs)
    logprobs = prompt = None
    if num_logprobs:
        logprobs = (out.topk_token_ids, out.topk_logprobs, out.sampled_logprobs, out.sampled_ranks)
    if num_prompt_logprobs:
        all_logits = _whole(model.apply(params, hidden, method=type(model).compute_logits), mesh)
        targets = jnp.maximum(inputs.prompt_targets, 0)
        prompt = compute_logprobs(all_logits, targets, num_prompt_logprobs)
    return kv_caches, out.sampled_token_ids, logprobs, prompt


def _forward_logits(model, params, kv_caches, constants, inputs: ModelInputs):
    """The slow path's first half: logits leave the device for host logits_processors."""
    kv_caches, hidden = _forward(model, params, kv_caches, constants, inputs)
    # Whole on every device by the jit's out_shardings.
    return kv_caches, model.apply(params, hidden[inputs.logits_indices], method=type(model).compute_logits)


def _apply_logits_processor(fn, prompt_ids: list[int], output_ids: list[int], logits: np.ndarray) -> np.ndarray:
    """vLLM V0's two signatures, told apart by arity as V0 does: (prompt_ids, output_ids,
    logits) or (output_ids, logits). A TypeError raised inside is then the processor's own."""
    if len(inspect.signature(fn).parameters) == 3:
        return fn(prompt_ids, output_ids, logits)
    return fn(output_ids, logits)


class ModelRunner:
    def __init__(
        self,
        *,
        model,
        params,
        spec,
        kv_caches,
        block_size: int,
        max_num_seqs: int,
        max_logprobs: int,
        constants: dict,
        token_buckets: tuple[int, ...],
        page_buckets: tuple[int, ...],
        mesh: Mesh,
        num_queries_per_kv: int,
        decode_kernel: bool = False,
        fresh_prefill_min_tokens: int | None = None,
    ):
        self.model = model
        self.params = params
        self.spec = spec
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.planner = AttentionPlanner(
            block_size=block_size,
            token_buckets=token_buckets,
            max_num_seqs=max_num_seqs,
            decode_kernel=decode_kernel,
            fresh_prefill_min_tokens=fresh_prefill_min_tokens,
            head_dim=spec.head_dim,
            num_queries_per_kv=num_queries_per_kv,
        )
        self.builder = InputBatchBuilder(
            planner=self.planner, page_buckets=page_buckets, max_logprobs=max_logprobs, vocab_size=spec.vocab_size
        )
        # The family's tables every step reads (rotary cos/sin), on the device once.
        self.constants = {name: jax.device_put(table, replicated(mesh)) for name, table in constants.items()}
        # The pool leaves each step split exactly as it came in (or a step would key a new
        # program on the next); the results come out whole on every device, so that each
        # process of a multi-host run holds a copy to read.
        cache_shardings = jax.tree.map(lambda x: x.sharding, kv_caches)
        whole = replicated(mesh)
        self._step = jax.jit(
            functools.partial(_step, model, mesh),
            static_argnames=("layout", "num_logprobs", "num_prompt_logprobs"),
            donate_argnums=(1,),
            out_shardings=(cache_shardings, whole, whole, whole),
        )
        self._forward_logits = jax.jit(
            functools.partial(_forward_logits, model), donate_argnums=(1,), out_shardings=(cache_shardings, whole)
        )
        self._sample = jax.jit(sample, static_argnames=("num_logprobs",))
        self.seen_shapes: set[StepShape] = set()
        # Multi-host: process 0 sends each step's inputs to the others (`follow`).
        self.sync = StepSync()

    @property
    def num_compiled_steps(self) -> int:
        """Programs compiled for the fused step so far (the no-recompilation test reads it)."""
        return self._step._cache_size()

    def kv_cache_alive(self) -> bool:
        """False once a step that raised had already consumed the donated KV pool."""
        return not any(leaf.is_deleted() for leaf in jax.tree.leaves(self.kv_caches))

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self.builder.update_states(scheduler_output)
        if scheduler_output.is_empty:
            return ModelRunnerOutput([], {}, {})
        batch = self.builder.build(scheduler_output)
        shape = batch.shape
        if shape not in self.seen_shapes:
            logger.debug("Compiling step for %s", shape)
            self.seen_shapes.add(shape)
        with_processors = self.builder.rows.with_processors
        if with_processors and not with_processors.isdisjoint(batch.rows.tolist()):
            result = self._execute_with_processors(batch)
        else:
            result = self.run_step(shape, batch.inputs, batch.sampling, len(batch.req_ids))
        self.builder.record_sampled(batch, result.sampled)
        return self._output(batch, result)

    def run_step(
        self, shape: StepShape, inputs: ModelInputs, sampling_md: SamplingMetadata, num_rows: int
    ) -> StepResults:
        """The fused jitted step on built (numpy) inputs; the results of its first num_rows rows."""
        self.sync.send("step", inputs, sampling_md, shape.num_logprobs, shape.num_prompt_logprobs)
        sampled, logprobs, prompt = self._device_step(
            inputs, sampling_md, shape.num_logprobs, shape.num_prompt_logprobs
        )
        # One device-to-host copy per array the host reads, started together.
        sampled, logprobs, prompt = host_copy((sampled, logprobs, prompt))
        return StepResults(sampled[:num_rows], logprobs, prompt)

    def _device_step(self, inputs: ModelInputs, sampling_md: SamplingMetadata, num_logprobs, num_prompt_logprobs):
        packed, layout = pack((inputs, sampling_md))
        self.kv_caches, sampled, logprobs, prompt = self._step(
            self.params,
            self.kv_caches,
            self.constants,
            packed,
            layout=layout,
            num_logprobs=num_logprobs,
            num_prompt_logprobs=num_prompt_logprobs,
        )
        return sampled, logprobs, prompt

    def shutdown(self) -> None:
        """Multi-host: process 0 releases the other processes (they exit)."""
        self.sync.stop()

    def follow(self) -> None:
        """A process other than 0 of a multi-host run: runs the device steps process 0
        sends, in its order, until it stops."""
        while True:
            op, args = self.sync.receive()
            if op == STOP:
                return
            if op == "step":
                self._device_step(*args)
            else:
                self.kv_caches, _ = self._forward_logits(self.params, self.kv_caches, self.constants, *args)

    def _execute_with_processors(self, batch: StepBatch) -> StepResults:
        shape, rows = batch.shape, self.builder.rows
        self.sync.send("forward_logits", batch.inputs)
        self.kv_caches, logits = self._forward_logits(self.params, self.kv_caches, self.constants, batch.inputs)
        # Sampling after the host's processors runs on this process's devices only.
        logits = np.array(host_copy(logits))
        failed: dict[str, BaseException] = {}
        for i, (req_id, row) in enumerate(zip(batch.req_ids, batch.rows.tolist())):
            processors = rows.settings[row].logits_processors
            if not processors:
                continue
            prompt_ids, output_ids = rows.prompt_token_ids(row).tolist(), rows.output_token_ids(row).tolist()
            try:
                for fn in processors:
                    logits[i] = _apply_logits_processor(fn, prompt_ids, output_ids, logits[i])
            except Exception as e:  # noqa: BLE001 - user code: its request fails, not the step
                failed[req_id] = e
                logits[i] = 0.0
        out = self._sample(jnp.asarray(logits), batch.sampling, num_logprobs=shape.num_logprobs)
        logprobs = None
        if shape.num_logprobs:
            logprobs = (out.topk_token_ids, out.topk_logprobs, out.sampled_logprobs, out.sampled_ranks)
        sampled, logprobs = jax.device_get((out.sampled_token_ids, logprobs))
        return StepResults(sampled[: len(batch.req_ids)], logprobs, None, failed)

    @staticmethod
    def _output(batch: StepBatch, results: StepResults) -> ModelRunnerOutput:
        req_ids, failed = batch.req_ids, results.failed
        n = len(req_ids)
        tokens = results.sampled.tolist()
        result = ModelRunnerOutput(
            req_ids,
            {req_id: i for i, req_id in enumerate(req_ids)},
            {req_id: tokens[i] for i in np.flatnonzero(batch.samples).tolist() if (req_id := req_ids[i]) not in failed},
            failed=failed,
        )
        if results.logprobs is not None:
            (result.topk_token_ids, result.topk_logprobs, result.sampled_logprobs, result.sampled_ranks) = (
                x[:n] for x in results.logprobs
            )
        if results.prompt is not None:
            top_ids, top_lps, target_lps, target_ranks = results.prompt
            for s in batch.prompt_logprobs:
                sl = slice(s.start, s.start + s.count)
                result.prompt_logprobs[s.req_id] = PromptLogprobs(
                    s.first_position, target_lps[sl], target_ranks[sl], top_ids[sl], top_lps[sl]
                )
        return result

    def warmup(self, shapes: list[tuple[int, int]]) -> float:
        """Compiles the step for each (tokens, pages) shape, and its decode-only,
        fresh-prefill and prefix-prefill variants where such steps can land; returns
        seconds."""
        start = time.perf_counter()
        decode_buckets = self.planner.decode_token_buckets()
        fresh_buckets = self.planner.fresh_prefill_token_buckets()
        for num_tokens, num_pages in shapes:
            S = self.planner.num_seqs_for(num_tokens)
            self._compile(num_tokens, S, num_pages)
            if num_tokens in decode_buckets:
                self._compile(num_tokens, S, num_pages, decode_only=True)
            if num_tokens in fresh_buckets:
                self._compile(num_tokens, S, num_pages, fresh_prefill=True)
                self._compile(num_tokens, S, num_pages, prefix_prefill=True)
        return time.perf_counter() - start

    def _compile(
        self,
        T: int,
        S: int,
        P: int,
        *,
        decode_only: bool = False,
        fresh_prefill: bool = False,
        prefix_prefill: bool = False,
    ) -> None:
        i32 = lambda *s: np.zeros(s, np.int32)  # noqa: E731
        f32 = lambda *s: np.zeros(s, np.float32)  # noqa: E731
        u32 = lambda *s: np.zeros(s, np.uint32)  # noqa: E731
        # Slot -1 drops the writes: warm-up must not touch pages a request may own.
        attn = AttentionMetadata(
            i32(T),
            np.full((T,), -1, np.int32),
            i32(S, P),
            i32(S),
            i32(S + 1),
            decode_only=decode_only,
            fresh_prefill=fresh_prefill,
            prefix_prefill=prefix_prefill,
            decode_config=self.planner.decode_config(T, P) if decode_only else None,
        )
        inputs = ModelInputs(i32(T), attn, i32(S), i32(0), i32(0))
        md = SamplingMetadata(
            f32(S),
            i32(S),
            f32(S),
            f32(S),
            u32(S),
            u32(S),
            i32(S),
            f32(S),
            f32(S),
            f32(S),
            i32(S, 0),
            i32(S, 0),
            i32(S, 0),
            f32(S, 0),
            i32(S, 0),
            i32(S, 0),
            np.zeros((S,), bool),
        )
        # Packed as execute_model packs, so the jit cache holds the very program a
        # step of this shape looks up.
        packed, layout = pack((inputs, md))
        self.kv_caches, _, _, _ = self._step(
            self.params,
            self.kv_caches,
            self.constants,
            packed,
            layout=layout,
            num_logprobs=0,
            num_prompt_logprobs=0,
        )
