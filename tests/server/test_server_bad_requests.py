"""A catalogue of bad requests: each gets its vLLM status and message in vLLM's error
body, none gives a 500 or hurts the engine, and a good request is served correctly after."""

from __future__ import annotations

import json

import httpx
import pytest

from openai_server import InProcessServer, server_args
from tiny_model import MAX_MODEL_LEN, VOCAB_SIZE

MAX_BODY = 64 * 1024
GOOD = {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMPLETIONS, CHAT_COMPLETIONS = "/v1/completions", "/v1/chat/completions"


def completion(**fields):
    return (COMPLETIONS, {**GOOD, **fields})


def chat(**fields):
    return (CHAT_COMPLETIONS, {**CHAT, **fields})


def context_message(requested: int, prompt: int) -> str:
    return (
        f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you requested {requested} "
        f"output tokens and your prompt contains {prompt} input tokens, for a total of {requested + prompt} "
        "tokens. Please reduce the length of the input prompt or the number of requested output tokens."
    )


# (id, (path, JSON body) or (path, raw bytes, content type), status, error type, message part)
CATALOGUE = [
    ("malformed_json", (COMPLETIONS, b'{"prompt": "x",', "application/json"), 400, "Bad Request", "JSON decode error"),
    (
        "json_array_body",
        (COMPLETIONS, b"[1, 2]", "application/json"),
        400,
        "Bad Request",
        "Input should be a valid dictionary",
    ),
    (
        "json_string_body",
        (COMPLETIONS, b'"hello"', "application/json"),
        400,
        "Bad Request",
        "Input should be a valid dictionary",
    ),
    ("empty_body", (COMPLETIONS, b"", "application/json"), 400, "Bad Request", "Field required"),
    (
        "invalid_utf8",
        (COMPLETIONS, b'{"prompt": "\xff\xfe"}', "application/json"),
        400,
        "Bad Request",
        "There was an error parsing the body",
    ),
    (
        "lone_surrogate",
        (COMPLETIONS, b'{"prompt": "\\ud800"}', "application/json"),
        400,
        "Bad Request",
        "lone UTF-16 surrogate",
    ),
    (
        "deeply_nested_json",
        (COMPLETIONS, b"[" * 20_000 + b"]" * 20_000, "application/json"),
        400,
        "Bad Request",
        "There was an error parsing the body",
    ),
    (
        "not_json_content_type",
        (COMPLETIONS, json.dumps(GOOD).encode(), "text/plain"),
        400,
        "Bad Request",
        "Unsupported Media Type: Only 'application/json' is allowed",
    ),
    ("max_tokens_not_int", completion(max_tokens="many"), 400, "Bad Request", "valid integer"),
    ("temperature_not_number", completion(temperature="hot"), 400, "Bad Request", "valid number"),
    ("n_fractional", completion(n=1.5), 400, "Bad Request", "fractional part"),
    ("prompt_wrong_type", completion(prompt=123), 400, "Bad Request", "prompt"),
    ("stop_wrong_type", completion(stop=5), 400, "Bad Request", "stop"),
    (
        "temperature_too_high",
        completion(temperature=3.0),
        400,
        "BadRequestError",
        "temperature must be in [0, 2], got 3.0.",
    ),
    (
        "temperature_negative",
        completion(temperature=-1),
        400,
        "BadRequestError",
        "temperature must be non-negative, got -1.0.",
    ),
    (
        "temperature_nan",
        (COMPLETIONS, b'{"prompt": "x", "temperature": NaN}', "application/json"),
        400,
        "BadRequestError",
        "temperature must be a finite number, got nan.",
    ),
    ("top_p_zero", completion(temperature=1, top_p=0), 400, "BadRequestError", "top_p must be in (0, 1], got 0.0."),
    (
        "top_k_below_minus_one",
        completion(temperature=1, top_k=-5),
        400,
        "BadRequestError",
        "top_k must be 0 (disable), or at least 1, got -5.",
    ),
    (
        "min_p_above_one",
        completion(temperature=1, min_p=1.5),
        400,
        "BadRequestError",
        "min_p must be in [0, 1], got 1.5.",
    ),
    (
        "presence_penalty_range",
        completion(presence_penalty=3),
        400,
        "BadRequestError",
        "presence_penalty must be in [-2, 2], got 3.0.",
    ),
    (
        "frequency_penalty_range",
        completion(frequency_penalty=-3),
        400,
        "BadRequestError",
        "frequency_penalty must be in [-2, 2], got -3.0.",
    ),
    (
        "repetition_penalty_zero",
        completion(repetition_penalty=0),
        400,
        "BadRequestError",
        "repetition_penalty must be greater than zero, got 0.0.",
    ),
    ("n_zero", completion(n=0), 400, "BadRequestError", "n must be at least 1, got 0."),
    ("n_huge", completion(n=1e10, temperature=1), 400, "BadRequestError", "n must be at most 16384, got 10000000000."),
    (
        "n_with_greedy",
        completion(n=2, temperature=0),
        400,
        "BadRequestError",
        "n must be 1 when using greedy sampling, got 2.",
    ),
    ("max_tokens_zero", completion(max_tokens=0), 400, "BadRequestError", "max_tokens must be at least 1, got 0."),
    (
        "max_tokens_negative",
        completion(max_tokens=-1),
        400,
        "BadRequestError",
        "max_tokens must be at least 1, got -1.",
    ),
    (
        "min_tokens_over_max_tokens",
        completion(max_tokens=4, min_tokens=5),
        400,
        "BadRequestError",
        "min_tokens must be less than or equal to max_tokens=4, got 5.",
    ),
    (
        "logprobs_over_max",
        completion(logprobs=21),
        400,
        "BadRequestError",
        "Requested sample logprobs of 21, which is greater than max allowed: 20",
    ),
    ("logprobs_negative", completion(logprobs=-2), 400, "Bad Request", "`logprobs` must be a positive value or -1."),
    (
        "prompt_plus_max_tokens_over_context",
        completion(prompt=[1000] * 250, max_tokens=100),
        400,
        "BadRequestError",
        context_message(100, 250),
    ),
    (
        "prompt_alone_over_context",
        completion(prompt=[1000] * (MAX_MODEL_LEN + 80), max_tokens=16),
        400,
        "BadRequestError",
        context_message(16, MAX_MODEL_LEN + 80),
    ),
    (
        "empty_prompt",
        completion(prompt=""),
        400,
        "Bad Request",
        "Either prompt or prompt_embeds must be provided and non-empty.",
    ),
    (
        "missing_prompt",
        (COMPLETIONS, {"max_tokens": 4}),
        400,
        "Bad Request",
        "Either prompt or prompt_embeds must be provided and non-empty.",
    ),
    ("empty_token_prompt", completion(prompt=[]), 400, "BadRequestError", "The decoder prompt cannot be empty"),
    (
        "token_id_out_of_vocab",
        completion(prompt=[5, VOCAB_SIZE]),
        400,
        "BadRequestError",
        f"Token id {VOCAB_SIZE} is out of vocabulary",
    ),
    ("negative_token_id", completion(prompt=[5, -1]), 400, "BadRequestError", "Token id -1 is out of vocabulary"),
    ("unknown_model", completion(model="gpt-4"), 404, "NotFoundError", "The model `gpt-4` does not exist."),
    (
        "stream_options_without_stream",
        completion(stream_options={"include_usage": True}),
        400,
        "Bad Request",
        "Stream options can only be defined when `stream=True`.",
    ),
    (
        "prompt_logprobs_with_stream",
        completion(stream=True, prompt_logprobs=1),
        400,
        "Bad Request",
        "`prompt_logprobs` are not available when `stream=True`.",
    ),
    ("empty_stop_string", completion(stop=[""]), 400, "BadRequestError", "stop cannot contain an empty string."),
    (
        "stop_token_id_out_of_vocab",
        completion(stop_token_ids=[99999]),
        400,
        "BadRequestError",
        f"token_id(s) [99999] in stop_token_ids contain out-of-vocab token ids. Vocabulary size: {VOCAB_SIZE}",
    ),
    (
        "logit_bias_bad_key",
        completion(logit_bias={"abc": 1}),
        400,
        "BadRequestError",
        "logit_bias contains key(s) that cannot be converted to integer token IDs: ['abc']",
    ),
    (
        "logit_bias_out_of_vocab",
        completion(logit_bias={"99999": 1}),
        400,
        "BadRequestError",
        "token_id(s) [99999] in logit_bias contain out-of-vocab token ids.",
    ),
    (
        "allowed_token_ids_empty",
        completion(allowed_token_ids=[]),
        400,
        "BadRequestError",
        "allowed_token_ids is not None and empty!",
    ),
    (
        "too_many_bad_words",
        completion(bad_words=[f"w{i}" for i in range(200)]),
        400,
        "BadRequestError",
        "Too many bad words after tokenization:",
    ),
    ("seed_out_of_int64", completion(seed=2**70), 400, "Bad Request", "less than or equal to 9223372036854775807"),
    (
        "truncate_prompt_tokens_below_minus_one",
        completion(truncate_prompt_tokens=-2),
        400,
        "Bad Request",
        "greater than or equal to -1",
    ),
    ("suffix_unsupported", completion(suffix="!"), 400, "BadRequestError", "suffix is not currently supported"),
    (
        "beam_search_unsupported",
        completion(use_beam_search=True),
        400,
        "BadRequestError",
        "Beam search is not supported",
    ),
    ("chat_empty_messages", chat(messages=[]), 400, "Bad Request", "List should have at least 1 item"),
    ("chat_messages_not_a_list", chat(messages="hi"), 400, "Bad Request", "messages"),
    ("chat_message_without_role", chat(messages=[{"content": "hi"}]), 400, "Bad Request", "Field required"),
    (
        "chat_top_logprobs_without_logprobs",
        chat(top_logprobs=2),
        400,
        "Bad Request",
        "when using `top_logprobs`, `logprobs` must be set to true.",
    ),
    (
        "chat_conflicting_generation_flags",
        chat(continue_final_message=True, add_generation_prompt=True),
        400,
        "Bad Request",
        "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
    ),
    (
        "chat_max_completion_tokens_over_context",
        chat(max_completion_tokens=10_000),
        400,
        "BadRequestError",
        "This model's maximum context length is 320 tokens. However, you requested 10000 output tokens",
    ),
    (
        "chat_prompt_alone_over_context",
        chat(messages=[{"role": "user", "content": "hello " * 400}], max_tokens=None),
        400,
        "BadRequestError",
        "However, you requested 0 output tokens and your prompt contains",
    ),
    (
        "chat_image_part",
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        400,
        "BadRequestError",
        "Content part type 'image_url' is not supported",
    ),
    (
        "chat_untrusted_request_template",
        chat(chat_template="{{ messages }}"),
        400,
        "BadRequestError",
        "Chat template is passed with request, but --trust-request-chat-template is not set.",
    ),
    (
        "chat_auto_tool_choice",
        chat(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="auto"),
        400,
        "BadRequestError",
        '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser',
    ),
    (
        "chat_json_response_format",
        chat(response_format={"type": "json_object"}),
        400,
        "BadRequestError",
        "needs structured outputs",
    ),
    ("chat_unknown_model", chat(model="nope"), 404, "NotFoundError", "The model `nope` does not exist."),
    ("tokenize_without_prompt", ("/tokenize", {"add_special_tokens": True}), 400, "Bad Request", "Field required"),
    (
        "detokenize_negative_id",
        ("/detokenize", {"tokens": [5, -5]}),
        400,
        "BadRequestError",
        "Token id -5 is out of vocabulary",
    ),
    (
        "generate_unknown_field",
        ("/generate", {"prompt": "x", "best_of": 2}),
        400,
        "Bad Request",
        "Extra inputs are not permitted",
    ),
    (
        "generate_prompt_over_context",
        ("/generate", {"prompt": "hello " * 400}),
        400,
        "BadRequestError",
        f"is longer than the maximum model length of {MAX_MODEL_LEN}",
    ),
    (
        "body_too_large",
        completion(prompt="x" * (MAX_BODY + 1)),
        413,
        "Request Entity Too Large",
        f"the limit is {MAX_BODY} bytes",
    ),
    ("unknown_route", ("/v1/nothing", {}), 404, "Not Found", "Not Found"),
]


@pytest.fixture(scope="module")
def server(tiny_llama_path):
    server = InProcessServer(server_args(tiny_llama_path, "--max-request-body-bytes", str(MAX_BODY)))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def good_text(client):
    """A greedy completion before any bad request, to compare with one after them all."""
    response = client.post(COMPLETIONS, json=GOOD)
    assert response.status_code == 200
    return response.json()["choices"][0]["text"]


def send(client: httpx.Client, request) -> httpx.Response:
    if len(request) == 3:
        path, raw, content_type = request
        return client.post(path, content=raw, headers={"content-type": content_type})
    path, body = request
    return client.post(path, json=body)


def test_the_catalogue_has_at_least_30_cases():
    assert len(CATALOGUE) >= 30 and len({case[0] for case in CATALOGUE}) == len(CATALOGUE)


def test_every_case_expects_a_message():
    """An empty expected message would match any answer."""
    assert all(case[-1] for case in CATALOGUE)


@pytest.mark.parametrize(
    "request_, status, err_type, message", [c[1:] for c in CATALOGUE], ids=[c[0] for c in CATALOGUE]
)
def test_bad_request_gets_vllm_error(client, good_text, request_, status, err_type, message):
    response = send(client, request_)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["type"] == err_type
    assert message in error["message"]


def test_wrong_method_is_405_in_vllm_body(client):
    response = client.get(COMPLETIONS)
    assert response.status_code == 405
    assert response.json()["error"] == {
        "message": "Method Not Allowed",
        "type": "Method Not Allowed",
        "param": None,
        "code": 405,
    }


def test_context_error_names_the_input_tokens_param(client):
    error = send(client, completion(prompt=[1000] * 250, max_tokens=100)).json()["error"]
    assert error["param"] == "input_tokens"


def test_a_bad_prompt_among_several_leaves_none_running(client, server):
    response = send(client, completion(prompt=[[5, 6, 7], [5, VOCAB_SIZE + 3]], max_tokens=200, ignore_eos=True))
    assert response.status_code == 400
    server.wait_idle(timeout=10)
    server.block_manager.check_no_leaks()


def test_extreme_but_valid_values_are_served(client):
    """Values at the edges that the engine's step arrays must still hold."""
    for fields in (
        {"temperature": 1, "top_k": 10**20},
        {"temperature": 1, "seed": -(2**63)},
        {"allowed_token_ids": [7] * 5000},
        {"logit_bias": {str(i): 100 for i in range(300)}},
        {"temperature": 1, "top_p": 1e-9},
        {"repetition_penalty": 1e30, "presence_penalty": 2},
        {"stop": ["a"] * 200, "stop_token_ids": list(range(500)), "min_tokens": 2},
    ):
        response = send(client, completion(max_tokens=3, **fields))
        assert response.status_code == 200, (fields, response.text)
        assert response.json()["usage"]["completion_tokens"] >= 1


def test_good_request_is_served_correctly_after_the_catalogue(client, server, good_text):
    for case in CATALOGUE:  # run them all again, back to back, in case order mattered
        assert send(client, case[1]).status_code == case[2]
    assert client.get("/health").status_code == 200
    response = client.post(COMPLETIONS, json=GOOD)
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == good_text
    server.wait_idle(timeout=10)
    server.block_manager.check_no_leaks()
