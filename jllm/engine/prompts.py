"""Prompt processing before a request enters the scheduler: tokenize, truncate, validate.

Every rejection happens here, before anything runs, with vLLM's messages.
"""

from __future__ import annotations

from jllm.pooling_params import PoolingParams
from jllm.sampling_params import SamplingParams


def process_prompt(prompt, params: SamplingParams, tokenizer, max_model_len: int, vocab_size: int):
    """Returns (prompt text or None, prompt token ids, cache_salt)."""
    cache_salt = None
    text = None
    if isinstance(prompt, str):
        text = prompt
        token_ids = _encode(tokenizer, text)
    elif isinstance(prompt, dict):
        cache_salt = prompt.get("cache_salt")
        if "prompt_token_ids" in prompt:
            token_ids = list(prompt["prompt_token_ids"])
            text = prompt.get("prompt")
        elif "prompt" in prompt:
            text = prompt["prompt"]
            token_ids = _encode(tokenizer, text)
        else:
            raise ValueError("A prompt dict needs 'prompt' or 'prompt_token_ids'.")
    elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
        token_ids = list(prompt)
    else:
        raise TypeError(
            f"Unsupported prompt type {type(prompt).__name__}: pass a str, a list of token ids, "
            "a TextPrompt or a TokensPrompt."
        )
    truncate = params.truncate_prompt_tokens
    if truncate is not None:
        keep = max_model_len if truncate == -1 else truncate
        token_ids = token_ids[-keep:]
    _validate(token_ids, max_model_len, vocab_size)
    return text, token_ids, cache_salt


def process_pooling_prompt(prompt, params: PoolingParams, tokenizer, max_model_len: int, vocab_size: int):
    """Returns (prompt text or None, prompt token ids, token type ids or None).

    A text prompt is tokenized with the tokenizer's own truncation where
    `truncate_prompt_tokens` is set (so [CLS] ... [SEP] stay, as sentence-transformers
    truncates); token ids are cut to their last tokens. A dict may carry "token_type_ids"
    (a cross-encoder's pair)."""
    truncate = params.truncate_prompt_tokens
    keep = None if truncate is None else max_model_len if truncate == -1 else truncate
    text, token_types = None, None
    if isinstance(prompt, dict) and "prompt_token_ids" not in prompt and "prompt" in prompt:
        prompt = prompt["prompt"]
    if isinstance(prompt, str):
        text = prompt
        if tokenizer is None:
            raise ValueError("A text prompt needs a tokenizer; with skip_tokenizer_init=True pass prompt_token_ids.")
        encoded = tokenizer(text, truncation=keep is not None, max_length=keep)
        token_ids = list(encoded["input_ids"])
    elif isinstance(prompt, dict):
        if "prompt_token_ids" not in prompt:
            raise ValueError("A prompt dict needs 'prompt' or 'prompt_token_ids'.")
        token_ids = list(prompt["prompt_token_ids"])
        text = prompt.get("prompt")
        token_types = prompt.get("token_type_ids")
        if token_types is not None:
            token_types = list(token_types)
            if len(token_types) != len(token_ids):
                raise ValueError("token_type_ids must have one entry per prompt token.")
        if keep is not None:
            token_ids = token_ids[-keep:]
            token_types = token_types[-keep:] if token_types is not None else None
    elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
        token_ids = list(prompt)[-keep:] if keep is not None else list(prompt)
    else:
        raise TypeError(
            f"Unsupported prompt type {type(prompt).__name__}: pass a str, a list of token ids, "
            "a TextPrompt or a TokensPrompt."
        )
    _validate(token_ids, max_model_len, vocab_size)
    return text, token_ids, tuple(token_types) if token_types is not None else None


def _validate(token_ids: list, max_model_len: int, vocab_size: int) -> None:
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in token_ids):
        raise ValueError("prompt_token_ids must be a list of integers.")
    if not token_ids:
        raise ValueError("The decoder prompt cannot be empty")
    bad = [t for t in token_ids if t < 0 or t >= vocab_size]
    if bad:
        raise ValueError(f"Token id {max(bad) if max(bad) >= vocab_size else min(bad)} is out of vocabulary")
    if len(token_ids) > max_model_len:
        raise ValueError(
            f"The decoder prompt (length {len(token_ids)}) is longer than the maximum model length of "
            f"{max_model_len}. Make sure that `max_model_len` is no smaller than the number of text tokens."
        )


def _encode(tokenizer, text: str) -> list[int]:
    if tokenizer is None:
        raise ValueError("A text prompt needs a tokenizer; with skip_tokenizer_init=True pass prompt_token_ids.")
    return list(tokenizer.encode(text))


def bad_words_token_ids(params: SamplingParams, tokenizer, vocab_size: int) -> list[list[int]]:
    """Each bad word as token ids, with and without a leading space (vLLM's rule)."""
    if not params.bad_words:
        return []
    if tokenizer is None:
        raise ValueError("bad_words requires a tokenizer; it cannot be used with skip_tokenizer_init.")
    words: list[list[int]] = []
    for bad_word in params.bad_words:
        plain = list(tokenizer.encode(bad_word.lstrip(), add_special_tokens=False))
        if not plain:
            # Nothing left once stripped (whitespace, or characters the tokenizer drops):
            # the word is banned as given, if it has any tokens at all.
            given = list(tokenizer.encode(bad_word, add_special_tokens=False))
            if given:
                words.append(given)
            continue
        words.append(plain)
        spaced = list(tokenizer.encode(" " + bad_word.lstrip(), add_special_tokens=False))
        # The spaced variant counts only where the space makes a different first token.
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            words.append(spaced)
    invalid = sorted({t for w in words for t in w if not 0 <= t < vocab_size})
    if invalid:
        raise ValueError(
            f"The model vocabulary size is {vocab_size}, but the following tokens were specified as bad: "
            f"{invalid}. All token id values should be integers satisfying: 0 <= id < {vocab_size}."
        )
    return words
