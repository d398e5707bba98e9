"""Host-side assembly of one step's device inputs from the scheduled requests.

Everything here is plain numpy on the host. Each running request keeps a row of
persistent state (its tokens, page table and fixed sampling settings: vLLM's InputBatch
and BlockTable), so a step gathers rows with numpy instead of rebuilding them request by
request. Positions, slot mapping and query offsets are derived for all rows at once,
padded to the step's buckets, and packed into one int32 buffer: one host-to-device
transfer per step, unpacked by static slices inside the jitted step.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

import jax
import numpy as np

from jllm.core.scheduler import ScheduledRequest
from jllm.layers.attention_metadata import AttentionMetadata
from jllm.layers.sampler import SamplingMetadata
from jllm.worker.buckets import pick_bucket, pow2_buckets
from pallas_kernels import DecodeConfig, decode_config

_UINT32 = (1 << 32) - 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# A row's logprobs setting when it asked for none.
_NO_LOGPROBS = -1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelInputs:
    input_ids: jax.Array  # [T] i32
    attn: AttentionMetadata
    logits_indices: jax.Array  # [S] i32: each row's last scheduled token
    # [T] i32: for prompt logprobs, the prompt token that follows each token
    # (-1 where none); width T only when a request asked for prompt logprobs.
    prompt_targets: jax.Array


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


# ----- one transfer per step ----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """Where each array of a packed pytree lies in its int32 buffer; static (hashable),
    so it is part of the jit key exactly as the arrays' shapes were."""
    treedef: Any
    leaves: tuple[tuple[tuple[int, ...], np.dtype], ...]  # (shape, dtype) of each leaf


def pack(tree) -> tuple[np.ndarray, PackedLayout]:
    """A pytree of 4-byte and bool numpy arrays -> one int32 buffer and its layout."""
    leaves, treedef = jax.tree.flatten(tree)
    layout = PackedLayout(treedef, tuple((x.shape, x.dtype) for x in leaves))
    return np.concatenate([_as_int32(x) for x in leaves]), layout


def _as_int32(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x).reshape(-1)
    if x.dtype == np.bool_:
        return x.astype(np.int32)
    if x.dtype.itemsize != 4:
        raise TypeError(f"pack takes 4-byte or bool arrays, got {x.dtype}")
    return x.view(np.int32)  # float32 and uint32 travel as their bits


def unpack(buffer: jax.Array, layout: PackedLayout):
    """Inverse of `pack`, inside jit: static slices of the buffer, bitcast back."""
    leaves, offset = [], 0
    for shape, dtype in layout.leaves:
        size = math.prod(shape)
        x = buffer[offset:offset + size].reshape(shape)
        offset += size
        if dtype == np.bool_:
            x = x != 0
        elif dtype != np.int32:
            x = jax.lax.bitcast_convert_type(x, dtype)
        leaves.append(x)
    return jax.tree.unflatten(layout.treedef, leaves)


# ----- persistent per-request rows ----------------------------------------------------

# SamplingMetadata's float fields, kept side by side, and their values in a padding row.
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty")
_FLOAT_PADS = np.asarray([0.0, 1.0, 0.0, 0.0, 0.0, 1.0], np.float32)


class RequestRows:
    """One row of host state per running request, kept across steps.

    A row holds what a step would otherwise rebuild from Python lists every time: the
    request's tokens, its page table (extended as pages are added) and its sampling
    settings (fixed for its life). A row is (re)filled when the scheduler says the
    request is new or resumed from preemption, and freed by `remove`. In between, the
    only tokens a request gains are the ones the runner samples for it, and the runner
    writes those in with `record` (vLLM's InputBatch.token_ids_cpu).
    """

    def __init__(self, max_pages: int, vocab_size: int, capacity: int = 64):
        self.vocab_size = vocab_size
        self.row_of: dict[str, int] = {}
        self._free: list[int] = []
        # Requests with host logits processors (the runner's slow path), so that a step
        # without any need not look.
        self.with_processors: set[str] = set()
        # Row-indexed arrays: (name, shape of one row, dtype, value of an empty row).
        self._columns = (
            ("block_table", (max_pages,), np.int32, 0),
            ("floats", (len(_FLOAT_FIELDS),), np.float32, 0.0),
            ("top_k", (), np.int32, 0),
            ("seeds", (2,), np.uint32, 0),  # the 64-bit seed's high and low halves
            ("prompt_len", (), np.int32, 0),
            # Widths asked for (the vocabulary for -1), _NO_LOGPROBS for none.
            ("logprobs", (), np.int32, _NO_LOGPROBS),
            ("prompt_logprobs", (), np.int32, _NO_LOGPROBS),
            ("uses_penalties", (), bool, False),
            ("has_bias", (), bool, False),
            ("has_allowed", (), bool, False),
        )
        for name, shape, dtype, fill in self._columns:
            setattr(self, name, np.full((0,) + shape, fill, dtype))
        self.token_ids = np.zeros((0, 0), np.int32)  # [rows, tokens], widened as needed
        self.num_blocks: list[int] = []
        self.bias: list[tuple[list[int], list[float]]] = []
        self.allowed: list[list[int]] = []
        self._grow(capacity)

    def sync(self, scheduled: ScheduledRequest) -> int:
        """The request's row, (re)filled if new and its page table brought up to date."""
        row = self.row_of.get(scheduled.request.request_id)
        if row is None or scheduled.is_new or scheduled.resumed_from_preemption:
            return self._fill(scheduled, row)
        if len(scheduled.block_ids) != self.num_blocks[row]:
            self._write_blocks(row, scheduled.block_ids)
        return row

    def record(self, rows: np.ndarray, positions: np.ndarray, token_ids: np.ndarray) -> None:
        """Writes sampled tokens at their positions."""
        if rows.size:
            self._widen_tokens(int(positions.max()) + 1)
            self.token_ids[rows, positions] = token_ids

    def remove(self, request_ids) -> None:
        for request_id in request_ids:
            row = self.row_of.pop(request_id, None)
            if row is not None:
                self._free.append(row)
                self.with_processors.discard(request_id)

    def _fill(self, scheduled: ScheduledRequest, row: int | None) -> int:
        req = scheduled.request
        if row is None:
            if not self._free:
                self._grow(2 * len(self.num_blocks))
            row = self._free.pop()
            self.row_of[req.request_id] = row
        p = req.sampling_params
        if p.logits_processors:
            self.with_processors.add(req.request_id)
        else:
            self.with_processors.discard(req.request_id)
        # Finite but past float32 (a repetition_penalty of 1e300 is valid) would turn to inf
        # here, and the penalty's 0 * inf to NaN: such values stop at float32's largest.
        self.floats[row] = np.clip([getattr(p, name) for name in _FLOAT_FIELDS], -_FLOAT32_MAX, _FLOAT32_MAX)
        # A top_k of the vocabulary or more keeps every token, as 0 does, and would
        # overflow the step's int32 row.
        self.top_k[row] = p.top_k if p.top_k < self.vocab_size else 0
        self.seeds[row] = [(req.seed >> 32) & _UINT32, req.seed & _UINT32]
        self.prompt_len[row] = req.num_prompt_tokens
        self.logprobs[row] = self._width(p.logprobs)
        self.prompt_logprobs[row] = self._width(p.prompt_logprobs)
        self.uses_penalties[row] = (p.presence_penalty != 0 or p.frequency_penalty != 0
                                    or p.repetition_penalty != 1)
        bias = sorted((p.logit_bias or {}).items())
        self.bias[row] = ([t for t, _ in bias], [v for _, v in bias])
        self.has_bias[row] = bool(bias)
        # Unique ids: a list of repeats must not outgrow the largest list bucket.
        self.allowed[row] = sorted(set(p.allowed_token_ids or ()))
        self.has_allowed[row] = bool(self.allowed[row])
        self._widen_tokens(req.num_tokens)
        self.token_ids[row, :req.num_tokens] = req.all_token_ids
        self.block_table[row] = 0
        self.num_blocks[row] = 0
        self._write_blocks(row, scheduled.block_ids)
        return row

    def _width(self, requested: int | None) -> int:
        if requested is None:
            return _NO_LOGPROBS
        return self.vocab_size if requested == -1 else requested

    def _write_blocks(self, row: int, block_ids: list[int]) -> None:
        # Pages are only appended while a request holds them (a preempted request starts
        # over and comes back marked resumed), so only the new tail is written.
        have, num = self.num_blocks[row], len(block_ids)
        if num < have:
            self.block_table[row] = 0
            have = 0
        self.block_table[row, have:num] = block_ids[have:]
        self.num_blocks[row] = num

    def _widen_tokens(self, width: int) -> None:
        if width > self.token_ids.shape[1]:
            wider = np.zeros((len(self.token_ids), max(width, 2 * self.token_ids.shape[1], 1024)), np.int32)
            wider[:, :self.token_ids.shape[1]] = self.token_ids
            self.token_ids = wider

    def _grow(self, capacity: int) -> None:
        old = len(self.num_blocks)
        extra = capacity - old
        for name, shape, dtype, fill in self._columns:
            setattr(self, name, np.concatenate([getattr(self, name), np.full((extra,) + shape, fill, dtype)]))
        self.token_ids = np.concatenate([self.token_ids, np.zeros((extra, self.token_ids.shape[1]), np.int32)])
        self.num_blocks += [0] * extra
        self.bias += [([], [])] * extra
        self.allowed += [[]] * extra
        self._free.extend(reversed(range(old, capacity)))


# ----- the step's arrays --------------------------------------------------------------

def _padded(rows: list[list[int]], width_buckets: tuple[int, ...] | None, pad: int, num_rows: int,
            dtype=np.int32) -> np.ndarray:
    longest = max(map(len, rows), default=0)
    if longest == 0:
        return np.full((num_rows, 0), pad, dtype)
    width = pick_bucket(width_buckets, longest) if width_buckets else longest
    out = np.full((num_rows, width), pad, dtype)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = r
    return out


def _rows_then_pad(values: np.ndarray, num_rows: int, pad) -> np.ndarray:
    """values [n, ...] followed by padding rows up to num_rows."""
    out = np.empty((num_rows,) + values.shape[1:], values.dtype)
    out[:len(values)] = values
    out[len(values):] = pad
    return out


_LIST_BUCKETS = pow2_buckets(8, 1 << 20)
# Field readers for map(): cheaper per row than a generator expression.
_num_scheduled_tokens = operator.attrgetter("num_scheduled_tokens")
_num_computed_tokens = operator.attrgetter("num_computed_tokens")
_block_ids = operator.attrgetter("block_ids")
_sample = operator.attrgetter("sample")


# A prefix-prefill step gathers K/V over the page table's whole width, per layer (XLA
# wants a static width), then runs cuDNN at ~450 TFLOP/s where the paged kernel runs at
# ~240 (H100, BUILD_NOTES.md, session 7). The gather moves 8 * kv_heads * head_dim bytes
# per table token (K and V in 16 bits, read and written) at ~2.6 TB/s; cuDNN saves
# 4 * q_heads * head_dim * (1/240e12 - 1/450e12) s per (query, key) pair. So the path
# pays while the table is narrower than 2.5e-3 * (q_heads / kv_heads) tokens per pair
# the chunk attends to: a 512-token chunk over 512 cached tokens of a Llama stops paying
# at a 3.9k-token table, a 2048-token chunk over 2048 at 63k. Half that, for margin.
PREFIX_PREFILL_TABLE_TOKENS_PER_PAIR = 1.25e-3


class InputBatchBuilder:
    def __init__(self, *, block_size: int, token_buckets, max_num_seqs: int, page_buckets, max_logprobs: int,
                 vocab_size: int, decode_kernel: bool = False, fresh_prefill_min_tokens: int | None = None,
                 head_dim: int = 128, num_queries_per_kv: int = 1):
        self.block_size = block_size
        self.head_dim = head_dim  # The decode kernel's configs are tuned per head_dim.
        self.num_queries_per_kv = num_queries_per_kv  # Sizes what prefix prefill saves.
        # Whether steps whose every row has one query token are marked decode-only,
        # for the attention backend's split-K decode kernel.
        self.decode_kernel = decode_kernel
        # Token buckets from which a step that is one sequence's prompt chunk is marked
        # fresh-prefill (its first chunk) or prefix-prefill (a later one, or one after a
        # prefix-cache hit), both run by cuDNN's flash attention; None: never. Small
        # buckets keep the paged kernel: the gain is in long prompts, and each marked
        # bucket is two more programs to compile.
        self.fresh_prefill_min_tokens = fresh_prefill_min_tokens
        self.token_buckets = token_buckets
        self.max_num_seqs = max_num_seqs
        self.page_buckets = page_buckets
        self.max_logprobs = max_logprobs
        self.vocab_size = vocab_size
        self.rows = RequestRows(page_buckets[-1], vocab_size, capacity=max_num_seqs)
        self._sampled_at = (np.zeros(0, np.intp), np.zeros(0, np.int32), np.zeros(0, bool))

    def num_seqs_for(self, num_tokens: int) -> int:
        """The sequence axis follows the token bucket (every row has at least one token),
        so a step's shape is fixed by its token and page buckets alone."""
        return min(num_tokens, self.max_num_seqs)

    def decode_token_buckets(self) -> tuple[int, ...]:
        """The token buckets a decode-only step can land in (one token per row)."""
        if not self.decode_kernel:
            return ()
        largest = pick_bucket(self.token_buckets, min(self.max_num_seqs, self.token_buckets[-1]))
        return tuple(t for t in self.token_buckets if t <= largest)

    def decode_config(self, num_tokens: int, num_pages: int) -> DecodeConfig:
        """The decode kernel's config (kv splits, launch settings) for a decode-only step
        of token bucket `num_tokens` and page-table width `num_pages`: the kernel's table
        at the smallest batch that lands in the bucket, and the width's context.

        The padded batch would mislead the table: a lone sequence decodes in the
        smallest bucket (16 rows by default), whose table row gives 1 split, and one
        program per kv head then walks the whole context (1 x 8192 d128 on the H100:
        184 us against 19 us with 32 splits). Over-splitting costs far less: in the same
        sweep, batch 8 lost at most 16 % to 32 splits (8 x 2048 d128: 36.7 against
        31.5 us). Fixed per bucket, so it adds no compiled program.
        """
        buckets = self.decode_token_buckets()
        smaller = [t for t in buckets if t < num_tokens]
        smallest_batch = min(smaller[-1] + 1 if smaller else 1, self.num_seqs_for(num_tokens))
        return decode_config(smallest_batch, num_pages * self.block_size, self.head_dim)

    def _prefix_prefill_pays(self, num_pages: int, cached: int, num_tokens: int) -> bool:
        """Whether a chunk of `num_tokens` over `cached` tokens gains more from cuDNN than
        its gather of `num_pages` pages of K/V costs (PREFIX_PREFILL_TABLE_TOKENS_PER_PAIR)."""
        pairs = num_tokens * (cached + num_tokens / 2)
        limit = PREFIX_PREFILL_TABLE_TOKENS_PER_PAIR * self.num_queries_per_kv * pairs
        return num_pages * self.block_size <= limit

    def fresh_prefill_token_buckets(self) -> tuple[int, ...]:
        """The token buckets a fresh-prefill or prefix-prefill step can land in."""
        if self.fresh_prefill_min_tokens is None:
            return ()
        return tuple(t for t in self.token_buckets if t >= self.fresh_prefill_min_tokens)

    def remove_requests(self, request_ids) -> None:
        """Frees the rows of requests that finished or were preempted."""
        self.rows.remove(request_ids)

    def record_sampled(self, sampled_token_ids: np.ndarray) -> None:
        """Writes the tokens the last built step sampled ([rows] of that step, in order)
        into the sampling rows, so that the next step reads them from the table."""
        rows, positions, samples = self._sampled_at
        self.rows.record(rows, positions, sampled_token_ids[:len(samples)][samples])

    def build(self, rows: list[ScheduledRequest], banned: list[list[int]]):
        """Returns (StepShape, ModelInputs as numpy, SamplingMetadata as numpy)."""
        n = len(rows)
        row_idx = np.fromiter(map(self.rows.sync, rows), np.intp, n)
        num_scheduled = np.fromiter(map(_num_scheduled_tokens, rows), np.int32, n)
        computed = np.fromiter(map(_num_computed_tokens, rows), np.int32, n)
        ends = np.cumsum(num_scheduled, dtype=np.int32)
        starts = ends - num_scheduled
        seq_lens = computed + num_scheduled
        num_tokens = int(ends[-1])
        T = pick_bucket(self.token_buckets, num_tokens)
        S = self.num_seqs_for(T)
        P = pick_bucket(self.page_buckets, max(map(len, map(_block_ids, rows))))

        # Each token's position: its row's first position plus its offset in the row.
        positions = np.arange(num_tokens, dtype=np.int32) - np.repeat(starts - computed, num_scheduled)
        token_rows = np.repeat(row_idx, num_scheduled)
        input_ids = self.rows.token_ids[token_rows, positions]
        pages = self.rows.block_table[token_rows, positions // self.block_size]
        # Where this step's sampled tokens go, for record_sampled.
        samples = np.fromiter(map(_sample, rows), bool, n)
        self._sampled_at = (row_idx[samples], seq_lens[samples], samples)
        decode_only = self.decode_kernel and num_tokens == n
        # A lone sequence's prompt chunk in a large enough bucket runs flash attention
        # (cuDNN): alone if it is the prompt's first, else over its cached prefix too.
        lone_prefill = (self.fresh_prefill_min_tokens is not None and n == 1 and not decode_only
                        and T >= self.fresh_prefill_min_tokens)
        fresh_prefill = lone_prefill and int(computed[0]) == 0
        prefix_prefill = (lone_prefill and int(computed[0]) > 0
                          and self._prefix_prefill_pays(P, int(computed[0]), num_tokens))
        attn = AttentionMetadata(
            positions=_rows_then_pad(positions, T, 0),
            slot_mapping=_rows_then_pad(pages * self.block_size + positions % self.block_size, T, -1),
            block_tables=_rows_then_pad(self.rows.block_table[row_idx, :P], S, 0),
            seq_lens=_rows_then_pad(seq_lens, S, 0),
            query_start_loc=_rows_then_pad(starts, S + 1, num_tokens),
            decode_only=decode_only,
            fresh_prefill=fresh_prefill,
            prefix_prefill=prefix_prefill,
            decode_config=self.decode_config(T, P) if decode_only else None,
        )
        prompt_len = self.rows.prompt_len[row_idx]
        # Prompt logprobs are asked of rows still in their prompt.
        prompt_lp = np.where(computed < prompt_len, self.rows.prompt_logprobs[row_idx], _NO_LOGPROBS)
        inputs = ModelInputs(
            input_ids=_rows_then_pad(input_ids, T, 0),
            attn=attn,
            logits_indices=_rows_then_pad(ends - 1, S, 0),
            prompt_targets=self._prompt_targets(rows, prompt_lp != _NO_LOGPROBS, starts, T),
        )
        # The output position each row samples (for a sampling row, its output count).
        step = np.maximum(seq_lens - prompt_len, 0)
        sampling = self._sampling_metadata(rows, row_idx, step, banned, S)
        shape = StepShape(T, S, P, self._logprobs_width(self.rows.logprobs[row_idx]),
                          self._logprobs_width(prompt_lp), decode_only=decode_only,
                          fresh_prefill=fresh_prefill, prefix_prefill=prefix_prefill)
        return shape, inputs, sampling

    def _prompt_targets(self, rows: list[ScheduledRequest], wanted: np.ndarray, starts: np.ndarray,
                        T: int) -> np.ndarray:
        """[T] (or [0] when no row asks): the prompt token after each token, -1 where none."""
        if not wanted.any():
            return np.zeros(0, np.int32)
        targets = np.full(T, -1, np.int32)
        for i in np.flatnonzero(wanted).tolist():
            row, start = rows[i], int(starts[i])
            req, n = row.request, row.num_scheduled_tokens
            nxt = np.arange(row.num_computed_tokens + 1, row.num_computed_tokens + n + 1)
            prompt_ids = np.asarray(req.prompt_token_ids, np.int32)
            in_prompt = nxt < len(prompt_ids)
            targets[start:start + n] = np.where(in_prompt, prompt_ids[np.minimum(nxt, len(prompt_ids) - 1)], -1)
        return targets

    def _sampling_metadata(self, rows: list[ScheduledRequest], row_idx: np.ndarray, step: np.ndarray,
                           banned: list[list[int]], S: int) -> SamplingMetadata:
        table = self.rows
        floats = np.ascontiguousarray(_rows_then_pad(table.floats[row_idx], S, _FLOAT_PADS).T)
        seeds = np.ascontiguousarray(_rows_then_pad(table.seeds[row_idx], S, 0).T)
        none = np.zeros((S, 0), np.int32)
        prompt_ids = output_ids = bias_ids = allowed = none
        bias_values = np.zeros((S, 0), np.float32)
        # The optional parts are built only when some row uses them.
        if table.uses_penalties[row_idx].any():
            prompt_ids = _padded([r.request.prompt_token_ids for r in rows], _LIST_BUCKETS, -1, S)
            output_ids = _padded([r.request.output_token_ids for r in rows], _LIST_BUCKETS, -1, S)
        if table.has_bias[row_idx].any():
            bias = [table.bias[i] for i in row_idx.tolist()]
            bias_ids = _padded([ids for ids, _ in bias], _LIST_BUCKETS, -1, S)
            bias_values = _padded([values for _, values in bias], _LIST_BUCKETS, 0.0, S, np.float32)
        if table.has_allowed[row_idx].any():
            allowed = _padded([table.allowed[i] for i in row_idx.tolist()], _LIST_BUCKETS, -1, S)
        return SamplingMetadata(
            **dict(zip(_FLOAT_FIELDS, floats)),
            top_k=_rows_then_pad(table.top_k[row_idx], S, 0),
            seed_hi=seeds[0],
            seed_lo=seeds[1],
            step=_rows_then_pad(step, S, 0),
            prompt_token_ids=prompt_ids,
            output_token_ids=output_ids,
            bias_token_ids=bias_ids,
            bias_values=bias_values,
            # Unique ids (stop tokens and bad words may repeat), so the width stays bounded.
            banned_token_ids=_padded([b if len(b) < 2 else sorted(set(b)) for b in banned], _LIST_BUCKETS, -1, S),
            allowed_token_ids=allowed,
            has_allowed=_rows_then_pad(table.has_allowed[row_idx], S, False),
        )

    def _logprobs_width(self, requested: np.ndarray) -> int:
        """0 when no row wants logprobs, else one fixed width so the step compiles once."""
        widest = int(requested.max(initial=_NO_LOGPROBS))
        if widest == _NO_LOGPROBS:
            return 0
        width = max(widest, 1)
        width = width if width > self.max_logprobs else max(self.max_logprobs, 1)
        # --max-logprobs may exceed the vocabulary (vLLM's tests pass 151936 so that -1 is
        # allowed); top-k cannot.
        return min(width, self.vocab_size)
