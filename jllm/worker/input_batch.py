"""Host-side assembly of one step's device inputs from the scheduler's message.

Everything here is plain numpy on the host. The worker's persistent rows
(request_rows.RequestRows) hold each request's tokens, page table and sampling settings,
so a step gathers rows with numpy instead of rebuilding them request by request.
Positions, slot mapping and query offsets are derived for all rows at once and padded
to the step's buckets; the runner packs the result into one transfer (packing.py).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jllm.core.scheduler_output import SchedulerOutput
from jllm.layers.attention_metadata import AttentionMetadata
from jllm.layers.sampler import SamplingMetadata
from jllm.worker.attention_plan import AttentionPlanner
from jllm.worker.buckets import pick_bucket, pow2_buckets
from jllm.worker.request_rows import FLOAT_FIELDS, FLOAT_PADS, NO_LOGPROBS, RequestRows


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelInputs:
    input_ids: jax.Array  # [T] i32
    attn: AttentionMetadata
    logits_indices: jax.Array  # [S] i32: each row's last scheduled token
    # [T] i32: for prompt logprobs, the prompt token that follows each token
    # (-1 where none); width T only when a request asked for prompt logprobs.
    prompt_targets: jax.Array
    # [T] i32: each token's segment (BERT's token types), or [0] for models without them.
    token_type_ids: jax.Array


@dataclasses.dataclass(frozen=True)
class StepShape:
    """The static part of a step: its bucket sizes and which optional outputs it has."""

    num_tokens: int
    num_seqs: int
    num_pages: int
    num_logprobs: int
    num_prompt_logprobs: int
    decode_only: bool = False
    fresh_prefill: bool = False
    prefix_prefill: bool = False


@dataclasses.dataclass(frozen=True)
class PromptLogprobsSlice:
    """A request's prompt logprobs in a step: the prompt positions first_position ..
    first_position + count - 1 (a position's logprob is of the token there, given the
    ones before), at token rows start .. start + count - 1 of the step."""

    req_id: str
    start: int
    first_position: int
    count: int


@dataclasses.dataclass(frozen=True)
class StepBatch:
    """One built step: its device inputs, and which request each row is."""

    shape: StepShape
    inputs: ModelInputs  # numpy
    sampling: SamplingMetadata  # numpy
    req_ids: list[str]  # the step's rows, in order
    rows: np.ndarray  # [n] the persistent row of each
    samples: np.ndarray  # [n] bool: the row's step reaches its last known token, so it samples
    prompt_logprobs: tuple[PromptLogprobsSlice, ...]


def _padded(rows, width_buckets: tuple[int, ...] | None, pad: int, num_rows: int, dtype=np.int32) -> np.ndarray:
    longest = max(map(len, rows), default=0)
    if longest == 0:
        return np.full((num_rows, 0), pad, dtype)
    width = pick_bucket(width_buckets, longest) if width_buckets else longest
    out = np.full((num_rows, width), pad, dtype)
    for i, r in enumerate(rows):
        if len(r):
            out[i, : len(r)] = r
    return out


def _rows_then_pad(values: np.ndarray, num_rows: int, pad) -> np.ndarray:
    """values [n, ...] followed by padding rows up to num_rows."""
    out = np.empty((num_rows,) + values.shape[1:], values.dtype)
    out[: len(values)] = values
    out[len(values) :] = pad
    return out


_LIST_BUCKETS = pow2_buckets(8, 1 << 20)


class InputBatchBuilder:
    def __init__(self, *, planner: AttentionPlanner, page_buckets: tuple[int, ...], max_logprobs: int, vocab_size: int):
        self.planner = planner
        self.block_size = planner.block_size
        self.token_buckets = planner.token_buckets
        self.page_buckets = page_buckets
        self.max_logprobs = max_logprobs
        self.vocab_size = vocab_size
        self.rows = RequestRows(page_buckets[-1], vocab_size, capacity=planner.max_num_seqs)

    def update_states(self, so: SchedulerOutput) -> None:
        """Applies the message's request changes to the rows: finished requests go,
        preempted ones lose their pages, new ones get a row, known ones their new pages."""
        rows = self.rows
        rows.remove(so.finished_req_ids)
        rows.drop_blocks(so.preempted_req_ids)
        for new in so.scheduled_new_reqs:
            rows.add(new)
        cached = so.scheduled_cached_reqs
        row_of = rows.row_of
        for req_id, resumed, new_block_ids in zip(cached.req_ids, cached.resumed_from_preemption, cached.new_block_ids):
            row = row_of[req_id]
            if resumed:
                rows.drop_blocks((req_id,))
            if new_block_ids:
                rows.add_blocks(row, new_block_ids)

    def record_sampled(self, batch: StepBatch, sampled_token_ids: np.ndarray) -> None:
        """Appends the tokens `batch` sampled ([rows] of that step, in order) to their rows,
        so that the next step reads them from the table."""
        samples = batch.samples
        self.rows.record(batch.rows[samples], sampled_token_ids[: len(samples)][samples])

    def build(self, so: SchedulerOutput) -> StepBatch:
        """The step's arrays, for a message whose request changes are applied (update_states)."""
        table = self.rows
        cached = so.scheduled_cached_reqs
        req_ids = cached.req_ids + [new.req_id for new in so.scheduled_new_reqs]
        n = len(req_ids)
        row_idx = np.fromiter(map(table.row_of.__getitem__, req_ids), np.intp, n)
        num_scheduled = np.fromiter(map(so.num_scheduled_tokens.__getitem__, req_ids), np.int32, n)
        computed = np.fromiter(
            (*cached.num_computed_tokens, *(new.num_computed_tokens for new in so.scheduled_new_reqs)), np.int32, n
        )
        ends = np.cumsum(num_scheduled, dtype=np.int32)
        starts = ends - num_scheduled
        seq_lens = computed + num_scheduled
        num_tokens = int(ends[-1])
        T = pick_bucket(self.token_buckets, num_tokens)
        S = self.planner.num_seqs_for(T)
        P = pick_bucket(self.page_buckets, int(table.num_blocks[row_idx].max()))

        # Each token's position: its row's first position plus its offset in the row.
        positions = np.arange(num_tokens, dtype=np.int32) - np.repeat(starts - computed, num_scheduled)
        token_rows = np.repeat(row_idx, num_scheduled)
        input_ids = table.token_ids[token_rows, positions]
        pages = table.block_table[token_rows, positions // self.block_size]
        samples = seq_lens == table.num_tokens[row_idx]
        path = self.planner.plan(n, num_tokens, T, P, int(computed[0]))
        attn = AttentionMetadata(
            positions=_rows_then_pad(positions, T, 0),
            slot_mapping=_rows_then_pad(pages * self.block_size + positions % self.block_size, T, -1),
            block_tables=_rows_then_pad(table.block_table[row_idx, :P], S, 0),
            seq_lens=_rows_then_pad(seq_lens, S, 0),
            query_start_loc=_rows_then_pad(starts, S + 1, num_tokens),
            decode_only=path.decode_only,
            fresh_prefill=path.fresh_prefill,
            prefix_prefill=path.prefix_prefill,
            decode_config=path.decode_config,
        )
        prompt_len = table.prompt_len[row_idx]
        # Prompt logprobs are asked of rows still in their prompt.
        prompt_lp = np.where(computed < prompt_len, table.prompt_logprobs[row_idx], NO_LOGPROBS)
        wanted = np.flatnonzero(prompt_lp != NO_LOGPROBS)
        prompt_slices = tuple(
            PromptLogprobsSlice(
                req_ids[i], int(starts[i]), int(computed[i]) + 1, int(min(seq_lens[i], prompt_len[i] - 1) - computed[i])
            )
            for i in wanted.tolist()
        )
        inputs = ModelInputs(
            input_ids=_rows_then_pad(input_ids, T, 0),
            attn=attn,
            logits_indices=_rows_then_pad(ends - 1, S, 0),
            prompt_targets=self._prompt_targets(prompt_slices, row_idx[wanted], T),
            token_type_ids=np.zeros(0, np.int32),
        )
        # The output position each row samples (for a sampling row, its output count).
        step = np.maximum(seq_lens - prompt_len, 0)
        sampling = self._sampling_metadata(row_idx, step, S)
        shape = StepShape(
            T,
            S,
            P,
            self._logprobs_width(table.logprobs[row_idx]),
            self._logprobs_width(prompt_lp),
            decode_only=path.decode_only,
            fresh_prefill=path.fresh_prefill,
            prefix_prefill=path.prefix_prefill,
        )
        return StepBatch(shape, inputs, sampling, req_ids, row_idx, samples, prompt_slices)

    def _prompt_targets(self, slices: tuple[PromptLogprobsSlice, ...], rows: np.ndarray, T: int) -> np.ndarray:
        """[T] (or [0] when no row asks): the prompt token after each token, -1 where none."""
        if not slices:
            return np.zeros(0, np.int32)
        targets = np.full(T, -1, np.int32)
        for s, row in zip(slices, rows.tolist()):
            targets[s.start : s.start + s.count] = self.rows.token_ids[
                row, s.first_position : s.first_position + s.count
            ]
        return targets

    def _sampling_metadata(self, row_idx: np.ndarray, step: np.ndarray, S: int) -> SamplingMetadata:
        table = self.rows
        floats = np.ascontiguousarray(_rows_then_pad(table.floats[row_idx], S, FLOAT_PADS).T)
        seeds = np.ascontiguousarray(_rows_then_pad(table.seeds[row_idx], S, 0).T)
        none = np.zeros((S, 0), np.int32)
        prompt_ids = output_ids = bias_ids = allowed = banned = none
        bias_values = np.zeros((S, 0), np.float32)
        # The optional parts are built only when some row uses them.
        rows = None
        if table.uses_penalties[row_idx].any():
            rows = row_idx.tolist()
            prompt_ids = _padded([table.prompt_token_ids(r) for r in rows], _LIST_BUCKETS, -1, S)
            output_ids = _padded([table.output_token_ids(r) for r in rows], _LIST_BUCKETS, -1, S)
        if table.has_bias[row_idx].any():
            bias = [table.bias[i] for i in row_idx.tolist()]
            bias_ids = _padded([ids for ids, _ in bias], _LIST_BUCKETS, -1, S)
            bias_values = _padded([values for _, values in bias], _LIST_BUCKETS, 0.0, S, np.float32)
        if table.has_allowed[row_idx].any():
            allowed = _padded([table.settings[i].allowed_token_ids for i in row_idx.tolist()], _LIST_BUCKETS, -1, S)
        if table.may_ban:
            may_ban = table.may_ban
            # Unique ids (stop tokens and bad words may repeat), so the width stays bounded.
            banned = _padded(
                [sorted(set(table.banned_token_ids(r))) if r in may_ban else () for r in (rows or row_idx.tolist())],
                _LIST_BUCKETS,
                -1,
                S,
            )
        return SamplingMetadata(
            **dict(zip(FLOAT_FIELDS, floats)),
            top_k=_rows_then_pad(table.top_k[row_idx], S, 0),
            seed_hi=seeds[0],
            seed_lo=seeds[1],
            step=_rows_then_pad(step, S, 0),
            prompt_token_ids=prompt_ids,
            output_token_ids=output_ids,
            bias_token_ids=bias_ids,
            bias_values=bias_values,
            banned_token_ids=banned,
            allowed_token_ids=allowed,
            has_allowed=_rows_then_pad(table.has_allowed[row_idx], S, False),
        )

    def _logprobs_width(self, requested: np.ndarray) -> int:
        """0 when no row wants logprobs, else one fixed width so the step compiles once."""
        widest = int(requested.max(initial=NO_LOGPROBS))
        if widest == NO_LOGPROBS:
            return 0
        width = max(widest, 1)
        width = width if width > self.max_logprobs else max(self.max_logprobs, 1)
        # --max-logprobs may exceed the vocabulary (vLLM's tests pass 151936 so that -1 is
        # allowed); top-k cannot.
        return min(width, self.vocab_size)
