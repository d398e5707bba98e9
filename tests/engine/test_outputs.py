"""RequestOutput.add merges streamed outputs as vLLM does."""

from jllm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput


def _output(index, text, token_ids, finish_reason=None, stop_reason=None, logprob=None):
    logprobs = None if logprob is None else [{t: Logprob(logprob)} for t in token_ids]
    return CompletionOutput(
        index=index,
        text=text,
        token_ids=token_ids,
        cumulative_logprob=logprob,
        logprobs=logprobs,
        finish_reason=finish_reason,
        stop_reason=stop_reason,
    )


def _request(outputs, finished=False):
    return RequestOutput("req-0", "Hi", [1, 2], None, outputs, finished)


def test_add_aggregate_concatenates_deltas():
    merged = _request([_output(0, "Hel", (5, 6), logprob=-1.0)])
    merged.add(_request([_output(0, "lo", [7], logprob=-2.0)]), aggregate=True)
    merged.add(_request([_output(0, "!", [8], "stop", "!", logprob=-3.0)], finished=True), aggregate=True)
    (completion,) = merged.outputs
    assert completion.text == "Hello!"
    assert completion.token_ids == [5, 6, 7, 8]
    assert [list(d) for d in completion.logprobs] == [[5], [6], [7], [8]]
    # cumulative_logprob, finish_reason and stop_reason describe the whole sequence.
    assert completion.cumulative_logprob == -3.0
    assert completion.finish_reason == "stop" and completion.stop_reason == "!"
    assert merged.finished


def test_add_without_aggregate_replaces_completion():
    merged = _request([_output(0, "Hel", [5])])
    newer = _output(0, "Hello", [5, 6])
    merged.add(_request([newer]), aggregate=False)
    assert merged.outputs == [newer]


def test_add_appends_completions_with_new_index():
    merged = _request([_output(0, "a", [5])])
    merged.add(_request([_output(1, "b", [6])]), aggregate=True)
    assert [c.index for c in merged.outputs] == [0, 1]


def test_finished_is_sticky():
    merged = _request([_output(0, "a", [5])], finished=True)
    merged.add(_request([_output(0, "", [])]), aggregate=True)
    assert merged.finished


def test_completion_finished_follows_finish_reason():
    assert not _output(0, "", []).finished()
    assert _output(0, "", [], finish_reason="length").finished()


def test_reprs_match_vllm_layout():
    completion = _output(0, "a'b", [5], "stop", None)
    assert repr(completion) == (
        'CompletionOutput(index=0, text="a\'b", token_ids=[5], cumulative_logprob=None, '
        "logprobs=None, finish_reason=stop, stop_reason=None)"
    )
    request = RequestOutput(
        "r", "p", [1], None, [completion], True, metrics=RequestMetrics(arrival_time=1.0), num_cached_tokens=0
    )
    assert repr(request) == (
        f"RequestOutput(request_id=r, prompt='p', prompt_token_ids=[1], "
        f"prompt_logprobs=None, outputs=[{completion!r}], finished=True, "
        f"metrics=RequestMetrics(arrival_time=1.0, first_scheduled_time=None, "
        f"first_token_time=None, last_token_time=None, finished_time=None), "
        f"num_cached_tokens=0)"
    )
