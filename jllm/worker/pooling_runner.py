"""The pooling model runner: embeddings, classifier outputs and rewards, one jitted call
per engine step, no KV cache.

A pooling request is scheduled once, whole (the scheduler does not chunk for pooling
models), and is done when its step returns, so the runner keeps no state between steps.
The step's prompts lie back to back on the token axis as in generation, padded to a
token bucket; attention runs each sequence over its own tokens (causal for decoders,
bidirectional for encoders) laid out at a length bucket; the hidden states are pooled
per sequence (layers/pooler.py) and the model's head applied. Only the float32 pooled
outputs leave the device, plus every token's where a request asked for token outputs.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import numpy as np
from jax.sharding import Mesh

from jllm.config import PoolerConfig
from jllm.core.scheduler_output import SchedulerOutput
from jllm.distributed.mesh import replicated
from jllm.distributed.step_sync import STOP, StepSync, host_copy
from jllm.layers.attention_metadata import AttentionMetadata
from jllm.layers.pooler import pool
from jllm.worker.buckets import pick_bucket, pow2_buckets
from jllm.worker.model_runner import ModelRunnerOutput
from jllm.worker.packing import PackedLayout, pack, unpack

# Pooling tasks whose output is one vector per token rather than per sequence.
TOKEN_TASKS = frozenset({"token_embed", "token_classify"})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PoolingInputs:
    input_ids: jax.Array  # [T] i32
    attn: AttentionMetadata
    token_type_ids: jax.Array  # [T] i32, or [0] for models without token types


def _pool_step(
    model, num_layers: int, params, constants, packed: jax.Array, *, layout: PackedLayout, pooling_type: str
):
    """Returns (per-sequence outputs [S, out], or None for "ALL" pooling; every token's
    outputs [T, out]), float32. The per-token outputs cost one small head over the hidden
    states and stay on the device unless a request asked for them, so one program serves
    both kinds of request."""
    inputs: PoolingInputs = unpack(packed, layout)
    _, hidden = model.apply(
        params, [None] * num_layers, inputs.input_ids, inputs.attn, constants, inputs.token_type_ids
    )
    head = functools.partial(model.apply, params, method=type(model).pool_head)
    per_seq = None if pooling_type == "ALL" else head(pool(hidden, inputs.attn.query_start_loc, pooling_type))
    return per_seq, head(hidden)


class PoolingModelRunner:
    def __init__(
        self,
        *,
        model,
        params,
        spec,
        constants: dict,
        max_model_len: int,
        max_num_seqs: int,
        token_buckets: tuple[int, ...],
        pooler_config: PoolerConfig,
        uses_token_types: bool,
        mesh: Mesh,
    ):
        self.model = model
        self.params = params
        self.max_num_seqs = max_num_seqs
        self.token_buckets = token_buckets
        self.pooling_type = pooler_config.pooling_type
        self.uses_token_types = uses_token_types
        # The attention layout's length buckets: up to the longest prompt a step can hold.
        longest = min(max_model_len, token_buckets[-1])
        # Every token bucket is a length bucket too, so a step's length bucket never
        # exceeds its token bucket (custom token buckets need not be powers of two).
        self.length_buckets = tuple(
            sorted(set(pow2_buckets(min(16, longest), longest)) | {t for t in token_buckets if t <= longest})
        )
        self.constants = {name: jax.device_put(table, replicated(mesh)) for name, table in constants.items()}
        # Under tensor parallelism GSPMD is free to leave an output split over the mesh (by
        # tokens or features); replicated, the host copies each whole from one device.
        self._step = jax.jit(
            functools.partial(_pool_step, model, spec.num_hidden_layers),
            static_argnames=("layout", "pooling_type"),
            out_shardings=replicated(mesh),
        )
        # Multi-host: process 0 sends each step's inputs to the others (`follow`).
        self.sync = StepSync()

    @property
    def num_compiled_steps(self) -> int:
        return self._step._cache_size()

    def kv_cache_alive(self) -> bool:
        return True  # nothing is donated: a failed step loses no state

    def seq_buckets(self, num_tokens: int, max_seq_len: int) -> tuple[int, ...]:
        """The sequence rows a step of token bucket T and length bucket L may have: as many
        as T tokens can be sequences, or, where the sequences are long enough to fill the
        bucket (T / L of them, as uniform lengths give), that few, so that attention's
        [rows, L] layout is not mostly padding."""
        full = min(num_tokens, self.max_num_seqs)
        fitted = min(full, 1 << (-(-num_tokens // max_seq_len) - 1).bit_length())
        return (fitted, full) if fitted < full else (full,)

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        if so.scheduled_cached_reqs.req_ids:
            raise RuntimeError(
                f"Pooling requests run whole in one step; {so.scheduled_cached_reqs.req_ids} were scheduled again."
            )
        if so.is_empty:
            return ModelRunnerOutput([], {}, {})
        reqs = so.scheduled_new_reqs
        for new in reqs:
            if new.num_computed_tokens or so.num_scheduled_tokens[new.req_id] != len(new.prompt_token_ids):
                raise RuntimeError(f"Pooling request {new.req_id} was not scheduled whole.")
        lengths = np.fromiter((len(new.prompt_token_ids) for new in reqs), np.int32, len(reqs))
        token_outputs = any(new.pooling_task in TOKEN_TASKS for new in reqs)
        inputs = self._inputs([new.prompt_token_ids for new in reqs], [new.token_type_ids for new in reqs], lengths)
        per_seq, per_token = self._run(inputs, token_outputs)
        req_ids = [new.req_id for new in reqs]
        ends = np.cumsum(lengths)
        outputs = {}
        for i, new in enumerate(reqs):
            if new.pooling_task in TOKEN_TASKS or per_seq is None:
                outputs[new.req_id] = per_token[ends[i] - lengths[i] : ends[i]]
            else:
                outputs[new.req_id] = per_seq[i]
        return ModelRunnerOutput(req_ids, {r: i for i, r in enumerate(req_ids)}, {}, pooler_output=outputs)

    def _inputs(self, prompts, token_types, lengths: np.ndarray, T: int | None = None) -> PoolingInputs:
        """The step's arrays, in the smallest token bucket that holds them (or bucket T)."""
        n, total = len(prompts), int(lengths.sum())
        T = T or pick_bucket(self.token_buckets, total)
        L = pick_bucket(self.length_buckets, int(lengths.max()))
        S = pick_bucket(self.seq_buckets(T, L), n)
        starts = np.zeros(S + 1, np.int32)
        np.cumsum(lengths, out=starts[1 : n + 1])
        starts[n + 1 :] = total
        input_ids = np.zeros(T, np.int32)
        input_ids[:total] = np.concatenate(prompts)
        positions = np.zeros(T, np.int32)
        positions[:total] = np.arange(total, dtype=np.int32) - np.repeat(starts[:n], lengths)
        seq_lens = np.zeros(S, np.int32)
        seq_lens[:n] = lengths
        types = np.zeros(T if self.uses_token_types else 0, np.int32)
        if self.uses_token_types:
            for start, length, ids in zip(starts[:n].tolist(), lengths.tolist(), token_types):
                if ids is not None:
                    types[start : start + length] = ids
        attn = AttentionMetadata(
            positions=positions,
            slot_mapping=np.full(T, -1, np.int32),
            block_tables=np.zeros((S, 0), np.int32),
            seq_lens=seq_lens,
            query_start_loc=starts,
            max_seq_len=L,
        )
        return PoolingInputs(input_ids, attn, types)

    def _run(self, inputs: PoolingInputs, token_outputs: bool):
        """The step's outputs on the host: per sequence, and per token where asked for."""
        self.sync.send("step", inputs)
        per_seq, per_token = self._device_step(inputs)
        if per_seq is None or token_outputs:
            return host_copy((per_seq, per_token))
        return host_copy(per_seq), None

    def _device_step(self, inputs: PoolingInputs):
        packed, layout = pack(inputs)
        return self._step(self.params, self.constants, packed, layout=layout, pooling_type=self.pooling_type)

    def shutdown(self) -> None:
        """Multi-host: process 0 releases the other processes (they exit)."""
        self.sync.stop()

    def follow(self) -> None:
        """A process other than 0 of a multi-host run: runs the steps process 0 sends."""
        while True:
            op, args = self.sync.receive()
            if op == STOP:
                return
            self._device_step(*args)

    def step_shapes(self) -> list[tuple[int, int, int]]:
        """Every (tokens, sequences, length) bucket a step can have."""
        return [
            (T, S, L) for T in self.token_buckets for L in self.length_buckets if L <= T for S in self.seq_buckets(T, L)
        ]

    def warmup(self) -> float:
        """Compiles the step for every shape a request can reach; returns seconds."""
        start = time.perf_counter()
        for T, S, L in self.step_shapes():
            # The fewest tokens that make such a step: one sequence just long enough for
            # length bucket L, and single tokens up to more rows than the smaller bucket.
            i = self.length_buckets.index(L)
            longest = self.length_buckets[i - 1] + 1 if i else 1
            fewer = self.seq_buckets(T, L)[0]
            lengths = np.asarray([longest] + [1] * (fewer if S > fewer else 0), np.int32)
            if lengths.sum() > T:
                continue  # no step of T tokens has that many sequences with one that long
            # Every process of a multi-host run warms up itself, so nothing is sent.
            inputs = self._inputs([np.zeros(n, np.int32) for n in lengths], [None] * len(lengths), lengths, T=T)
            jax.block_until_ready(self._device_step(inputs))
        return time.perf_counter() - start
