"""Host-side assembly of one step's device inputs from the scheduled requests.

Everything here is plain numpy on the host: the page tables, positions and slot
mapping are derived from each request's block_ids and num_computed_tokens, padded
to the step's buckets, and shipped to the device in one transfer.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jllm.core.scheduler import ScheduledRequest
from jllm.layers.attention_metadata import AttentionMetadata
from jllm.layers.sampler import SamplingMetadata
from jllm.worker.buckets import pick_bucket, pow2_buckets

_UINT32 = (1 << 32) - 1


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


def _padded(rows: list[list[int]], width_buckets: tuple[int, ...] | None, pad: int, num_rows: int,
            dtype=np.int32) -> np.ndarray:
    longest = max((len(r) for r in rows), default=0)
    if longest == 0:
        width = 0
    else:
        width = pick_bucket(width_buckets, longest) if width_buckets else longest
    out = np.full((num_rows, width), pad, dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


_LIST_BUCKETS = pow2_buckets(8, 1 << 20)


class InputBatchBuilder:
    def __init__(self, *, block_size: int, token_buckets, max_num_seqs: int, page_buckets, max_logprobs: int,
                 vocab_size: int, decode_kernel: bool = False):
        self.block_size = block_size
        # Whether steps whose every row has one query token are marked decode-only,
        # for the attention backend's split-K decode kernel.
        self.decode_kernel = decode_kernel
        self.token_buckets = token_buckets
        self.max_num_seqs = max_num_seqs
        self.page_buckets = page_buckets
        self.max_logprobs = max_logprobs
        self.vocab_size = vocab_size

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

    def build(self, rows: list[ScheduledRequest], banned: list[list[int]]):
        """Returns (StepShape, ModelInputs as numpy, SamplingMetadata as numpy)."""
        bs = self.block_size
        num_tokens = sum(r.num_scheduled_tokens for r in rows)
        T = pick_bucket(self.token_buckets, num_tokens)
        S = self.num_seqs_for(T)
        max_pages = max(len(r.block_ids) for r in rows)
        P = pick_bucket(self.page_buckets, max_pages)

        input_ids = np.zeros(T, np.int32)
        positions = np.zeros(T, np.int32)
        slot_mapping = np.full(T, -1, np.int32)
        block_tables = np.zeros((S, P), np.int32)
        seq_lens = np.zeros(S, np.int32)
        query_start_loc = np.full(S + 1, num_tokens, np.int32)
        logits_indices = np.zeros(S, np.int32)
        want_prompt_lp = any(
            r.request.sampling_params.prompt_logprobs is not None
            and r.num_computed_tokens < r.request.num_prompt_tokens
            for r in rows
        )
        prompt_targets = np.full(T if want_prompt_lp else 0, -1, np.int32)

        start = 0
        for i, row in enumerate(rows):
            req, n = row.request, row.num_scheduled_tokens
            done = row.num_computed_tokens
            tokens = req.all_token_ids
            pos = np.arange(done, done + n, dtype=np.int32)
            blocks = np.asarray(row.block_ids, np.int32)
            input_ids[start:start + n] = tokens[done:done + n]
            positions[start:start + n] = pos
            slot_mapping[start:start + n] = blocks[pos // bs] * bs + pos % bs
            block_tables[i, : len(blocks)] = blocks[:P]
            seq_lens[i] = done + n
            query_start_loc[i] = start
            logits_indices[i] = start + n - 1
            if want_prompt_lp and req.sampling_params.prompt_logprobs is not None:
                nxt = pos + 1
                in_prompt = nxt < req.num_prompt_tokens
                prompt_ids = np.asarray(req.prompt_token_ids, np.int32)
                prompt_targets[start:start + n] = np.where(in_prompt, prompt_ids[np.minimum(nxt, len(prompt_ids) - 1)], -1)
            start += n
        query_start_loc[len(rows):] = num_tokens

        decode_only = self.decode_kernel and all(r.num_scheduled_tokens == 1 for r in rows)
        attn = AttentionMetadata(positions, slot_mapping, block_tables, seq_lens, query_start_loc, decode_only)
        inputs = ModelInputs(input_ids, attn, logits_indices, prompt_targets)
        sampling, shape_flags = self._sampling_metadata(rows, banned, S)
        shape = StepShape(T, S, P, *shape_flags, decode_only=decode_only)
        return shape, inputs, sampling

    def _sampling_metadata(self, rows: list[ScheduledRequest], banned: list[list[int]], S: int):
        n = len(rows)
        params = [r.request.sampling_params for r in rows]
        f32 = lambda vals, fill: np.asarray(list(vals) + [fill] * (S - n), np.float32)  # noqa: E731
        temperature = f32((p.temperature for p in params), 0.0)
        seeds = [r.request.seed for r in rows]
        seed_hi = np.asarray([(s >> 32) & _UINT32 for s in seeds] + [0] * (S - n), np.uint32)
        seed_lo = np.asarray([s & _UINT32 for s in seeds] + [0] * (S - n), np.uint32)
        step = np.asarray([r.request.num_output_tokens for r in rows] + [0] * (S - n), np.int32)
        use_penalties = any(
            p.presence_penalty != 0 or p.frequency_penalty != 0 or p.repetition_penalty != 1 for p in params
        )
        if use_penalties:
            prompt_ids = _padded([r.request.prompt_token_ids for r in rows], _LIST_BUCKETS, -1, S)
            output_ids = _padded([r.request.output_token_ids for r in rows], _LIST_BUCKETS, -1, S)
        else:
            prompt_ids = output_ids = np.zeros((S, 0), np.int32)
        bias = [sorted((p.logit_bias or {}).items()) for p in params]
        bias_ids = _padded([[t for t, _ in b] for b in bias], _LIST_BUCKETS, -1, S)
        bias_vals = _padded([[v for _, v in b] for b in bias], _LIST_BUCKETS, 0.0, S, np.float32)
        allowed = [list(p.allowed_token_ids or []) for p in params]
        md = SamplingMetadata(
            temperature=temperature,
            top_k=np.asarray([p.top_k for p in params] + [0] * (S - n), np.int32),
            top_p=f32((p.top_p for p in params), 1.0),
            min_p=f32((p.min_p for p in params), 0.0),
            seed_hi=seed_hi,
            seed_lo=seed_lo,
            step=step,
            presence_penalty=f32((p.presence_penalty for p in params), 0.0),
            frequency_penalty=f32((p.frequency_penalty for p in params), 0.0),
            repetition_penalty=f32((p.repetition_penalty for p in params), 1.0),
            prompt_token_ids=prompt_ids,
            output_token_ids=output_ids,
            bias_token_ids=bias_ids,
            bias_values=bias_vals,
            banned_token_ids=_padded(banned, _LIST_BUCKETS, -1, S),
            allowed_token_ids=_padded(allowed, _LIST_BUCKETS, -1, S),
            has_allowed=np.asarray([bool(a) for a in allowed] + [False] * (S - n), bool),
        )
        num_logprobs = self._logprobs_width([p.logprobs for p in params])
        num_prompt_logprobs = self._logprobs_width(
            [p.prompt_logprobs for r, p in zip(rows, params)
             if r.num_computed_tokens < r.request.num_prompt_tokens]
        )
        return md, (num_logprobs, num_prompt_logprobs)

    def _logprobs_width(self, requested: list[int | None]) -> int:
        """0 when no row wants logprobs, else one fixed width so the step compiles once."""
        wanted = [self.vocab_size if k == -1 else k for k in requested if k is not None]
        if not wanted:
            return 0
        width = max(max(wanted), 1)
        return width if width > self.max_logprobs else max(self.max_logprobs, 1)
