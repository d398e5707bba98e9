"""Stop conditions, one test each: stop strings, stop_token_ids, min_tokens, ignore_eos,
max_tokens and EOS, with vLLM's finish_reason and stop_reason.

A random-weight model stops nowhere in particular, so the tests first run the prompt
greedily and record the text after every token; each stop string or stop token is
then picked from that known output, and the expected output is a prefix of it. EOS is
made deterministic with a logit_bias on it.
"""

from dataclasses import dataclass

import pytest

from jllm import LLM, SamplingParams
from tiny_model import ENGINE_ARGS, EOS_TOKEN_ID

PROMPT = "The capital of France is"
MAX_TOKENS = 24
FORCE_EOS = {EOS_TOKEN_ID: 100.0}


def greedy(**kwargs) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "max_tokens": MAX_TOKENS, **kwargs})


@dataclass
class Trace:
    """The greedy continuation of PROMPT: its tokens, and texts[k], the output text
    once tokens 0..k have been generated."""

    token_ids: list[int]
    texts: list[str]

    @property
    def text(self) -> str:
        return self.texts[-1]

    def first_token_completing(self, stop: str) -> int:
        return next(k for k, text in enumerate(self.texts) if stop in text)


@pytest.fixture(scope="module")
def llm(tiny_llama_path):
    return LLM(model=tiny_llama_path, **ENGINE_ARGS)


@pytest.fixture(scope="module")
def trace(llm) -> Trace:
    engine = llm.llm_engine
    engine.add_request("trace", PROMPT, greedy())  # cumulative outputs, one per token
    texts, token_ids = [], []
    while engine.has_unfinished_requests():
        for out in engine.step():
            texts.append(out.outputs[0].text)
            token_ids = list(out.outputs[0].token_ids)
    assert len(token_ids) == len(texts) == MAX_TOKENS and EOS_TOKEN_ID not in token_ids
    return Trace(token_ids, texts)


def run(llm: LLM, params: SamplingParams):
    [output] = llm.generate([PROMPT], params, use_tqdm=False)
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    engine.scheduler.block_manager.check_no_leaks()
    return output.outputs[0]


def spanning_stop_string(trace: Trace) -> tuple[str, int]:
    """A 4-character stop string whose first half ends token k and second half starts
    token k + 1, occurring nowhere earlier; returns it and k + 1."""
    for k in range(4, MAX_TOKENS - 1):
        end = len(trace.texts[k])
        if end - len(trace.texts[k - 1]) >= 2 and len(trace.texts[k + 1]) - end >= 2:
            stop = trace.text[end - 2 : end + 2]
            if trace.first_token_completing(stop) == k + 1:
                return stop, k + 1
    raise AssertionError("no two neighbouring tokens of two characters or more")


def test_max_tokens_gives_exactly_that_many_tokens_and_finish_reason_length(llm, trace):
    out = run(llm, greedy(max_tokens=7))
    assert list(out.token_ids) == trace.token_ids[:7]
    assert out.text == trace.texts[6]
    assert (out.finish_reason, out.stop_reason) == ("length", None)


def test_stop_string_truncates_the_text_before_it(llm, trace):
    stop, k = spanning_stop_string(trace)
    out = run(llm, greedy(stop=[stop]))
    # Tokens up to the one that completes the stop string; the text ends before it.
    assert list(out.token_ids) == trace.token_ids[: k + 1]
    assert out.text == trace.text[: trace.text.index(stop)]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)


def test_include_stop_str_in_output_keeps_the_stop_string(llm, trace):
    stop, k = spanning_stop_string(trace)
    out = run(llm, greedy(stop=[stop], include_stop_str_in_output=True))
    assert list(out.token_ids) == trace.token_ids[: k + 1]
    assert out.text == trace.text[: trace.text.index(stop) + len(stop)]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)


def test_stop_token_id_ends_the_output_and_is_the_stop_reason(llm, trace):
    stop_token = trace.token_ids[5]
    k = trace.token_ids.index(stop_token)
    out = run(llm, greedy(stop_token_ids=[stop_token]))
    # The stop token is in token_ids; its text is not in the output text.
    assert list(out.token_ids) == trace.token_ids[: k + 1]
    assert out.text == (trace.texts[k - 1] if k else "")
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_token)


def test_stop_token_text_is_kept_with_include_stop_str_in_output(llm, trace):
    stop_token = trace.token_ids[5]
    k = trace.token_ids.index(stop_token)
    out = run(llm, greedy(stop_token_ids=[stop_token], include_stop_str_in_output=True))
    assert list(out.token_ids) == trace.token_ids[: k + 1]
    assert out.text == trace.texts[k]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_token)


def test_eos_stops_with_finish_reason_stop_and_no_stop_reason(llm):
    out = run(llm, greedy(logit_bias=FORCE_EOS))
    # EOS is in token_ids; as a special token it has no text.
    assert list(out.token_ids) == [EOS_TOKEN_ID]
    assert out.text == ""
    assert (out.finish_reason, out.stop_reason) == ("stop", None)


def test_ignore_eos_runs_to_max_tokens(llm):
    out = run(llm, greedy(logit_bias=FORCE_EOS, ignore_eos=True, max_tokens=5))
    assert list(out.token_ids) == [EOS_TOKEN_ID] * 5
    assert (out.finish_reason, out.stop_reason) == ("length", None)


def test_min_tokens_masks_eos_until_reached(llm, trace):
    out = run(llm, greedy(logit_bias=FORCE_EOS, min_tokens=3))
    # EOS is banned for the first 3 tokens, which are then the unbiased greedy ones.
    assert list(out.token_ids) == trace.token_ids[:3] + [EOS_TOKEN_ID]
    assert (out.finish_reason, out.stop_reason) == ("stop", None)


def test_eos_as_the_last_allowed_token_reports_stop_not_length(llm, trace):
    out = run(llm, greedy(logit_bias=FORCE_EOS, min_tokens=3, max_tokens=4))
    assert list(out.token_ids) == trace.token_ids[:3] + [EOS_TOKEN_ID]
    assert (out.finish_reason, out.stop_reason) == ("stop", None)


def test_min_tokens_masks_stop_token_ids_until_reached(llm, trace):
    stop_token = trace.token_ids[1]
    out = run(llm, greedy(stop_token_ids=[stop_token], min_tokens=6, max_tokens=12))
    assert len(out.token_ids) >= 6
    assert stop_token not in out.token_ids[:6]
    if out.finish_reason == "stop":
        assert out.token_ids[-1] == out.stop_reason == stop_token
    else:
        assert (len(out.token_ids), out.finish_reason, out.stop_reason) == (12, "length", None)


def test_stop_string_within_min_tokens_does_not_stop(llm, trace):
    stop, k = spanning_stop_string(trace)
    assert trace.text.count(stop) == 1
    out = run(llm, greedy(stop=[stop], min_tokens=k + 1))
    assert list(out.token_ids) == trace.token_ids
    assert out.text == trace.text
    assert (out.finish_reason, out.stop_reason) == ("length", None)
