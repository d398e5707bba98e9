"""A fuzz pass over the server's request schemas (issue "server robustness"): schemathesis's
positive and negative cases for every operation of the server's own OpenAPI document, and
raw bodies (random bytes, garbled JSON, JSON of any shape) POSTed to every POST route. No
request gets a 5xx, and afterwards the engine is idle with no KV page held, /health is 200
and a greedy completion is the text it was before.

Generation is kept cheap for CI's two CPU cores (a 300-token completion costs seconds there):
positive cases come from a copy of the document whose n, max_tokens and prompt lists have small
maxima, while negative cases use the document as served, since the server refuses them before
they run. Every call has a client timeout; a request that outlives it is tolerated only if the
server is still healthy after it (the client's disconnect aborts it).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections import Counter

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from openai_server import InProcessServer, server_args

# Slow tier: thousands of generated requests against a live server.
pytestmark = pytest.mark.slow

FLAGS = ("--enable-tokenizer-info-endpoint", "--enable-server-load-tracking", "--enable-request-id-headers")
GOOD = {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}
CLIENT_TIMEOUT_S = 20
# Cases per operation with a body and generation mode, and raw bodies in all; an operation
# without parameters or body has one case (hypothesis stops once it has sent it).
SCHEMA_EXAMPLES = 100
RAW_EXAMPLES = 3000
# The positive document's maxima: enough to exercise n, several prompts and min_tokens.
MAX_N, MAX_TOKENS, MAX_PROMPTS = 3, 8, 3
# Which request schemas each POST route reads (/invocations: chat first, then completion).
POST_ROUTES = {
    "/v1/completions": ("CompletionRequest",),
    "/v1/chat/completions": ("ChatCompletionRequest",),
    "/tokenize": ("TokenizeCompletionRequest", "TokenizeChatRequest"),
    "/detokenize": ("DetokenizeRequest",),
    "/generate": ("GenerateRequest",),
    "/invocations": ("ChatCompletionRequest", "CompletionRequest"),
}
# A body of each route that the server serves, for the raw bodies that change one field.
GOOD_BODIES = {
    "/v1/completions": GOOD,
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    "/tokenize": {"prompt": "hello world"},
    "/detokenize": {"tokens": [9, 10, 11]},
    "/generate": {"prompt": "hello", "max_tokens": 4},
    "/invocations": {"prompt": "hello", "max_tokens": 4},
}
ERROR_KEYS = {"message", "type", "param", "code"}


def nested_prompts(routes: tuple[str, ...], depths: range) -> list[tuple[str, bytes]]:
    return [
        (route, b'{"prompt": ' + nested + b"}")
        for route in routes
        for depth in depths
        for nested in (b'{"a":' * depth + b"1" + b"}" * depth, b"[" * depth + b"]" * depth)
    ]


# Bodies this fuzz found answered with a 500 at 1c8502f, by cause, all since fixed. They are
# sent on every run before the random ones, so none can come back unnoticed.
FOUND_5XX = {
    "RecursionError: /invocations parses the body itself and catches only ValueError": [
        ("/invocations", b"[" * 2000 + b"]" * 2000),
        ("/invocations", b'{"a":' * 3000 + b"1" + b"}" * 3000),
    ],
    # Nesting the JSON parser still takes (Python 3.12's C recursion limit, 1500) is too deep
    # for repr of the error's input; which depths fail depends on how deep the handler runs
    # (1490 and 1491 at 1c8502f, not on every run), hence the sweep.
    "RecursionError in the 400 handler's str(list(exc.errors()))": nested_prompts(
        ("/detokenize", "/v1/completions"), range(1470, 1511)
    ),
    'TypeError from the tokenizer: a lone surrogate ("\\ud800" in JSON) in a prompt': [
        ("/v1/completions", b'{"prompt": "\\ud800", "max_tokens": 3}'),
        ("/v1/completions", b'{"prompt": ["a", "\\udfff"], "max_tokens": 3}'),
        ("/tokenize", b'{"prompt": "\\ud800"}'),
        ("/invocations", b'{"prompt": "\\ud800", "max_tokens": 3}'),
    ],
    "TypeError from the tokenizer: a lone surrogate in bad_words": [
        ("/v1/completions", b'{"prompt": "a", "bad_words": ["\\ud800"], "max_tokens": 3}'),
        ("/generate", b'{"prompt": "a", "bad_words": ["\\ud800"], "max_tokens": 3}'),
    ],
    "TypeError from the tokenizer: a lone surrogate in a chat message (rendered, then encoded)": [
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 3}'),
        ("/v1/chat/completions", b'{"messages": [{"role": "\\ud800", "content": "a"}], "max_tokens": 3}'),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}], "max_tokens": 3}',
        ),
        ("/tokenize", b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
    ],
    "UnicodeEncodeError: a lone surrogate in `model`, echoed in the 404's message": [
        ("/v1/completions", b'{"prompt": "a", "max_tokens": 3, "model": "\\ud800"}'),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "a"}], "max_tokens": 3, "model": "\\ud800"}',
        ),
        ("/tokenize", b'{"prompt": "a", "model": "\\ud800"}'),
        ("/detokenize", b'{"tokens": [1], "model": "\\ud800"}'),
    ],
    "UnicodeEncodeError: a lone surrogate in `request_id`, echoed in the response id": [
        ("/v1/completions", b'{"prompt": "a", "max_tokens": 3, "request_id": "\\ud800"}'),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "a"}], "max_tokens": 3, "request_id": "\\ud800"}',
        ),
    ],
    # bad_words_token_ids reads plain[0] of a word that is empty once lstripped and encoded.
    "IndexError: a bad word of whitespace or a control character alone": [
        ("/v1/completions", b'{"prompt": "a", "bad_words": [" "], "max_tokens": 3}'),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "a"}], "bad_words": ["\\n"], "max_tokens": 3}',
        ),
        ("/generate", b'{"prompt": "a", "bad_words": ["\\u0013"], "max_tokens": 3}'),
    ],
}


@pytest.fixture(scope="module")
def server(tiny_llama_path):
    server = InProcessServer(server_args(tiny_llama_path, *FLAGS))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def good_text(server):
    """A greedy completion before any fuzzing, to compare with one after it."""
    response = httpx.post(f"{server.base_url}/v1/completions", json=GOOD, timeout=CLIENT_TIMEOUT_S)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def document(server):
    """The served OpenAPI document, with the body /invocations reads: it parses the JSON
    itself, so FastAPI's document gives it none."""
    document = httpx.get(f"{server.base_url}/openapi.json").json()
    refs = [{"$ref": f"#/components/schemas/{name}"} for name in POST_ROUTES["/invocations"]]
    document["paths"]["/invocations"]["post"]["requestBody"] = {
        "content": {"application/json": {"schema": {"anyOf": refs}}},
        "required": True,
    }
    return document


@pytest.fixture
def quiet_logs(caplog):
    """No log line per fuzzed body: unknown fields are warned of, and a 500 logs its traceback
    twice (jllm, uvicorn). A failure's message holds each fault's body to send again."""
    caplog.set_level(logging.CRITICAL, logger="jllm.entrypoints.openai")
    caplog.set_level(logging.CRITICAL, logger="uvicorn.error")


def cheap_positive_document(document: dict) -> dict:
    """The document with n, max_tokens (never null: null means the whole context) and the
    number of prompts capped, and chat's max_tokens required (absent, it too means the
    whole context)."""
    document = copy.deepcopy(document)
    schemas = document["components"]["schemas"]
    for name in ("CompletionRequest", "ChatCompletionRequest", "GenerateRequest"):
        properties = schemas[name]["properties"]
        properties["n"] = {"type": "integer", "maximum": MAX_N}
        properties["max_tokens"] = {"type": "integer", "maximum": MAX_TOKENS}
        properties["min_tokens"] = {"type": "integer", "maximum": MAX_TOKENS}
    schemas["ChatCompletionRequest"]["properties"]["max_completion_tokens"] = {
        "anyOf": [{"type": "integer", "maximum": MAX_TOKENS}, {"type": "null"}]
    }
    schemas["ChatCompletionRequest"]["required"].append("max_tokens")
    for prompt_list in schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]:
        if prompt_list.get("items", {}).get("type") in ("array", "string"):
            prompt_list["maxItems"] = MAX_PROMPTS
    return document


def server_fault(status: int, content_type: str, text: str) -> str | None:
    """Why this response shows a server fault, or None: a 5xx, or a 200 that carries one,
    an error event with a 5xx code in a stream or a choice that finished with "error"
    (an exception in the request's own processing)."""
    if status >= 500:
        return f"status {status}"
    if status != 200:
        return None
    if content_type.startswith("text/event-stream"):
        chunks = [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: {")]
    elif content_type.startswith("application/json"):
        chunks = [text]
    else:
        return None
    for chunk in chunks:
        try:
            body = json.loads(chunk)
        except ValueError:  # schemathesis may stop reading a stream mid-event
            continue
        if not isinstance(body, dict):
            continue
        if isinstance(body.get("error"), dict) and body["error"].get("code", 0) >= 500:
            return f"an error event in a 200 stream: {chunk[:500]}"
        if any(choice.get("finish_reason") == "error" for choice in body.get("choices", [])):
            return f'a choice finished with "error": {chunk[:500]}'
    return None


def error_body_problem(status: int, text: str) -> str | None:
    """Why a 4xx body is not vLLM's error body, or None."""
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return "the body is not a JSON object"
    if not isinstance(error, dict) or set(error) != ERROR_KEYS or error["code"] != status:
        return "the body is not {'error': {message, type, param, code}} with code == status"
    return None


def healthy(base_url: str) -> bool:
    """On a fresh connection: after a 500 the server may reset the one it answered on."""
    return httpx.get(f"{base_url}/health", timeout=CLIENT_TIMEOUT_S).status_code == 200


def assert_serves_as_before(server: InProcessServer, good_text: str) -> None:
    server.wait_idle(timeout=60)
    server.block_manager.check_no_leaks()
    assert healthy(server.base_url)
    response = httpx.post(f"{server.base_url}/v1/completions", json=GOOD, timeout=CLIENT_TIMEOUT_S)
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == good_text, response.text
    server.wait_idle(timeout=10)
    server.block_manager.check_no_leaks()


def fuzz_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )


def tolerate_timeout(base_url: str, what: str, timeouts: list[str]) -> None:
    """A request that outlived the client timeout is fine while the server stays healthy."""
    timeouts.append(what[:300])
    assert healthy(base_url), f"unhealthy after a client timeout: {what[:2000]}"


# ----- schemathesis: every operation of the OpenAPI document --------------------------------


def fuzz_operation(
    operation, mode: GenerationMode, base_url: str, session: requests.Session, sent: Counter, timeouts: list[str]
) -> None:
    @fuzz_settings(SCHEMA_EXAMPLES if operation.body else 1)
    @given(case=operation.as_strategy(generation_mode=mode))
    def send(case):
        sent[operation.label, mode.value] += 1
        try:
            response = case.call(base_url=base_url, session=session, timeout=CLIENT_TIMEOUT_S)
        except requests.Timeout:
            tolerate_timeout(base_url, case.as_curl_command(base_url=base_url), timeouts)
            return
        # Raises with the status, the response and a curl command that sends the case again.
        case.validate_response(response, checks=[not_a_server_error])
        content_type = response.headers.get("content-type", [""])[0]  # lowercase keys, lists of values
        fault = server_fault(response.status_code, content_type, response.text)
        assert fault is None, f"{fault}\n{case.as_curl_command(base_url=base_url)[:4000]}"

    send()


def test_schemathesis_cases_get_no_server_error(server, good_text, document, quiet_logs):
    # Reproducers show every field: schemathesis's sanitizing would hide max_tokens as a secret.
    config = schemathesis.Config.from_dict({"output": {"sanitization": {"enabled": False}}})
    positive = schemathesis.openapi.from_dict(cheap_positive_document(document), config=config)
    negative = schemathesis.openapi.from_dict(document, config=config)
    sent, timeouts, failures = Counter(), [], []
    expected = 0
    start = time.monotonic()
    with requests.Session() as session:
        for mode, schema in ((GenerationMode.POSITIVE, positive), (GenerationMode.NEGATIVE, negative)):
            for result in schema.get_all_operations():
                operation = result.ok()
                if mode is GenerationMode.NEGATIVE and not operation.body:
                    continue  # no parameters and no body: nothing to make invalid
                expected += SCHEMA_EXAMPLES if operation.body else 1
                try:
                    fuzz_operation(operation, mode, server.base_url, session, sent, timeouts)
                except Exception as e:  # every operation runs; all failures are reported at the end
                    failures.append(f"{operation.label} ({mode.value}): {e}")
    print(
        f"\nschemathesis: {sum(sent.values())} cases (at least {expected} intended) in "
        f"{time.monotonic() - start:.0f} s, {len(timeouts)} client timeouts"
    )
    for (label, mode), count in sorted(sent.items()):
        print(f"  {label} {mode}: {count}")
    for what in timeouts:
        print(f"  timed out: {what}")
    assert_serves_as_before(server, good_text)
    assert not failures, "\n\n".join(failures)
    assert sum(sent.values()) >= expected


# ----- raw bodies: bytes, garbled JSON and JSON of any shape --------------------------------

# Text, half of it with a lone surrogate: JSON's "\ud800" escapes parse to strings that UTF-8
# cannot encode. (A high surrogate is lone here: st.text never draws the low one that would pair.)
LONE_SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDBFF)
TEXT = st.text(max_size=20) | st.tuples(st.text(max_size=8), LONE_SURROGATE, st.text(max_size=8)).map("".join)
NUMBERS = st.integers() | st.integers(min_value=-(2**80), max_value=2**80) | st.floats()  # NaN, +-Infinity
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | NUMBERS | TEXT,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(TEXT, children, max_size=5),
    max_leaves=20,
)
# Fields whose served values set how long a request runs; values in this range are made small.
COST_FIELDS = ("n", "max_tokens", "max_completion_tokens")


def cheap(body):
    """`body` with any n or max_tokens the server would serve at length made small; values it
    refuses (zero, negative, over 16384, not numbers) are kept."""
    if isinstance(body, dict):
        for name in COST_FIELDS:
            value = body.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and MAX_TOKENS < value <= 16384:
                body[name] = type(value)(MAX_N)
    return body


def dumps(value) -> bytes:
    return json.dumps(value).encode()  # ASCII: NaN, Infinity and "\ud800" escapes


def field_names(document: dict, route: str, text_only: bool = False) -> list[str]:
    """The fields of the route's request schemas; with `text_only`, those that take a string
    or a list of strings."""

    def takes_text(schema: dict) -> bool:
        items = schema.get("items", {})
        return (
            schema.get("type") == "string"
            or (schema.get("type") == "array" and items.get("type") == "string")
            or any(takes_text(branch) for branch in schema.get("anyOf", []))
        )

    schemas = document["components"]["schemas"]
    return sorted(
        {
            name
            for schema in POST_ROUTES[route]
            for name, field in schemas[schema]["properties"].items()
            if not text_only or takes_text(field)
        }
    )


# A chat message whose role, content and other keys may be anything.
MESSAGE = st.dictionaries(
    st.sampled_from(["role", "content", "name", "tool_calls", "tool_call_id"]) | TEXT,
    TEXT | JSON_VALUES | st.lists(st.fixed_dictionaries({"type": st.just("text") | TEXT, "text": TEXT | JSON_VALUES})),
    max_size=4,
)
KINDS = ["bytes", "garbled", "json", "fields", "one_field", "text_field", "message", "deep", "digits"]


@st.composite
def raw_body(draw, document: dict, route: str) -> bytes:
    """One body of many kinds: what clients get wrong and what a parser may choke on."""
    fields = field_names(document, route)
    good = GOOD_BODIES[route]
    value = TEXT | st.lists(TEXT, max_size=3) | JSON_VALUES
    one_field_changed = st.builds(lambda name, value: {**good, name: value}, st.sampled_from(fields), value)
    kind = draw(st.sampled_from([kind for kind in KINDS if kind != "message" or "messages" in fields]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "garbled":  # a body that was good, cut short or with bytes spliced in
        text = dumps(draw(one_field_changed | st.just(good)))
        cut = draw(st.integers(0, len(text)))
        return text[:cut] + draw(st.binary(max_size=8)) + text[cut + draw(st.integers(0, 8)) :]
    if kind == "json":
        return dumps(draw(JSON_VALUES))
    if kind == "fields":
        return dumps(cheap(draw(st.dictionaries(st.sampled_from(fields) | TEXT, JSON_VALUES, max_size=8))))
    if kind == "one_field":
        return dumps(cheap(draw(one_field_changed)))
    if kind == "text_field":  # text where the server takes text: it is tokenized, logged, echoed
        name = draw(st.sampled_from(field_names(document, route, text_only=True)))
        return dumps({**good, name: draw(TEXT | st.lists(TEXT, min_size=1, max_size=3))})
    if kind == "message":
        return dumps(
            {
                **{k: v for k, v in good.items() if k != "prompt"},
                "messages": draw(st.lists(MESSAGE, min_size=1, max_size=3)),
            }
        )
    if kind == "deep":  # past the JSON parser's recursion limit or near it, at the top or in a field
        depth = draw(st.integers(50, 5000))
        nested = draw(st.sampled_from([b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth]))
        return draw(st.sampled_from([nested, b'{"prompt": ' + nested + b"}", b'{"messages": ' + nested + b"}"]))
    # an integer with more digits than Python's int() takes from a string (4300)
    digits = b"9" * draw(st.integers(1, 6000))
    name = draw(st.sampled_from(fields)).encode()
    return (
        b'{"max_tokens": 4, "'
        + name
        + b'": '
        + digits
        + b', "prompt": "x", "messages": [{"role": "user", "content": "x"}]}'
    )


def raw_post_fault(client: httpx.Client, route: str, body: bytes, timeouts: list[str]) -> tuple[str, str] | None:
    """What is wrong with the server's answer to `body`, as (a key that groups faults alike,
    a report), or None."""
    shown = repr(body) if len(body) <= 1000 else f"{body[:600]!r} ... {body[-100:]!r} ({len(body)} bytes)"
    what = f"POST {route} body={shown}"
    try:
        response = client.post(route, content=body, headers={"content-type": "application/json"})
    except httpx.TimeoutException:
        tolerate_timeout(str(client.base_url).rstrip("/"), what, timeouts)
        return None
    fault = server_fault(response.status_code, response.headers.get("content-type", ""), response.text)
    if fault is None and 400 <= response.status_code < 500:
        fault = error_body_problem(response.status_code, response.text)
    if fault is None:
        return None
    # Alike: the same route and status, and the same error body (or, in a 200, the same kind of fault).
    key = f"{route} {response.status_code} {response.text[:200] if response.status_code != 200 else fault[:30]}"
    return key, f"{what}\n-> {response.status_code}, {fault}: {response.text[:2000]}"


def test_raw_bodies_get_no_server_error_and_a_json_error(server, good_text, document, quiet_logs):
    """Every body is sent whatever the ones before got (no stop at the first fault, so no
    shrinking): each kind of fault is reported once, with the shortest body that got it."""
    sent, timeouts = Counter(), []
    found: dict[str, str] = {}  # cause -> the report of its first body that still fails
    faults: dict[str, tuple[int, str]] = {}  # fault key -> (body length, report)
    start = time.monotonic()
    # A connection per request: after a 500 the server may reset the connection it answered on,
    # and the next body must not be blamed for that.
    with httpx.Client(base_url=server.base_url, timeout=CLIENT_TIMEOUT_S, headers={"connection": "close"}) as client:
        for cause, bodies in FOUND_5XX.items():
            for route, body in bodies:
                if (fault := raw_post_fault(client, route, body, timeouts)) and cause not in found:
                    found[cause] = fault[1]

        @fuzz_settings(RAW_EXAMPLES)
        @given(data=st.data())
        def send(data):
            route = data.draw(st.sampled_from(sorted(POST_ROUTES)), label="route")
            body = data.draw(raw_body(document, route), label="body")
            sent[route] += 1
            if fault := raw_post_fault(client, route, body, timeouts):
                key, report = fault
                if key not in faults or len(body) < faults[key][0]:
                    faults[key] = (len(body), report)

        send()
    num_found = sum(len(bodies) for bodies in FOUND_5XX.values())
    print(
        f"\nraw bodies: {num_found} found earlier, then {sum(sent.values())} random (at least "
        f"{RAW_EXAMPLES} intended) in {time.monotonic() - start:.0f} s, {len(timeouts)} client timeouts"
    )
    for route, count in sorted(sent.items()):
        print(f"  POST {route}: {count}")
    for what in timeouts:
        print(f"  timed out: {what}")
    assert_serves_as_before(server, good_text)
    reports = [f"found earlier, still failing: {cause}:\n{report}" for cause, report in found.items()]
    reports += [f"random (the shortest body of its kind): {report}" for _, report in faults.values()]
    assert not reports, f"{len(reports)} server faults:\n\n" + "\n\n".join(reports)
    assert sum(sent.values()) >= RAW_EXAMPLES
