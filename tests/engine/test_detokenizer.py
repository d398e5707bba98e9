"""Incremental detokenization and stop strings, against HF `tokenizer.decode` as reference.

The tokenizer is a byte-level BPE trained here on a few sentences, small enough that
Chinese characters and emoji are split over several tokens, which is what exercises
the incomplete-UTF-8 path.
"""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from jllm.engine.detokenizer import IncrementalDetokenizer, convert_ids_list_to_tokens
from jllm.sampling_params import SamplingParams

CORPUS = [
    "Hello world, this is a test of the tokenizer.",
    "The quick brown fox jumps over the lazy dog!",
    "你好，世界！这是一个中文测试。",
    "Emoji time: 😀🎉👍🚀 and more emoji 😀.",
    "Numbers 12345 and symbols #@$%^&*() are here.",
]
WORDS = [
    "Hello",
    "world",
    "the",
    "quick",
    "fox",
    "test",
    "tokenizer",
    "12345",
    "é",
    "ß",
    "你好",
    "世界",
    "中文",
    "测试",
    "字",
    "😀",
    "🎉",
    "👍",
    "🚀",
    "🦄",
    ",",
    ".",
    "!",
    "\n",
    "  ",
]
SPECIAL_TOKENS = ["<s>", "</s>", "<|sep|>"]


@pytest.fixture(scope="module")
def tokenizer():
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<|sep|>"],
        clean_up_tokenization_spaces=False,
    )


def _random_text(rng: random.Random) -> str:
    return "".join(rng.choice(WORDS) + rng.choice(["", " "]) for _ in range(rng.randint(1, 12)))


def _encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def _stream(tokenizer, prompt_ids, output_ids, params, rng=None):
    """Feed output_ids as an engine would (one token per step, or random chunks)."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, params)
    i = 0
    while i < len(output_ids):
        step = rng.randint(1, 4) if rng else 1
        if detok.update(output_ids[i : i + step]) is not None:
            break
        i += step
    return detok


@pytest.mark.parametrize("chunked", [False, True], ids=["token_by_token", "chunks"])
def test_incremental_text_equals_full_decode(tokenizer, chunked):
    rng = random.Random(0)
    for _ in range(300):
        prompt_ids = _encode(tokenizer, _random_text(rng))[: rng.randint(0, 10)]
        output_ids = _encode(tokenizer, _random_text(rng))
        detok = _stream(tokenizer, prompt_ids, output_ids, SamplingParams(), rng if chunked else None)
        assert detok.output_text == tokenizer.decode(output_ids)


def test_multibyte_characters_are_split_over_tokens(tokenizer):
    # The premise of the test above: some characters need several tokens.
    assert len(_encode(tokenizer, "🦄")) > 1


def test_incomplete_character_is_held_until_complete(tokenizer):
    ids = _encode(tokenizer, "🦄")
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    for token_id in ids[:-1]:
        detok.update([token_id])
        assert detok.output_text == ""
    detok.update(ids[-1:])
    assert detok.output_text == "🦄"


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_tokens_skipped_or_kept_like_decode(tokenizer, skip_special_tokens):
    rng = random.Random(1)
    special_ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    params = SamplingParams(skip_special_tokens=skip_special_tokens)
    texts = []
    for _ in range(100):
        # Specials go between encoded pieces, i.e. on character boundaries.
        output_ids = []
        for _ in range(rng.randint(1, 5)):
            output_ids += _encode(tokenizer, _random_text(rng))
            output_ids.append(rng.choice(special_ids))
        prompt_ids = [rng.choice(special_ids)] + _encode(tokenizer, _random_text(rng))
        detok = _stream(tokenizer, prompt_ids, output_ids, params)
        assert detok.output_text == tokenizer.decode(output_ids, skip_special_tokens=skip_special_tokens)
        texts.append(detok.output_text)
    assert any("<|sep|>" in text for text in texts) != skip_special_tokens


def test_out_of_vocab_token_gives_no_text(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    detok.update(_encode(tokenizer, "Hello") + [len(tokenizer) + 10])
    assert detok.output_text == "Hello"


def _stop_spanning_tokens(tokenizer, text, stop):
    """Token ids of text, checking that `stop` is cut by a token boundary."""
    ids = _encode(tokenizer, text)
    assert not any(stop in tokenizer.decode([t]) for t in ids)
    return ids


def test_stop_string_spanning_tokens_is_found_and_excluded(tokenizer):
    text = "Hello world, this is a test of the tokenizer."
    ids = _stop_spanning_tokens(tokenizer, text, "s is a t")
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["zzz", "s is a t"]))
    matched = []
    for t in ids:
        matched.append(detok.update([t]))
        if matched[-1]:
            break
    # It fires on the token that completes it, and the text stops before it.
    first_complete = next(k for k in range(len(ids)) if "s is a t" in tokenizer.decode(ids[: k + 1]))
    assert matched == [None] * first_complete + ["s is a t"]
    assert detok.output_text == "Hello world, thi"


def test_stop_string_included_when_asked(tokenizer):
    text = "Hello world, this is a test of the tokenizer."
    ids = _stop_spanning_tokens(tokenizer, text, "s is a t")
    params = SamplingParams(stop=["s is a t"], include_stop_str_in_output=True)
    detok = _stream(tokenizer, [], ids, params)
    # Cut right after the stop string, even when its last token carries more text.
    assert detok.output_text == "Hello world, this is a t"


def test_stop_string_in_multibyte_text(tokenizer):
    ids = _stop_spanning_tokens(tokenizer, "你好，世界！这是🦄一个", "世界！这")
    detok = _stream(tokenizer, [], ids, SamplingParams(stop=["世界！这"]))
    assert detok.output_text == "你好，"


def test_stop_string_in_prompt_is_ignored(tokenizer):
    prompt_ids = _encode(tokenizer, "Hello world")
    detok = _stream(tokenizer, prompt_ids, _encode(tokenizer, ", the fox"), SamplingParams(stop=["world"]))
    assert detok.output_text == ", the fox"


def test_stop_string_is_not_checked_while_the_request_may_not_stop(tokenizer):
    # min_tokens' rule (the engine's past_min_tokens) holds the check off for the first
    # "fox"; the next one stops, and the text searched includes what came before.
    ids = _encode(tokenizer, "fox, the fox, the end")
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["fox"]))
    first_fox_end = len(_encode(tokenizer, "fox"))
    stopped_at = next(i for i, t in enumerate(ids) if detok.update([t], may_stop=i >= first_fox_end) == "fox")
    assert stopped_at == len(_encode(tokenizer, "fox, the fox")) - 1
    assert detok.output_text == "fox, the "


def test_stop_token_is_kept_out_of_text(tokenizer):
    ids = _encode(tokenizer, "Hello world") + [tokenizer.eos_token_id]
    params = SamplingParams(skip_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], params)
    assert detok.update(ids, stop_terminated=True) is None
    assert detok.output_text == "Hello world"


def test_streaming_holds_back_possible_stop_prefix(tokenizer):
    ids = _encode(tokenizer, "the test of the tokenizer.")
    params = SamplingParams(stop=["the lazy"])
    detok = IncrementalDetokenizer(tokenizer, [], params)
    streamed = ""
    for t in ids:
        detok.update([t])
        streamed += detok.get_next_output_text(finished=False, delta=True)
        # Everything but the last len("the lazy") - 1 chars has been shown.
        assert streamed == detok.output_text[: max(len(detok.output_text) - 7, 0)]
        assert detok.get_next_output_text(finished=False, delta=False) == streamed
    streamed += detok.get_next_output_text(finished=True, delta=True)
    assert streamed == detok.output_text == "the test of the tokenizer."


def test_streamed_text_never_shows_part_of_stop_string(tokenizer):
    ids = _encode(tokenizer, "Hello world, the quick brown fox")
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["the quick"]))
    streamed = ""
    for t in ids:
        stop = detok.update([t])
        streamed += detok.get_next_output_text(finished=stop is not None, delta=True)
        assert "the" not in streamed
        if stop:
            break
    assert streamed == "Hello world, "


def test_no_detokenize_makes_no_text(tokenizer):
    ids = _encode(tokenizer, "Hello world")
    detok = IncrementalDetokenizer(tokenizer, [1], SamplingParams(detokenize=False))
    assert detok.update(ids) is None
    assert detok.output_text == ""


def test_logprob_tokens_are_decoded_one_id_at_a_time(tokenizer):
    ids = _encode(tokenizer, "Hello 你好") + [tokenizer.eos_token_id]
    assert convert_ids_list_to_tokens(tokenizer, ids) == [tokenizer.decode([t]) for t in ids]
