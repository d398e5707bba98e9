"""The server as vLLM's own server tests see it: the optional routes and headers
(/tokenizer_info, /load, /ping, /invocations, X-Request-Id, the ORCA load report),
return_token_ids and return_tokens_as_token_ids, vLLM's logprob order, usage flags,
logprobs of the whole vocabulary, and structured-output fields refused rather than
ignored."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from jllm import LLM, SamplingParams
from openai_server import InProcessServer, server_args
from tiny_model import ENGINE_ARGS, MAX_MODEL_LEN, VOCAB_SIZE

# Slow tier: vLLM's server-test features, each against a live server.
pytestmark = pytest.mark.slow

MODEL_NAME = "tiny"
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name a colour."}]
# Short prompts: a chat request with prompt_logprobs -1 returns the whole vocabulary per prompt token.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
# vLLM's server tests start with this, more than any vocabulary, so that -1 is allowed.
MAX_LOGPROBS = 151936


@pytest.fixture(scope="module")
def server(tiny_llama_path):
    server = InProcessServer(
        server_args(
            tiny_llama_path,
            "--served-model-name",
            MODEL_NAME,
            "--chat-template",
            CHAT_TEMPLATE,
            "--max-logprobs",
            str(MAX_LOGPROBS),
            "--enable-tokenizer-info-endpoint",
            "--enable-server-load-tracking",
            "--enable-request-id-headers",
            "--enable-force-include-usage",
            "--enable-prompt-tokens-details",
        )
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def plain_server(tiny_llama_path):
    """No optional flag but --return-tokens-as-token-ids and --response-role."""
    server = InProcessServer(
        server_args(
            tiny_llama_path,
            "--served-model-name",
            MODEL_NAME,
            "--chat-template",
            CHAT_TEMPLATE,
            "--return-tokens-as-token-ids",
            "--response-role",
            "bot",
        )
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_path):
    return AutoTokenizer.from_pretrained(tiny_llama_path)


@pytest.fixture(scope="module")
def llm(tiny_llama_path):
    return LLM(model=tiny_llama_path, **ENGINE_ARGS)


def post(server, path: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=120, **kwargs)


def events(response: httpx.Response) -> list[dict]:
    """The JSON events of an SSE body, [DONE] excluded."""
    lines = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def completion(**fields) -> dict:
    return {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 5, "temperature": 0, **fields}


def chat(**fields) -> dict:
    return {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 5, "temperature": 0, **fields}


# ----- logprobs of the whole vocabulary (the request that used to kill the engine) ----------


@pytest.mark.parametrize(
    "body",
    [
        chat(prompt_logprobs=-1, max_tokens=2),
        chat(logprobs=True, top_logprobs=-1, max_tokens=2),
        completion(logprobs=-1, prompt_logprobs=-1, max_tokens=2),
    ],
    ids=["chat_prompt_logprobs", "chat_top_logprobs", "completion"],
)
def test_logprobs_minus_one_return_the_whole_vocabulary_and_the_server_serves_on(server, body):
    response = post(server, "/v1/chat/completions" if "messages" in body else "/v1/completions", body)
    assert response.status_code == 200, response.text
    data = response.json()
    if "prompt_logprobs" in body:
        prompt_logprobs = data.get("prompt_logprobs") or data["choices"][0]["prompt_logprobs"]
        assert prompt_logprobs[0] is None and len(prompt_logprobs) >= 2
        # The vocabulary, plus the prompt token first when it is not the top-1... which it
        # always is among the vocabulary: exactly VOCAB_SIZE entries.
        assert all(len(position) == VOCAB_SIZE for position in prompt_logprobs[1:])
    if body.get("top_logprobs") == -1:
        for entry in data["choices"][0]["logprobs"]["content"]:
            assert len(entry["top_logprobs"]) == VOCAB_SIZE and entry["top_logprobs"][0]["token"] == entry["token"]
    if body.get("logprobs") == -1:
        for top in data["choices"][0]["logprobs"]["top_logprobs"]:
            assert len(top) > VOCAB_SIZE // 2  # keyed by text: tokens that decode alike collapse
    after = post(server, "/v1/completions", completion())
    assert after.status_code == 200 and after.json()["choices"][0]["finish_reason"] == "length"


# ----- logprob order and counts ----------------------------------------------------------


def test_chat_top_logprobs_start_with_the_chosen_token_then_rank_order(server, llm):
    """Sampled at a high temperature, the chosen token is often outside the top k: it
    still leads, and the k-th best drops out (vLLM's _get_top_logprobs)."""
    k = 3
    body = chat(logprobs=True, top_logprobs=k, temperature=2.0, seed=7, max_tokens=12, messages=MESSAGES)
    content = post(server, "/v1/chat/completions", body).json()["choices"][0]["logprobs"]["content"]
    prompt = llm.get_tokenizer().encode(MESSAGES[0]["content"], add_special_tokens=False)
    reference = llm.generate(
        [{"prompt_token_ids": prompt}],
        SamplingParams(temperature=2.0, seed=7, max_tokens=12, logprobs=k + 2),
        use_tqdm=False,
    )[0].outputs[0]
    outside = 0
    for entry, token_id, step in zip(content, reference.token_ids, reference.logprobs):
        chosen = step[token_id]
        ranked = sorted((lp for tid, lp in step.items() if tid != token_id), key=lambda lp: lp.rank)
        expected = [chosen.decoded_token] + [lp.decoded_token for lp in ranked][: k - 1]
        assert [t["token"] for t in entry["top_logprobs"]] == expected
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(chosen.logprob, abs=1e-4)
        outside += chosen.rank > k
    assert outside > 0  # the case that tells vLLM's order from a plain top-k


def test_completion_top_logprobs_hold_the_chosen_token_first_and_k_or_k_plus_one(server):
    body = completion(logprobs=2, temperature=2.0, seed=3, max_tokens=12)
    logprobs = post(server, "/v1/completions", body).json()["choices"][0]["logprobs"]
    for token, top in zip(logprobs["tokens"], logprobs["top_logprobs"]):
        assert next(iter(top)) == token and len(top) in (2, 3)
    zero = post(server, "/v1/completions", completion(logprobs=0)).json()["choices"][0]["logprobs"]
    assert all(len(top) == 1 for top in zero["top_logprobs"])


# ----- return_token_ids and return_tokens_as_token_ids ----------------------------------------


def test_completion_return_token_ids(server, tokenizer):
    data = post(server, "/v1/completions", completion(return_token_ids=True)).json()
    choice = data["choices"][0]
    assert choice["prompt_token_ids"] == tokenizer.encode(PROMPT)
    assert len(choice["token_ids"]) == 5 and tokenizer.decode(choice["token_ids"]).startswith(choice["text"])
    off = post(server, "/v1/completions", completion()).json()["choices"][0]
    assert "prompt_token_ids" in off and off["prompt_token_ids"] is None and off["token_ids"] is None
    assert "prompt_token_ids" not in data  # per choice only, as vLLM's

    chunks = events(post(server, "/v1/completions", completion(return_token_ids=True, stream=True)))
    with_choices = [c for c in chunks if c["choices"]]
    assert with_choices[0]["choices"][0]["prompt_token_ids"] == choice["prompt_token_ids"]
    assert all(c["choices"][0]["prompt_token_ids"] is None for c in with_choices[1:])
    assert sum((c["choices"][0]["token_ids"] for c in with_choices), []) == choice["token_ids"]


def test_chat_return_token_ids(server, tokenizer):
    data = post(server, "/v1/chat/completions", chat(return_token_ids=True)).json()
    tokenized = post(server, "/tokenize", {"model": MODEL_NAME, "messages": MESSAGES}).json()["tokens"]
    assert data["prompt_token_ids"] == tokenized
    token_ids = data["choices"][0]["token_ids"]
    assert len(token_ids) == 5 and tokenizer.decode(token_ids) == data["choices"][0]["message"]["content"]

    chunks = events(post(server, "/v1/chat/completions", chat(return_token_ids=True, stream=True)))
    role, *rest = [c for c in chunks if c["choices"]]
    assert role["choices"][0]["delta"]["role"] == "assistant" and role["prompt_token_ids"] == tokenized
    assert all("prompt_token_ids" not in c for c in rest)
    assert sum((c["choices"][0]["token_ids"] for c in rest), []) == token_ids

    plain = [c for c in events(post(server, "/v1/chat/completions", chat(stream=True))) if c["choices"]]
    assert plain[0]["prompt_token_ids"] is None  # present and null, as vLLM's role chunk
    assert all(c["choices"][0]["token_ids"] is None for c in plain[1:])


def test_tokens_as_token_ids_by_request_and_by_server_flag(server, plain_server, tokenizer):
    def completion_tokens(srv, **fields):
        logprobs = post(srv, "/v1/completions", completion(logprobs=1, **fields)).json()["choices"][0]["logprobs"]
        return logprobs["tokens"], logprobs["top_logprobs"]

    def chat_tokens(srv, **fields):
        data = post(srv, "/v1/chat/completions", chat(logprobs=True, top_logprobs=1, **fields)).json()
        return [c["token"] for c in data["choices"][0]["logprobs"]["content"]], data["choices"][0]["message"]

    as_text, _ = completion_tokens(server)
    for srv, fields in ((server, {"return_tokens_as_token_ids": True}), (plain_server, {})):
        tokens, top = completion_tokens(srv, **fields)
        ids = [int(t.removeprefix("token_id:")) for t in tokens]
        assert all(t.startswith("token_id:") for t in tokens) and tokenizer.decode(ids) == "".join(as_text)
        assert [next(iter(d)) for d in top] == tokens
        chat_ids, message = chat_tokens(srv, **fields)
        assert tokenizer.decode([int(t.removeprefix("token_id:")) for t in chat_ids]) == message["content"]
    # A request's false overrides the server's flag.
    tokens, _ = completion_tokens(plain_server, return_tokens_as_token_ids=False)
    assert tokens == as_text


def test_response_role_names_the_reply(server, plain_server):
    assert post(server, "/v1/chat/completions", chat()).json()["choices"][0]["message"]["role"] == "assistant"
    assert post(plain_server, "/v1/chat/completions", chat()).json()["choices"][0]["message"]["role"] == "bot"
    first = events(post(plain_server, "/v1/chat/completions", chat(stream=True)))[0]
    assert first["choices"][0]["delta"]["role"] == "bot"


# ----- usage ------------------------------------------------------------------------------


def test_force_include_usage_ends_every_stream_with_usage(server, plain_server):
    chunks = events(post(server, "/v1/chat/completions", chat(stream=True)))
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert all("usage" not in c for c in chunks[:-1])
    chunks = events(post(server, "/v1/completions", completion(stream=True)))
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 5
    assert all(c["usage"] is None for c in chunks[:-1])
    # Without the flag a stream has no usage unless stream_options asks.
    assert all(c.get("usage") is None for c in events(post(plain_server, "/v1/completions", completion(stream=True))))


def test_prompt_tokens_details_count_prefix_cache_hits(server, plain_server):
    prompt = " ".join(["token"] * 60)  # several full 16-token pages
    first = post(server, "/v1/completions", completion(prompt=prompt)).json()["usage"]
    assert first["prompt_tokens_details"] is None  # nothing cached yet: vLLM leaves it out
    again = post(server, "/v1/completions", completion(prompt=prompt)).json()["usage"]
    cached = again["prompt_tokens_details"]["cached_tokens"]
    assert cached % 16 == 0 and 0 < cached < again["prompt_tokens"]
    post(plain_server, "/v1/completions", completion(prompt=prompt))
    assert (
        post(plain_server, "/v1/completions", completion(prompt=prompt)).json()["usage"]["prompt_tokens_details"]
        is None
    )


# ----- optional routes and headers ---------------------------------------------------------


def test_tokenizer_info_is_the_tokenizer_config(server, plain_server, tokenizer):
    info = httpx.get(f"{server.base_url}/tokenizer_info").json()
    assert info["tokenizer_class"] == type(tokenizer).__name__
    assert info["eos_token"] == tokenizer.eos_token and info["bos_token"] == tokenizer.bos_token
    assert info["chat_template"] == CHAT_TEMPLATE  # the server's --chat-template wins
    assert info["model_max_length"] >= MAX_MODEL_LEN
    assert all(isinstance(v, str) for v in info["added_tokens_decoder"].values())
    assert "vocab_file" not in info and "merges_file" not in info
    assert httpx.get(f"{plain_server.base_url}/tokenizer_info").status_code == 404


def test_load_counts_generation_requests_in_flight(server, plain_server):
    def load(srv) -> int:
        return httpx.get(f"{srv.base_url}/load").json()["server_load"]

    assert load(server) == 0
    with httpx.stream(
        "POST",
        f"{server.base_url}/v1/completions",
        timeout=120,
        json=completion(max_tokens=200, ignore_eos=True, stream=True),
    ) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        assert load(server) == 1
        for _ in lines:
            pass
    deadline = time.monotonic() + 10
    while load(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert load(server) == 0
    post(plain_server, "/v1/completions", completion())
    assert load(plain_server) == 0  # not tracked without the flag


def test_ping_is_health(server):
    assert httpx.get(f"{server.base_url}/ping").status_code == 200
    assert httpx.post(f"{server.base_url}/ping").status_code == 200


def test_invocations_dispatch_chat_and_completion_bodies(server):
    for path, body in (("/v1/chat/completions", chat()), ("/v1/completions", completion())):
        direct, invoked = post(server, path, body).json(), post(server, "/invocations", body).json()
        assert invoked.keys() == direct.keys() and invoked["object"] == direct["object"]
        assert invoked["choices"] == direct["choices"]
    refused = post(server, "/invocations", {"input": "embed me"})
    assert refused.status_code == 400 and refused.json()["error"]["message"] == (
        "Cannot find suitable handler for request. Expected one of: ['ChatCompletionRequest', 'CompletionRequest']"
    )
    garbled = httpx.post(f"{server.base_url}/invocations", content=b"{", headers={"Content-Type": "application/json"})
    assert garbled.status_code == 400 and "JSON decode error" in garbled.json()["error"]["message"]


def test_x_request_id_is_echoed_or_made(server, plain_server):
    made = httpx.get(f"{server.base_url}/health").headers["X-Request-Id"]
    assert len(made) == 32 and int(made, 16) >= 0
    assert (
        httpx.get(f"{server.base_url}/health", headers={"X-Request-Id": "Custom"}).headers["X-Request-Id"] == "Custom"
    )
    assert "X-Request-Id" in httpx.get(f"{server.base_url}/no-such-route").headers
    response = post(server, "/v1/completions", completion(), headers={"X-Request-Id": "abc"})
    assert response.headers["X-Request-Id"] == "abc" and response.json()["id"] == "cmpl-abc"
    assert "X-Request-Id" not in httpx.get(f"{plain_server.base_url}/health").headers


@pytest.mark.parametrize("fmt", ["TEXT", "json"])
def test_orca_load_report_on_non_streaming_completions(server, fmt):
    for path, body in (("/v1/chat/completions", chat()), ("/v1/completions", completion())):
        response = post(server, path, body, headers={"endpoint-load-metrics-format": fmt})
        header = response.headers["endpoint-load-metrics"]
        if fmt == "TEXT":
            assert header.startswith("TEXT named_metrics.num_requests_waiting=")
            assert ", named_metrics.kv_cache_usage_perc=" in header
        else:
            assert header.startswith("JSON ")
            metrics = json.loads(header.removeprefix("JSON "))["named_metrics"]
            assert list(metrics) == ["num_requests_waiting", "kv_cache_usage_perc"]
            assert metrics["num_requests_waiting"] >= 0 and 0 <= metrics["kv_cache_usage_perc"] <= 1
    streamed = post(server, "/v1/completions", completion(stream=True), headers={"endpoint-load-metrics-format": fmt})
    assert "endpoint-load-metrics" not in streamed.headers
    unknown = post(server, "/v1/completions", completion(), headers={"endpoint-load-metrics-format": "xml"})
    assert "endpoint-load-metrics" not in unknown.headers


# ----- nothing accepted and silently ignored -----------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("structured_outputs", {"json": {"type": "object"}}),
        ("structured_outputs", {"regex": "[a-z]+"}),
        ("guided_json", {"type": "object"}),
        ("guided_regex", "[a-z]+"),
        ("guided_choice", ["a", "b"]),
        ("guided_grammar", "root ::= 'a'"),
        ("guided_decoding_backend", "xgrammar"),
        ("guided_whitespace_pattern", " "),
        ("structural_tag", "{}"),
        ("vllm_xargs", {"key": 1}),
    ],
)
@pytest.mark.parametrize("route", ["chat", "completion"])
def test_structured_output_fields_are_refused_not_ignored(server, field, value, route):
    body = chat(**{field: value}) if route == "chat" else completion(**{field: value})
    response = post(server, "/v1/chat/completions" if route == "chat" else "/v1/completions", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and f"`{field}`" in error["message"]


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_object"},
        {"type": "structural_tag"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
    ],
)
def test_response_formats_other_than_text_are_refused(server, response_format):
    response = post(server, "/v1/chat/completions", chat(response_format=response_format))
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"
    assert post(server, "/v1/chat/completions", chat(response_format={"type": "text"})).status_code == 200


def test_unknown_fields_are_served_and_logged(server, caplog):
    with caplog.at_level("WARNING", logger="jllm.entrypoints.openai.protocol"):
        response = post(server, "/v1/completions", completion(metadata={"a": "b"}, store=False))
    assert response.status_code == 200
    assert any(
        "present in the request but ignored" in r.getMessage() and "metadata" in r.getMessage() for r in caplog.records
    )


# ----- the official client ------------------------------------------------------------------


def test_openai_client_reads_the_extra_fields(server):
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    reply = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=3, temperature=0, extra_body={"return_token_ids": True}
    )
    assert len(reply.choices[0].token_ids) == 3 and reply.prompt_token_ids


def test_concurrent_invocations_and_plain_routes_all_finish(server):
    results = []

    def run(path, body):
        results.append(post(server, path, body).status_code)

    threads = [
        threading.Thread(target=run, args=(p, b))
        for p, b in [("/invocations", chat()), ("/v1/completions", completion()), ("/invocations", completion())] * 3
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 9
