"""The worker's persistent batch: one row of host state per request it knows.

A row holds what a step would otherwise rebuild from Python lists every time: the
request's tokens (its prompt, then each token the runner samples for it), its page
table and its sampling settings (fixed for its life): vLLM's InputBatch and BlockTable.
A row is filled from the request's `NewRequestData`, its page table extended by each
step's `CachedRequestData`, emptied of pages on preemption and freed when the request
finishes. The rows are the worker's only record of a request.
"""

from __future__ import annotations

import numpy as np

from jllm.core.scheduler_output import NewRequestData, SamplingSettings

_UINT32 = (1 << 32) - 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# A row's logprobs setting when it asked for none.
NO_LOGPROBS = -1
# SamplingMetadata's float fields, kept side by side, and their values in a padding row.
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
FLOAT_PADS = np.asarray([0.0, 1.0, 0.0, 0.0, 0.0, 1.0], np.float32)


class RequestRows:
    def __init__(self, max_pages: int, vocab_size: int, capacity: int = 64):
        self.vocab_size = vocab_size
        self.row_of: dict[str, int] = {}
        self._free: list[int] = []
        # Rows whose settings can ban tokens (bad words, min_tokens) or that have host
        # logits processors (the runner's slow path), so that a step without any need not look.
        self.may_ban: set[int] = set()
        self.with_processors: set[int] = set()
        # Row-indexed arrays: (name, shape of one row, dtype, value of an empty row).
        self._columns = (
            ("block_table", (max_pages,), np.int32, 0),
            ("num_blocks", (), np.int32, 0),  # pages in the row's table
            ("floats", (len(FLOAT_FIELDS),), np.float32, 0.0),
            ("top_k", (), np.int32, 0),
            ("seeds", (2,), np.uint32, 0),  # the 64-bit seed's high and low halves
            ("prompt_len", (), np.int32, 0),
            # Prompt tokens plus the tokens sampled so far.
            ("num_tokens", (), np.int32, 0),
            # Widths asked for (the vocabulary for -1), NO_LOGPROBS for none.
            ("logprobs", (), np.int32, NO_LOGPROBS),
            ("prompt_logprobs", (), np.int32, NO_LOGPROBS),
            ("uses_penalties", (), bool, False),
            ("has_bias", (), bool, False),
            ("has_allowed", (), bool, False),
        )
        for name, shape, dtype, fill in self._columns:
            setattr(self, name, np.full((0,) + shape, fill, dtype))
        self.token_ids = np.zeros((0, 0), np.int32)  # [rows, tokens], widened as needed
        self.settings: list[SamplingSettings | None] = []
        self.bias: list[tuple[list[int], list[float]]] = []
        self._grow(capacity)

    # ----- the scheduler's message ------------------------------------------------------

    def add(self, new: NewRequestData) -> int:
        """Fills a row for a request the worker has not seen."""
        if new.req_id in self.row_of:
            raise ValueError(f"Request {new.req_id} is already in the batch.")
        if not self._free:
            self._grow(2 * len(self.block_table))
        row = self._free.pop()
        self.row_of[new.req_id] = row
        s = new.sampling
        self.settings[row] = s
        (self.with_processors.add if s.logits_processors else self.with_processors.discard)(row)
        (self.may_ban.add if s.bad_words or s.min_tokens and s.stop_token_ids else self.may_ban.discard)(row)
        # Finite but past float32 (a repetition_penalty of 1e300 is valid) would turn to inf
        # here, and the penalty's 0 * inf to NaN: such values stop at float32's largest.
        self.floats[row] = np.clip([getattr(s, name) for name in FLOAT_FIELDS], -_FLOAT32_MAX, _FLOAT32_MAX)
        # A top_k of the vocabulary or more keeps every token, as 0 does, and would
        # overflow the step's int32 row.
        self.top_k[row] = s.top_k if s.top_k < self.vocab_size else 0
        self.seeds[row] = [(s.seed >> 32) & _UINT32, s.seed & _UINT32]
        num_prompt = len(new.prompt_token_ids)
        self.prompt_len[row] = self.num_tokens[row] = num_prompt
        self.logprobs[row] = self._width(s.logprobs)
        self.prompt_logprobs[row] = self._width(s.prompt_logprobs)
        self.uses_penalties[row] = s.uses_penalties
        self.bias[row] = ([t for t, _ in s.logit_bias], [v for _, v in s.logit_bias])
        self.has_bias[row] = bool(s.logit_bias)
        self.has_allowed[row] = bool(s.allowed_token_ids)
        self._widen_tokens(num_prompt)
        self.token_ids[row, :num_prompt] = new.prompt_token_ids
        self.block_table[row] = 0
        self.num_blocks[row] = 0
        self.add_blocks(row, new.block_ids)
        return row

    def add_blocks(self, row: int, block_ids: list[int]) -> None:
        """Appends pages to the row's table (pages are only appended while a request
        holds them; a preempted one gets all of them anew on resuming)."""
        have = self.num_blocks[row]
        self.block_table[row, have : have + len(block_ids)] = block_ids
        self.num_blocks[row] = have + len(block_ids)

    def drop_blocks(self, request_ids) -> None:
        """Preempted: the pages are gone, the tokens stay for the recomputation."""
        for request_id in request_ids:
            row = self.row_of.get(request_id)
            if row is not None:
                self.block_table[row] = 0
                self.num_blocks[row] = 0

    def remove(self, request_ids) -> None:
        for request_id in request_ids:
            row = self.row_of.pop(request_id, None)
            if row is not None:
                self._free.append(row)
                self.settings[row] = None
                self.with_processors.discard(row)
                self.may_ban.discard(row)

    # ----- the runner's samples -----------------------------------------------------------

    def record(self, rows: np.ndarray, token_ids: np.ndarray) -> None:
        """Appends a sampled token to each of `rows` (vLLM's InputBatch.token_ids_cpu)."""
        if rows.size:
            positions = self.num_tokens[rows]
            self._widen_tokens(int(positions.max()) + 1)
            self.token_ids[rows, positions] = token_ids
            self.num_tokens[rows] = positions + 1

    # ----- what a row's settings derive from its tokens -------------------------------------

    def prompt_token_ids(self, row: int) -> np.ndarray:
        return self.token_ids[row, : self.prompt_len[row]]

    def output_token_ids(self, row: int) -> np.ndarray:
        return self.token_ids[row, self.prompt_len[row] : self.num_tokens[row]]

    def banned_token_ids(self, row: int) -> list[int]:
        """Tokens the row may not sample next: its stop ids until min_tokens are out, and
        the last token of each bad word whose other tokens end the output."""
        s = self.settings[row]
        output = self.output_token_ids(row)
        banned = list(s.stop_token_ids) if len(output) < s.min_tokens else []
        for word in s.bad_words:
            prefix = len(word) - 1
            if not prefix or (len(output) >= prefix and output[len(output) - prefix :].tolist() == list(word[:-1])):
                banned.append(word[-1])
        return banned

    # ----- storage ------------------------------------------------------------------------

    def _width(self, requested: int | None) -> int:
        if requested is None:
            return NO_LOGPROBS
        return self.vocab_size if requested == -1 else requested

    def _widen_tokens(self, width: int) -> None:
        if width > self.token_ids.shape[1]:
            wider = np.zeros((len(self.token_ids), max(width, 2 * self.token_ids.shape[1], 1024)), np.int32)
            wider[:, : self.token_ids.shape[1]] = self.token_ids
            self.token_ids = wider

    def _grow(self, capacity: int) -> None:
        old = len(self.block_table)
        extra = capacity - old
        for name, shape, dtype, fill in self._columns:
            setattr(self, name, np.concatenate([getattr(self, name), np.full((extra,) + shape, fill, dtype)]))
        self.token_ids = np.concatenate([self.token_ids, np.zeros((extra, self.token_ids.shape[1]), np.int32)])
        self.settings += [None] * extra
        self.bias += [([], [])] * extra
        self._free.extend(reversed(range(old, capacity)))
