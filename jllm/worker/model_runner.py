"""The model runner: weights and KV pool on the device, one jitted call per engine step.

`execute_model` turns the scheduler's decision into bucketed arrays packed into one
buffer (one host-to-device transfer), runs the jitted step (model forward with the KV
pool donated, logits of the rows that sample, on-device sampling) and brings back only
the sampled tokens and any logprobs asked for.
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

from jllm.core.scheduler import ScheduledRequest
from jllm.layers.attention_metadata import AttentionMetadata
from jllm.layers.rotary import cos_sin_cache, rope_parameters
from jllm.layers.sampler import SamplingMetadata, compute_logprobs, sample
from jllm.worker.input_batch import InputBatchBuilder, ModelInputs, PackedLayout, StepShape, pack, unpack

logger = logging.getLogger(__name__)


@dataclass
class RunnerOutput:
    """Host copies of one step's results, one row per scheduled request."""
    sampled_token_ids: np.ndarray  # [n]
    topk_token_ids: np.ndarray | None  # [n, k]
    topk_logprobs: np.ndarray | None
    sampled_logprobs: np.ndarray | None  # [n]
    sampled_ranks: np.ndarray | None
    # Per request with prompt logprobs this step: (token slice start, length) into these.
    prompt_topk_ids: np.ndarray | None = None  # [T, k]
    prompt_topk_logprobs: np.ndarray | None = None
    prompt_target_logprobs: np.ndarray | None = None  # [T]
    prompt_target_ranks: np.ndarray | None = None
    # Requests whose own logits processor raised, by request id; their sampled token
    # is meaningless.
    failed: dict[str, BaseException] = field(default_factory=dict)


def _forward(model, params, kv_caches, cos_sin_table, inputs: ModelInputs):
    cos_sin = cos_sin_table[inputs.attn.positions]
    kv_caches, hidden = model.apply(params, kv_caches, inputs.input_ids, cos_sin, inputs.attn)
    return kv_caches, hidden


def _step(model, params, kv_caches, cos_sin_table, packed_inputs: jax.Array, *, layout: PackedLayout,
          num_logprobs: int, num_prompt_logprobs: int):
    """(ModelInputs, SamplingMetadata) arrive packed in one int32 buffer (one transfer).

    Returns the pool, the sampled tokens, and the sampled rows' and the prompt's logprobs
    (compute_logprobs' tuples) or None where not asked for, so that only what the host
    reads leaves the device.
    """
    inputs, sampling_md = unpack(packed_inputs, layout)
    kv_caches, hidden = _forward(model, params, kv_caches, cos_sin_table, inputs)
    logits = model.apply(params, hidden[inputs.logits_indices], method=type(model).compute_logits)
    out = sample(logits, sampling_md, num_logprobs=num_logprobs)
    logprobs = prompt = None
    if num_logprobs:
        logprobs = (out.topk_token_ids, out.topk_logprobs, out.sampled_logprobs, out.sampled_ranks)
    if num_prompt_logprobs:
        all_logits = model.apply(params, hidden, method=type(model).compute_logits)
        targets = jnp.maximum(inputs.prompt_targets, 0)
        prompt = compute_logprobs(all_logits, targets, num_prompt_logprobs)
    return kv_caches, out.sampled_token_ids, logprobs, prompt


def _forward_logits(model, params, kv_caches, cos_sin_table, inputs: ModelInputs):
    """The slow path's first half: logits leave the device for host logits_processors."""
    kv_caches, hidden = _forward(model, params, kv_caches, cos_sin_table, inputs)
    return kv_caches, model.apply(params, hidden[inputs.logits_indices], method=type(model).compute_logits)


def _apply_logits_processor(fn, req, logits: np.ndarray) -> np.ndarray:
    """vLLM V0's two signatures, told apart by arity as V0 does: (prompt_ids, output_ids,
    logits) or (output_ids, logits). A TypeError raised inside is then the processor's own."""
    if len(inspect.signature(fn).parameters) == 3:
        return fn(req.prompt_token_ids, req.output_token_ids, logits)
    return fn(req.output_token_ids, logits)


class ModelRunner:
    def __init__(self, *, model, params, spec, kv_caches, block_size: int, max_model_len: int,
                 max_num_seqs: int, max_logprobs: int, hf_config, token_buckets: tuple[int, ...],
                 page_buckets: tuple[int, ...], decode_kernel: bool = False,
                 fresh_prefill_min_tokens: int | None = None):
        self.model = model
        self.params = params
        self.spec = spec
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.builder = InputBatchBuilder(
            block_size=block_size, token_buckets=token_buckets, max_num_seqs=max_num_seqs,
            page_buckets=page_buckets, max_logprobs=max_logprobs, vocab_size=spec.vocab_size,
            decode_kernel=decode_kernel, fresh_prefill_min_tokens=fresh_prefill_min_tokens,
            head_dim=spec.head_dim, num_queries_per_kv=spec.num_attention_heads // spec.num_key_value_heads,
        )
        table = cos_sin_cache(spec.head_dim, rope_parameters(hf_config),
                              getattr(hf_config, "max_position_embeddings", max_model_len), max_model_len)
        self.cos_sin_table = jnp.asarray(table)
        self._step = jax.jit(
            functools.partial(_step, model),
            static_argnames=("layout", "num_logprobs", "num_prompt_logprobs"),
            donate_argnums=(1,),
        )
        self._forward_logits = jax.jit(functools.partial(_forward_logits, model), donate_argnums=(1,))
        self._sample = jax.jit(sample, static_argnames=("num_logprobs",))
        self.seen_shapes: set[StepShape] = set()

    @property
    def num_compiled_steps(self) -> int:
        """Programs compiled for the fused step so far (the no-recompilation test reads it)."""
        return self._step._cache_size()

    def kv_cache_alive(self) -> bool:
        """False once a step that raised had already consumed the donated KV pool."""
        return not any(leaf.is_deleted() for leaf in jax.tree.leaves(self.kv_caches))

    def remove_requests(self, request_ids) -> None:
        """Forgets requests that finished or were preempted (their persistent rows)."""
        self.builder.remove_requests(request_ids)

    def execute_model(self, rows: list[ScheduledRequest], banned: list[list[int]]) -> RunnerOutput:
        shape, inputs, sampling_md = self.builder.build(rows, banned)
        if shape not in self.seen_shapes:
            logger.debug("Compiling step for %s", shape)
            self.seen_shapes.add(shape)
        if self.builder.rows.with_processors and any(r.request.sampling_params.logits_processors for r in rows):
            result = self._execute_with_processors(rows, shape, inputs, sampling_md)
        else:
            result = self.run_step(shape, inputs, sampling_md, len(rows))
        self.builder.record_sampled(result.sampled_token_ids)
        return result

    def run_step(self, shape: StepShape, inputs: ModelInputs, sampling_md: SamplingMetadata,
                 num_rows: int) -> RunnerOutput:
        """The fused jitted step on built (numpy) inputs; results of the first num_rows rows."""
        packed, layout = pack((inputs, sampling_md))
        self.kv_caches, sampled, logprobs, prompt = self._step(
            self.params, self.kv_caches, self.cos_sin_table, packed, layout=layout,
            num_logprobs=shape.num_logprobs, num_prompt_logprobs=shape.num_prompt_logprobs,
        )
        return self._to_host(sampled, logprobs, prompt, num_rows)

    def _execute_with_processors(self, rows, shape: StepShape, inputs, sampling_md) -> RunnerOutput:
        self.kv_caches, logits = self._forward_logits(self.params, self.kv_caches, self.cos_sin_table, inputs)
        logits = np.array(logits)
        failed: dict[str, BaseException] = {}
        for i, row in enumerate(rows):
            req = row.request
            try:
                for fn in req.sampling_params.logits_processors or ():
                    logits[i] = _apply_logits_processor(fn, req, logits[i])
            except Exception as e:  # noqa: BLE001 - user code: its request fails, not the step
                failed[req.request_id] = e
                logits[i] = 0.0
        out = self._sample(jnp.asarray(logits), sampling_md, num_logprobs=shape.num_logprobs)
        logprobs = None
        if shape.num_logprobs:
            logprobs = (out.topk_token_ids, out.topk_logprobs, out.sampled_logprobs, out.sampled_ranks)
        result = self._to_host(out.sampled_token_ids, logprobs, None, len(rows))
        result.failed = failed
        return result

    @staticmethod
    def _to_host(sampled, logprobs, prompt, n: int) -> RunnerOutput:
        # One device-to-host copy per array the host reads, started together.
        sampled, logprobs, prompt = jax.device_get((sampled, logprobs, prompt))
        result = RunnerOutput(sampled_token_ids=sampled[:n], topk_token_ids=None, topk_logprobs=None,
                              sampled_logprobs=None, sampled_ranks=None)
        if logprobs is not None:
            (result.topk_token_ids, result.topk_logprobs, result.sampled_logprobs,
             result.sampled_ranks) = (x[:n] for x in logprobs)
        if prompt is not None:
            (result.prompt_topk_ids, result.prompt_topk_logprobs, result.prompt_target_logprobs,
             result.prompt_target_ranks) = prompt
        return result

    def warmup(self, shapes: list[tuple[int, int]]) -> float:
        """Compiles the step for each (tokens, pages) shape, and its decode-only,
        fresh-prefill and prefix-prefill variants where such steps can land; returns
        seconds."""
        start = time.perf_counter()
        decode_buckets = self.builder.decode_token_buckets()
        fresh_buckets = self.builder.fresh_prefill_token_buckets()
        for num_tokens, num_pages in shapes:
            S = self.builder.num_seqs_for(num_tokens)
            self._compile(num_tokens, S, num_pages)
            if num_tokens in decode_buckets:
                self._compile(num_tokens, S, num_pages, decode_only=True)
            if num_tokens in fresh_buckets:
                self._compile(num_tokens, S, num_pages, fresh_prefill=True)
                self._compile(num_tokens, S, num_pages, prefix_prefill=True)
        return time.perf_counter() - start

    def _compile(self, T: int, S: int, P: int, *, decode_only: bool = False, fresh_prefill: bool = False,
                 prefix_prefill: bool = False) -> None:
        i32 = lambda *s: np.zeros(s, np.int32)  # noqa: E731
        f32 = lambda *s: np.zeros(s, np.float32)  # noqa: E731
        u32 = lambda *s: np.zeros(s, np.uint32)  # noqa: E731
        # Slot -1 drops the writes: warm-up must not touch pages a request may own.
        attn = AttentionMetadata(i32(T), np.full((T,), -1, np.int32), i32(S, P), i32(S), i32(S + 1),
                                 decode_only=decode_only, fresh_prefill=fresh_prefill, prefix_prefill=prefix_prefill,
                                 decode_config=self.builder.decode_config(T, P) if decode_only else None)
        inputs = ModelInputs(i32(T), attn, i32(S), i32(0))
        md = SamplingMetadata(f32(S), i32(S), f32(S), f32(S), u32(S), u32(S), i32(S), f32(S), f32(S), f32(S),
                              i32(S, 0), i32(S, 0), i32(S, 0), f32(S, 0), i32(S, 0), i32(S, 0),
                              np.zeros((S,), bool))
        # Packed as execute_model packs, so the jit cache holds the very program a
        # step of this shape looks up.
        packed, layout = pack((inputs, md))
        self.kv_caches, _, _, _ = self._step(
            self.params, self.kv_caches, self.cos_sin_table, packed, layout=layout,
            num_logprobs=0, num_prompt_logprobs=0,
        )
