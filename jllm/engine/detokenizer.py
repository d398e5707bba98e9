"""Incremental detokenization of one sequence and stop-string matching on its text.

Decoding each new token on its own gets spaces and multi-byte characters wrong, and
re-decoding the whole output every step is quadratic. vLLM's answer, kept here: decode a
short window of recent tokens (from `prefix_offset`) twice, with and without the new
ones, and emit the difference; hold text back while it ends in an incomplete UTF-8
character ("\ufffd").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from jllm.sampling_params import SamplingParams

# Prompt tokens used as left context for the first output token, so that its leading
# space is decoded as it would be mid-text.
INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET = 5


def _convert_tokens_to_string_with_added_encoders(
    tokenizer: PreTrainedTokenizerBase,
    output_tokens: list[str],
    skip_special_tokens: bool,
    spaces_between_special_tokens: bool,
) -> str:
    """Slow (Python) tokenizers only: their convert_tokens_to_string does not know added
    tokens, so those are emitted verbatim and the pieces between them decoded alone."""
    sub_texts: list[str] = []
    current_sub_text: list[str] = []
    all_special_tokens = set(tokenizer.all_special_tokens)
    added_vocab = tokenizer.get_added_vocab()
    for token in output_tokens:
        if skip_special_tokens and token in all_special_tokens:
            continue
        if token in added_vocab:
            if current_sub_text:
                sub_texts.append(tokenizer.convert_tokens_to_string(current_sub_text))
                current_sub_text = []
            sub_texts.append(token)
        else:
            current_sub_text.append(token)
    if current_sub_text:
        sub_texts.append(tokenizer.convert_tokens_to_string(current_sub_text))
    return (" " if spaces_between_special_tokens else "").join(sub_texts)


def convert_prompt_ids_to_tokens(
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[int],
    skip_special_tokens: bool = False,
) -> tuple[list[str], int, int]:
    """The prompt's last tokens as strings, with the initial (prefix_offset, read_offset).

    Only the tail is converted; two extra tokens allow for special tokens being skipped.
    """
    new_tokens = tokenizer.convert_ids_to_tokens(
        prompt_ids[-INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET - 2 :], skip_special_tokens=skip_special_tokens
    )
    # Out-of-vocab prompt ids come back as None.
    new_tokens = ["" if t is None else t for t in new_tokens]
    read_offset = len(new_tokens)
    prefix_offset = max(read_offset - INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET, 0)
    return new_tokens, prefix_offset, read_offset


def detokenize_incrementally(
    tokenizer: PreTrainedTokenizerBase,
    all_input_ids: list[int],
    prev_tokens: list[str] | None,
    prefix_offset: int,
    read_offset: int,
    skip_special_tokens: bool = False,
    spaces_between_special_tokens: bool = True,
) -> tuple[list[str], str, int, int]:
    """Decode the last id of `all_input_ids` given the token strings before it.

    Returns (new_tokens, new_text, prefix_offset, read_offset): the caller appends
    new_tokens to its token list and keeps the offsets. With `prev_tokens=None` the
    context is built from `all_input_ids[:-1]` and all of it is returned as new_tokens.
    """
    new_token_id = all_input_ids[-1]
    is_first_iter = prev_tokens is None
    if is_first_iter:
        prev_tokens, prefix_offset, read_offset = convert_prompt_ids_to_tokens(
            tokenizer, all_input_ids[:-1], skip_special_tokens=skip_special_tokens
        )

    # A model may emit ids past the tokenizer (padded embedding rows): no text for those.
    if 0 <= new_token_id < len(tokenizer):
        # A list, so a skipped special token becomes [] rather than None.
        new_tokens = tokenizer.convert_ids_to_tokens([new_token_id], skip_special_tokens=skip_special_tokens)
    else:
        new_tokens = [""]
    num_tokens = len(prev_tokens) + len(new_tokens)
    # Decoding from prefix_offset rather than from the new token alone lets the
    # tokenizer's decoder see the neighbours that decide spacing. Only that window is
    # built: the whole token list is not copied for every token.
    window = prev_tokens[prefix_offset:] + new_tokens
    if is_first_iter:
        new_tokens = prev_tokens + new_tokens
    if tokenizer.is_fast or not tokenizer.get_added_vocab():
        prefix_text = tokenizer.convert_tokens_to_string(window[: read_offset - prefix_offset])
        new_text = tokenizer.convert_tokens_to_string(window)
    else:
        prefix_text = _convert_tokens_to_string_with_added_encoders(
            tokenizer, window[: read_offset - prefix_offset], skip_special_tokens, spaces_between_special_tokens
        )
        new_text = _convert_tokens_to_string_with_added_encoders(
            tokenizer, window, skip_special_tokens, spaces_between_special_tokens
        )

    # A trailing "\ufffd" is probably a character whose remaining bytes come with the
    # next tokens: emit nothing and keep the offsets until it is complete. (One in the
    # middle is a genuinely invalid sequence and is emitted as is.)
    if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
        return new_tokens, "", prefix_offset, read_offset
    return new_tokens, new_text[len(prefix_text) :], read_offset, num_tokens


def check_stop_strings(
    output_text: str,
    new_char_count: int,
    stop: list[str],
    include_in_output: bool,
) -> tuple[str, int] | None:
    """Find the first stop string that ends inside the last `new_char_count` characters.

    Only the new text and the `len(stop_str) - 1` characters before it are searched, since
    older text was searched on earlier steps. Returns (stop_str, truncate_to), where
    truncate_to is the length to cut output_text to, or -1 for no cut.
    """
    if not new_char_count or not stop:
        return None
    for stop_str in stop:
        stop_index = output_text.find(stop_str, 1 - new_char_count - len(stop_str))
        if stop_index == -1:
            continue
        if include_in_output:
            stop_index += len(stop_str)
            if stop_index >= len(output_text):
                return stop_str, -1
        return stop_str, stop_index
    return None


def convert_ids_list_to_tokens(tokenizer: PreTrainedTokenizerBase, token_ids: list[int]) -> list[str]:
    """Texts for Logprob.decoded_token: each id decoded on its own, as vLLM V1 does.

    Without neighbours a leading space may be lost and a partial UTF-8 character shows
    as "\ufffd"; that is vLLM's behaviour too, and keeps logprob decoding per-token cheap.
    """
    return [tokenizer.decode([token_id]) or "" for token_id in token_ids]


class _FastTokenizerCalls:
    """The calls incremental detokenization makes of an HF fast tokenizer, per token,
    with what stays fixed looked up once: the vocabulary size, the special ids and the
    Rust decoder. Through the tokenizer itself, `len()` and the special-id set are
    recomputed on every call and cost more than the decoding (transformers'
    PreTrainedTokenizerFast does exactly these steps otherwise)."""

    is_fast = True

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._backend = tokenizer.backend_tokenizer
        self._decoder = self._backend.decoder
        self._vocab_size = len(tokenizer)
        self._special_ids = frozenset(tokenizer.all_special_ids)

    def __len__(self) -> int:
        return self._vocab_size

    def convert_ids_to_tokens(self, ids: list[int], skip_special_tokens: bool = False) -> list[str]:
        skipped = self._special_ids if skip_special_tokens else ()
        return [self._backend.id_to_token(i) for i in map(int, ids) if i not in skipped]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._decoder.decode(tokens) if self._decoder is not None else " ".join(tokens)


class IncrementalDetokenizer:
    """Text of one output sequence, grown token by token, with stop-string checking.

    `output_text` is the text so far, already cut at a matched stop string (after it with
    include_stop_str_in_output, before it otherwise). With `detokenize=False` or no
    tokenizer the text stays "". The token ids themselves are the engine's Request's:
    the detokenizer keeps only the token strings its window needs.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase | None, prompt_token_ids: list[int], sampling_params: SamplingParams
    ) -> None:
        params = sampling_params
        if not params.detokenize or tokenizer is None:
            self.tokenizer = None
        elif getattr(tokenizer, "is_fast", False) and hasattr(tokenizer, "backend_tokenizer"):
            self.tokenizer = _FastTokenizerCalls(tokenizer)
        else:
            self.tokenizer = tokenizer
        self.output_text = ""
        self.stop = params.stop
        self.include_stop_str_in_output = params.include_stop_str_in_output
        self.skip_special_tokens = params.skip_special_tokens
        self.spaces_between_special_tokens = params.spaces_between_special_tokens
        # Held back while streaming so a half-generated stop string is never shown.
        self.stop_buffer_length = params.output_text_buffer_length
        self._last_output_text_offset = 0
        if self.tokenizer is not None:
            self.tokens, self.prefix_offset, self.read_offset = convert_prompt_ids_to_tokens(
                self.tokenizer, prompt_token_ids, self.skip_special_tokens
            )

    def update(self, new_token_ids: list[int], stop_terminated: bool = False, may_stop: bool = True) -> str | None:
        """Append new tokens' text and check stop strings; returns the matched one.

        `stop_terminated` says the last token is a stop token or EOS: it is then left out
        of the text unless include_stop_str_in_output. `may_stop` is False while the
        request may not stop yet (min_tokens: output_processor.past_min_tokens).
        """
        if self.tokenizer is None or not new_token_ids:
            return None
        if stop_terminated and not self.include_stop_str_in_output:
            new_token_ids = new_token_ids[:-1]

        stop_check_offset = len(self.output_text)
        for token_id in new_token_ids:
            self.output_text += self._decode_next(token_id)
        if not self.stop or not may_stop:
            return None
        match = check_stop_strings(
            self.output_text, len(self.output_text) - stop_check_offset, self.stop, self.include_stop_str_in_output
        )
        if match is None:
            return None
        stop_str, truncate_to = match
        if truncate_to != -1:
            self.output_text = self.output_text[:truncate_to]
        return stop_str

    def _decode_next(self, token_id: int) -> str:
        # With the previous token strings given, only the last id of the list is read.
        new_tokens, text, self.prefix_offset, self.read_offset = detokenize_incrementally(
            self.tokenizer,
            [token_id],
            self.tokens,
            self.prefix_offset,
            self.read_offset,
            self.skip_special_tokens,
            self.spaces_between_special_tokens,
        )
        self.tokens.extend(new_tokens)
        return text

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """The text to report now: all of it, or with `delta` only what is new since
        the last call; while unfinished, the last stop_buffer_length chars are held."""
        if not self.output_text:
            return ""  # No text yet, or never any (detokenize=False): nothing to hold back.
        buffer_length = 0 if finished else self.stop_buffer_length
        length = max(len(self.output_text) - buffer_length, 0)
        if not delta:
            return self.output_text[:length]
        last_offset = self._last_output_text_offset
        if last_offset < length:
            self._last_output_text_offset = length
            return self.output_text[last_offset:length]
        return ""
