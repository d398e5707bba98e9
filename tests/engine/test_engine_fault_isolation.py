"""One request's failure is that request's alone: requests that raise at each stage of
their processing (prompt, sampling parameters, logits processor, logprobs, prompt
logprobs, detokenization, a model step that raises before the device runs) fail with
their own exception, while the requests beside them finish with the tokens they give
when run alone, and no KV page or engine record is left behind."""

from __future__ import annotations

import pytest

from jllm.engine.arg_utils import EngineArgs
from jllm.engine.llm_engine import LLMEngine
from jllm.engine.output_processor import RequestState
from jllm.sampling_params import RequestOutputKind, SamplingParams
from tiny_model import ENGINE_ARGS, VOCAB_SIZE

MAX_TOKENS = 8
GOOD_PROMPTS = {f"good-{i}": [100 + 37 * i + j for j in range(5 + 3 * i)] for i in range(4)}
BAD_PROMPT = [4000 + j for j in range(6)]


def greedy(**fields) -> SamplingParams:
    return SamplingParams(
        **{"temperature": 0.0, "max_tokens": MAX_TOKENS, "output_kind": RequestOutputKind.FINAL_ONLY, **fields}
    )


class Boom(RuntimeError):
    pass


@pytest.fixture(scope="module")
def engine(tiny_llama_path) -> LLMEngine:
    return LLMEngine.from_engine_args(EngineArgs(model=tiny_llama_path, **ENGINE_ARGS))


def run(engine: LLMEngine) -> dict:
    finals = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            assert output.request_id not in finals
            if output.finished:
                finals[output.request_id] = output
    return finals


def assert_clean(engine: LLMEngine) -> None:
    assert not engine.has_unfinished_requests() and engine.get_num_unfinished_requests() == 0
    assert not engine._sample_of
    engine.scheduler.block_manager.check_no_leaks()
    # The worker hears of the last finishes with the next step's message; then it holds no row.
    assert engine.step() == []
    rows = engine.runner.builder.rows
    assert not rows.row_of and not rows.with_processors and not rows.may_ban


@pytest.fixture(scope="module")
def alone(engine) -> dict[str, list[int]]:
    tokens = {}
    for request_id, prompt in GOOD_PROMPTS.items():
        engine.add_request(request_id, prompt, greedy())
        tokens[request_id] = list(run(engine)[request_id].outputs[0].token_ids)
    assert len({tuple(t) for t in tokens.values()}) == len(tokens)
    return tokens


def add_good(engine: LLMEngine) -> None:
    for request_id, prompt in GOOD_PROMPTS.items():
        engine.add_request(request_id, prompt, greedy())


def check_good(finals: dict, alone: dict) -> None:
    for request_id, tokens in alone.items():
        output = finals[request_id]
        assert output.error is None and output.outputs[0].finish_reason == "length"
        assert list(output.outputs[0].token_ids) == tokens


def check_failed(finals: dict, request_id: str, error_type: type, n: int = 1) -> None:
    output = finals[request_id]
    assert output.finished and isinstance(output.error, error_type)
    assert [c.finish_reason for c in output.outputs] == ["error"] * n


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ([VOCAB_SIZE + 5], greedy(), "out of vocabulary"),
        (object(), greedy(), "Unsupported prompt type"),
        (BAD_PROMPT, greedy(logprobs=10_000), "Requested sample logprobs of 10000"),
        (BAD_PROMPT, greedy(stop_token_ids=[VOCAB_SIZE]), "out-of-vocab"),
    ],
    ids=["prompt_ids", "prompt_type", "logprobs_limit", "stop_token_ids"],
)
def test_request_refused_at_admission_leaves_nothing_and_others_run(engine, alone, prompt, params, message):
    add_good(engine)
    with pytest.raises((ValueError, TypeError), match=message):
        engine.add_request("bad", prompt, params)
    assert "bad" not in engine._states
    check_good(run(engine), alone)
    assert_clean(engine)


def test_request_whose_sampling_params_fail_to_copy_is_refused(engine, alone):
    class Unclonable(SamplingParams):
        def clone(self):
            raise Boom("cannot copy")

    add_good(engine)
    with pytest.raises(Boom):
        engine.add_request("bad", BAD_PROMPT, Unclonable(temperature=0.0, max_tokens=4))
    check_good(run(engine), alone)
    assert_clean(engine)


def test_raising_logits_processor_fails_only_its_request(engine, alone):
    def explodes_on_third_token(output_ids, logits):
        if len(output_ids) == 2:
            raise Boom("processor")
        return logits

    add_good(engine)
    engine.add_request("bad", BAD_PROMPT, greedy(logits_processors=[explodes_on_third_token]))
    finals = run(engine)
    check_failed(finals, "bad", Boom)
    check_good(finals, alone)
    assert_clean(engine)


@pytest.mark.parametrize("method", ["add_sampled_logprobs", "add_prompt_logprobs"])
def test_raising_logprobs_fail_only_their_request(engine, alone, monkeypatch, method):
    original = getattr(RequestState, method)

    def raising(self, *args, **kwargs):
        if self.request_id == "bad":
            raise Boom(method)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RequestState, method, raising)
    add_good(engine)
    engine.add_request("bad", BAD_PROMPT, greedy(logprobs=2, prompt_logprobs=2))
    engine.add_request("fine-logprobs", GOOD_PROMPTS["good-1"], greedy(logprobs=2, prompt_logprobs=2))
    finals = run(engine)
    check_failed(finals, "bad", Boom)
    check_good(finals, alone)
    fine = finals.pop("fine-logprobs")
    assert list(fine.outputs[0].token_ids) == alone["good-1"] and len(fine.outputs[0].logprobs) == MAX_TOKENS
    assert_clean(engine)


def test_raising_detokenizer_fails_all_samples_of_its_request(engine, alone):
    add_good(engine)
    engine.add_request(
        "bad",
        BAD_PROMPT,
        SamplingParams(n=3, temperature=0.8, seed=1, max_tokens=MAX_TOKENS, output_kind=RequestOutputKind.FINAL_ONLY),
    )
    _, sample = engine._sample_of["1_bad"]
    calls = []

    def update(new_token_ids, *flags):
        calls.append(new_token_ids)
        if len(calls) == 3:
            raise Boom("detokenizer")
        return None

    sample.detokenizer.update = update
    finals = run(engine)
    check_failed(finals, "bad", Boom, n=3)
    check_good(finals, alone)
    assert_clean(engine)


def test_raising_final_text_fails_only_its_request(engine, alone):
    add_good(engine)
    engine.add_request("bad", BAD_PROMPT, greedy())

    def get_next_output_text(finished, delta):
        raise Boom("text")

    engine._sample_of["bad"][1].detokenizer.get_next_output_text = get_next_output_text
    finals = run(engine)
    check_failed(finals, "bad", Boom)
    check_good(finals, alone)
    assert_clean(engine)


def test_step_raising_before_the_device_ran_fails_its_requests_and_the_engine_goes_on(engine, alone, monkeypatch):
    original = engine.runner.execute_model

    def execute_model(scheduler_output):
        if "bad" in scheduler_output.num_scheduled_tokens:
            raise Boom("trace-time failure")
        return original(scheduler_output)

    monkeypatch.setattr(engine.runner, "execute_model", execute_model)
    engine.add_request("bad", BAD_PROMPT, greedy())
    finals = run(engine)
    check_failed(finals, "bad", Boom)
    assert_clean(engine)
    add_good(engine)
    check_good(run(engine), alone)
    assert_clean(engine)


def test_step_that_consumed_the_kv_cache_is_fatal(engine, monkeypatch):
    monkeypatch.setattr(engine.runner, "kv_cache_alive", lambda: False)

    def execute_model(scheduler_output):
        raise Boom("device lost")

    monkeypatch.setattr(engine.runner, "execute_model", execute_model)
    engine.add_request("doomed", BAD_PROMPT, greedy())
    with pytest.raises(Boom):
        engine.step()
    engine.abort_request("doomed")
    monkeypatch.undo()  # The module's engine is shared: give it its runner back.
    assert_clean(engine)


def test_logprobs_of_the_whole_vocabulary_when_max_logprobs_exceeds_it(tiny_llama_path):
    """vLLM's server tests start with --max-logprobs 151936, more than this vocabulary,
    so that -1 (every token) is allowed; the step's top-k must not ask for more."""
    engine = LLMEngine.from_engine_args(EngineArgs(model=tiny_llama_path, max_logprobs=151936, **ENGINE_ARGS))
    prompt = [500, 600, 700]
    engine.add_request("all", prompt, greedy(logprobs=-1, prompt_logprobs=-1, max_tokens=2))
    output = run(engine)["all"]
    assert output.error is None
    assert output.prompt_logprobs[0] is None
    for position in output.prompt_logprobs[1:]:
        assert len(position) == VOCAB_SIZE
    for step, token in zip(output.outputs[0].logprobs, output.outputs[0].token_ids):
        assert len(step) == VOCAB_SIZE and step[token].rank == 1
    assert_clean(engine)
