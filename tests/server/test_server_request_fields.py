"""An audit of every field of the completion and chat request bodies: each is honoured
(its effect is checked here) or refused with a 400 naming it; none is accepted and
silently ignored. A field added to the protocol without an entry here fails the audit.

Sampling fields are checked against offline `LLM.generate` with the same SamplingParams
value (whose semantics the sampler tests check against numpy), and only where that value
changes the offline output, so a field that the server dropped would be caught.
"""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
from transformers import AutoTokenizer

from jllm import LLM, SamplingParams
from jllm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from openai_server import InProcessServer, server_args
from tiny_model import ENGINE_ARGS, EOS_TOKEN_ID

# Slow tier: one live-server case per request field.
pytestmark = pytest.mark.slow

MODEL_NAME = "tiny"
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name a colour."}]
# A template that shows what each chat field changes: roles, turn ends, the generation
# prompt, tools, documents and a template keyword.
TEMPLATE = (
    "{% if tools %}tools={{ tools | tojson }};{% endif %}{% if documents %}docs={{ documents | tojson }};"
    "{% endif %}{% if greeting is defined %}{{ greeting }};{% endif %}"
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if not (continue_final_message and loop.last)"
    " %}<end>{% endif %}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
SERVER_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
GREEDY = {"temperature": 0.0, "max_tokens": 12}
RANDOM = {"temperature": 1.0, "seed": 5, "max_tokens": 12}
TOOL = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def model_path(tiny_llama_path, tmp_path_factory) -> str:
    """The tiny model with a tokenizer that adds BOS, so add_special_tokens shows."""
    folder = tmp_path_factory.mktemp("tiny_bos")
    shutil.copytree(tiny_llama_path, folder, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    tokenizer.add_bos_token = True
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def server(model_path):
    server = InProcessServer(
        server_args(
            model_path,
            "--served-model-name",
            MODEL_NAME,
            "--chat-template",
            SERVER_TEMPLATE,
            "--trust-request-chat-template",
            "--enable-prompt-tokens-details",
            "--enable-log-requests",
        )
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def llm(model_path):
    return LLM(model=model_path, **ENGINE_ARGS)


class Audit:
    """Sends a request through a route and compares with the offline engine."""

    def __init__(self, server, llm, route: str) -> None:
        self.server, self.llm, self.route = server, llm, route

    def send(self, **fields) -> httpx.Response:
        body = {"model": MODEL_NAME, **GREEDY, **fields}
        if self.route == "chat":
            body.setdefault("messages", MESSAGES)
            path = "/v1/chat/completions"
        else:
            body.setdefault("prompt", PROMPT)
            path = "/v1/completions"
        return httpx.post(f"{self.server.base_url}{path}", json=body, timeout=120)

    def ok(self, **fields) -> dict:
        response = self.send(**fields)
        assert response.status_code == 200, response.text
        return response.json()

    def refused(self, field: str, value) -> None:
        response = self.send(**{field: value})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == field

    def prompt_ids(self, data: dict) -> list[int]:
        return data["prompt_token_ids"] if self.route == "chat" else data["choices"][0]["prompt_token_ids"]

    def text(self, data: dict) -> str:
        choice = data["choices"][0]
        return choice["message"]["content"] if self.route == "chat" else choice["text"]

    def offline(self, prompt_ids: list[int], **params) -> list[list[int]]:
        output = self.llm.generate([{"prompt_token_ids": prompt_ids}], SamplingParams(**params), use_tqdm=False)[0]
        return [list(c.token_ids) for c in output.outputs]

    def same_as_offline(self, fields: dict, params: dict | None = None, base: dict | None = None) -> dict:
        """The server's tokens equal offline generation with `params` (default: the same
        fields), and `params` change the offline tokens from `base`."""
        params = {**GREEDY, **fields} if params is None else params
        data = self.ok(**fields, return_token_ids=True)
        prompt_ids = self.prompt_ids(data)
        expected = self.offline(prompt_ids, **params)
        assert [c["token_ids"] for c in data["choices"]] == expected
        assert expected != self.offline(prompt_ids, **(base or GREEDY)), "the value must change the output"
        return data


def greedy_tokens(a: Audit) -> list[int]:
    return a.ok(return_token_ids=True)["choices"][0]["token_ids"]


def check_stop(a: Audit) -> None:
    base = a.ok(**GREEDY)
    stop = a.text(base)[4:7]
    data = a.ok(stop=[stop])
    choice = data["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    assert a.text(data) == a.text(base)[: a.text(base).index(stop)]


def check_include_stop_str(a: Audit) -> None:
    base = a.text(a.ok())
    stop = base[4:7]
    assert a.text(a.ok(stop=stop, include_stop_str_in_output=True)) == base[: base.index(stop) + len(stop)]


def check_stop_token_ids(a: Audit) -> None:
    tokens = greedy_tokens(a)
    choice = a.ok(stop_token_ids=[tokens[3]], return_token_ids=True)["choices"][0]
    assert choice["token_ids"] == tokens[: tokens.index(tokens[3]) + 1] and choice["stop_reason"] == tokens[3]


EOS_FIRST = {"logit_bias": {str(EOS_TOKEN_ID): 100}}


def check_ignore_eos(a: Audit) -> None:
    assert a.ok(**EOS_FIRST)["usage"]["completion_tokens"] == 1
    assert a.ok(**EOS_FIRST, ignore_eos=True)["usage"]["completion_tokens"] == GREEDY["max_tokens"]


def check_min_tokens(a: Audit) -> None:
    choice = a.ok(**EOS_FIRST, min_tokens=4, return_token_ids=True)["choices"][0]
    assert len(choice["token_ids"]) == 5 and choice["token_ids"][-1] == EOS_TOKEN_ID


def check_skip_special_tokens(a: Audit) -> None:
    fields = {**EOS_FIRST, "ignore_eos": True, "max_tokens": 2}
    assert a.text(a.ok(**fields)) == ""
    assert a.text(a.ok(**fields, skip_special_tokens=False)) == "<|im_end|><|im_end|>"


def check_spaces_between_special_tokens(a: Audit) -> None:
    # vLLM (and jllm's detokenizer) apply it to slow tokenizers' added tokens only; a fast
    # tokenizer's decoder places its own spaces. So the check is that it reaches the
    # request's SamplingParams.
    request_type = ChatCompletionRequest if a.route == "chat" else CompletionRequest
    body = {"messages": MESSAGES} if a.route == "chat" else {"prompt": PROMPT}
    params = request_type(**body, spaces_between_special_tokens=False).to_sampling_params(4, {})
    assert params.spaces_between_special_tokens is False
    assert a.ok(spaces_between_special_tokens=False)["choices"]


def check_truncate_prompt_tokens(a: Audit) -> None:
    full = a.prompt_ids(a.ok(return_token_ids=True))
    data = a.ok(truncate_prompt_tokens=3, return_token_ids=True)
    assert a.prompt_ids(data) == full[-3:] and data["usage"]["prompt_tokens"] == 3
    assert [data["choices"][0]["token_ids"]] == a.offline(full[-3:], **GREEDY)


def check_allowed_token_ids(a: Audit) -> None:
    allowed = [500, 600, 700]
    assert set(a.ok(allowed_token_ids=allowed, return_token_ids=True)["choices"][0]["token_ids"]) <= set(allowed)


def check_bad_words(a: Audit) -> None:
    tokens = greedy_tokens(a)
    word = a.llm.get_tokenizer().decode([tokens[0]]).strip()
    a.same_as_offline({"bad_words": [word]})


def check_logit_bias(a: Audit) -> None:
    tokens = greedy_tokens(a)
    a.same_as_offline({"logit_bias": {str(tokens[0]): -100}}, {**GREEDY, "logit_bias": {tokens[0]: -100}})


def check_prompt_logprobs(a: Audit) -> None:
    data = a.ok(prompt_logprobs=1, return_token_ids=True)
    prompt_logprobs = data["prompt_logprobs"] if a.route == "chat" else data["choices"][0]["prompt_logprobs"]
    assert len(prompt_logprobs) == len(a.prompt_ids(data)) and prompt_logprobs[0] is None


def sse(response: httpx.Response) -> list[dict]:
    lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def check_stream(a: Audit) -> None:
    chunks = sse(a.send(stream=True))
    assert len(chunks) > 2 and all(c["object"].endswith("chunk") or c["object"] == "text_completion" for c in chunks)


def check_stream_options(a: Audit) -> None:
    chunks = sse(a.send(stream=True, stream_options={"include_usage": True}))
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == GREEDY["max_tokens"]
    chunks = sse(a.send(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert all(c["usage"] for c in chunks)
    assert all(c.get("usage") is None for c in sse(a.send(stream=True)))


def check_user(a: Audit, caplog) -> None:
    with caplog.at_level("INFO", logger="jllm.entrypoints.openai.requests"):
        a.ok(user="user-1234")
    assert any("user: 'user-1234'" in r.getMessage() for r in caplog.records)


def check_response_format(a: Audit) -> None:
    assert a.ok(response_format={"type": "text"})["choices"]
    a.refused("response_format", {"type": "json_object"})


def check_request_id(a: Audit) -> None:
    prefix = "chatcmpl-" if a.route == "chat" else "cmpl-"
    assert a.ok(request_id="audit-1")["id"] == prefix + "audit-1"


def check_return_tokens_as_token_ids(a: Audit) -> None:
    if a.route == "chat":
        content = a.ok(logprobs=True, return_tokens_as_token_ids=True)["choices"][0]["logprobs"]["content"]
        tokens = [c["token"] for c in content]
    else:
        tokens = a.ok(logprobs=0, return_tokens_as_token_ids=True)["choices"][0]["logprobs"]["tokens"]
    assert [int(t.removeprefix("token_id:")) for t in tokens] == greedy_tokens(a)


def check_return_token_ids(a: Audit) -> None:
    data = a.ok(return_token_ids=True)
    assert len(data["choices"][0]["token_ids"]) == GREEDY["max_tokens"] and a.prompt_ids(data)
    assert a.ok()["choices"][0]["token_ids"] is None


def check_cache_salt(a: Audit) -> None:
    long = (
        {"messages": [{"role": "user", "content": "colour " * 60}]} if a.route == "chat" else {"prompt": "colour " * 60}
    )

    def cached(**fields) -> int:
        details = a.ok(**long, **fields, max_tokens=1)["usage"]["prompt_tokens_details"]
        return details["cached_tokens"] if details else 0

    cached(cache_salt=f"{a.route}-a")
    assert cached(cache_salt=f"{a.route}-a") > 0
    assert cached(cache_salt=f"{a.route}-b") == 0


def check_model(a: Audit) -> None:
    assert a.ok(model=MODEL_NAME)["model"] == MODEL_NAME
    response = a.send(model="other")
    assert response.status_code == 404 and response.json()["error"]["param"] == "model"


def check_n(a: Audit) -> None:
    data = a.same_as_offline({**RANDOM, "n": 2}, base={**RANDOM, "n": 2, "seed": 6})
    assert [c["index"] for c in data["choices"]] == [0, 1]


def check_echo(a: Audit) -> None:
    if a.route == "chat":
        messages = [*MESSAGES, {"role": "assistant", "content": "Blue"}]
        data = a.ok(messages=messages, add_generation_prompt=False, continue_final_message=True, echo=True)
        assert a.text(data).startswith("Blue") and len(a.text(data)) > 4
    else:
        assert a.text(a.ok(echo=True)).startswith(PROMPT)


def check_max_tokens(a: Audit) -> None:
    assert a.ok(max_tokens=3)["usage"]["completion_tokens"] == 3


def check_logprobs(a: Audit) -> None:
    if a.route == "chat":
        content = a.ok(logprobs=True, top_logprobs=2)["choices"][0]["logprobs"]["content"]
        assert len(content) == GREEDY["max_tokens"] and all(len(c["top_logprobs"]) == 2 for c in content)
        assert a.ok()["choices"][0]["logprobs"] is None
    else:
        logprobs = a.ok(logprobs=2)["choices"][0]["logprobs"]
        assert len(logprobs["tokens"]) == GREEDY["max_tokens"]
        assert all(2 <= len(top) <= 3 for top in logprobs["top_logprobs"])


def check_prompt(a: Audit) -> None:
    ids = [1000 + i for i in range(7)]
    data = a.ok(prompt=ids, return_token_ids=True)
    assert a.prompt_ids(data) == ids and [data["choices"][0]["token_ids"]] == a.offline(ids, **GREEDY)


def check_add_special_tokens(a: Audit) -> None:
    """Completions add the tokenizer's BOS by default, chat (whose template has its own) not."""
    bos = a.llm.get_tokenizer().bos_token_id
    default = a.prompt_ids(a.ok(return_token_ids=True))
    flipped = a.prompt_ids(a.ok(return_token_ids=True, add_special_tokens=a.route == "chat"))
    with_bos, without = (flipped, default) if a.route == "chat" else (default, flipped)
    assert with_bos == [bos] + without


def rendered(a: Audit, **fields) -> str:
    return a.llm.get_tokenizer().decode(a.prompt_ids(a.ok(chat_template=TEMPLATE, return_token_ids=True, **fields)))


def check_messages(a: Audit) -> None:
    assert rendered(a, messages=[{"role": "user", "content": "Hi there"}]) == "user: Hi there<end>assistant:"


def check_add_generation_prompt(a: Audit) -> None:
    assert rendered(a, add_generation_prompt=False) == "user: Name a colour.<end>"


def check_continue_final_message(a: Audit) -> None:
    messages = [*MESSAGES, {"role": "assistant", "content": "Bl"}]
    text = rendered(a, messages=messages, add_generation_prompt=False, continue_final_message=True)
    assert text == "user: Name a colour.<end>assistant: Bl"


def check_chat_template(a: Audit) -> None:
    assert rendered(a) == "user: Name a colour.<end>assistant:"
    assert a.llm.get_tokenizer().decode(a.prompt_ids(a.ok(return_token_ids=True))) == "Name a colour."


def check_chat_template_kwargs(a: Audit) -> None:
    assert rendered(a, chat_template_kwargs={"greeting": "hello"}).startswith("hello;user:")


def check_tools(a: Audit) -> None:
    assert rendered(a, tools=[TOOL]).startswith('tools=[{"type": "function"')


def check_documents(a: Audit) -> None:
    assert rendered(a, documents=[{"title": "t", "text": "x"}]).startswith('docs=[{"title": "t"')


def check_tool_choice(a: Audit) -> None:
    assert a.ok(tools=[TOOL], tool_choice="none")["choices"]
    a.refused("tool_choice", "auto")
    a.refused("tool_choice", {"type": "function", "function": {"name": "weather"}})


def check_parallel_tool_calls(a: Audit) -> None:
    # Tool calls are parsed only with tool_choice "auto" or a named tool, both refused
    # (no tool parser yet); without them there are no tool calls to run in parallel.
    assert a.ok(tools=[TOOL], parallel_tool_calls=True)["choices"][0]["message"]["tool_calls"] == []
    response = a.send(tools=[TOOL], parallel_tool_calls=True, tool_choice="auto")
    assert response.status_code == 400 and response.json()["error"]["param"] == "tool_choice"


def check_max_completion_tokens(a: Audit) -> None:
    assert a.ok(max_completion_tokens=4)["usage"]["completion_tokens"] == 4
    assert a.ok(max_completion_tokens=4, max_tokens=6)["usage"]["completion_tokens"] == 4


def refused(value):
    return lambda field: lambda a: a.refused(field, value)


def sampling(fields: dict, base: dict | None = None):
    return lambda field: lambda a: a.same_as_offline(fields, base=base)


def plain(check):
    return lambda field: check


SHARED = {
    "model": plain(check_model),
    # Negative: greedy text from random weights rarely repeats, so a penalty would change
    # nothing; a reward for what was generated does.
    "frequency_penalty": sampling({"frequency_penalty": -2.0}),
    "presence_penalty": sampling({"presence_penalty": -2.0}),
    "repetition_penalty": sampling({"repetition_penalty": 0.2}),
    "logit_bias": plain(check_logit_bias),
    "n": plain(check_n),
    "seed": sampling(RANDOM, {**RANDOM, "seed": 6}),
    "temperature": sampling({"temperature": 1.5, "seed": 5}),
    "top_p": sampling({**RANDOM, "top_p": 0.05}, RANDOM),
    "top_k": sampling({**RANDOM, "top_k": 2}, RANDOM),
    "min_p": sampling({**RANDOM, "min_p": 0.6}, RANDOM),
    "stop": plain(check_stop),
    "stream": plain(check_stream),
    "stream_options": plain(check_stream_options),
    "user": None,  # needs caplog: test_user_is_logged
    "response_format": plain(check_response_format),
    "use_beam_search": refused(True),
    "stop_token_ids": plain(check_stop_token_ids),
    "include_stop_str_in_output": plain(check_include_stop_str),
    "ignore_eos": plain(check_ignore_eos),
    "min_tokens": plain(check_min_tokens),
    "skip_special_tokens": plain(check_skip_special_tokens),
    "spaces_between_special_tokens": plain(check_spaces_between_special_tokens),
    "truncate_prompt_tokens": plain(check_truncate_prompt_tokens),
    "allowed_token_ids": plain(check_allowed_token_ids),
    "bad_words": plain(check_bad_words),
    "prompt_logprobs": plain(check_prompt_logprobs),
    "request_id": plain(check_request_id),
    "return_tokens_as_token_ids": plain(check_return_tokens_as_token_ids),
    "return_token_ids": plain(check_return_token_ids),
    "cache_salt": plain(check_cache_salt),
    "vllm_xargs": refused({"key": 1}),
    "structured_outputs": refused({"choice": ["a", "b"]}),
    "guided_json": refused({"type": "object"}),
    "guided_regex": refused("[a-z]+"),
    "guided_choice": refused(["a", "b"]),
    "guided_grammar": refused("root ::= 'a'"),
    "guided_decoding_backend": refused("xgrammar"),
    "guided_whitespace_pattern": refused(" "),
    "structural_tag": refused("{}"),
    "echo": plain(check_echo),
    "max_tokens": plain(check_max_tokens),
    "logprobs": plain(check_logprobs),
}
COMPLETION_ONLY = {
    "prompt": plain(check_prompt),
    "suffix": refused("!"),
    "add_special_tokens": plain(check_add_special_tokens),
}
CHAT_ONLY = {
    "messages": plain(check_messages),
    "add_generation_prompt": plain(check_add_generation_prompt),
    "continue_final_message": plain(check_continue_final_message),
    "add_special_tokens": plain(check_add_special_tokens),
    "chat_template": plain(check_chat_template),
    "chat_template_kwargs": plain(check_chat_template_kwargs),
    "tools": plain(check_tools),
    "documents": plain(check_documents),
    "top_logprobs": plain(check_logprobs),
    "max_completion_tokens": plain(check_max_completion_tokens),
    "tool_choice": plain(check_tool_choice),
    "parallel_tool_calls": plain(check_parallel_tool_calls),
}
AUDIT = {"completion": {**SHARED, **COMPLETION_ONLY}, "chat": {**SHARED, **CHAT_ONLY}}
REQUEST_TYPES = {"completion": CompletionRequest, "chat": ChatCompletionRequest}


@pytest.mark.parametrize("route", ["completion", "chat"])
def test_every_request_field_is_audited(route):
    assert set(REQUEST_TYPES[route].model_fields) == set(AUDIT[route])


@pytest.mark.parametrize("route, field", [(r, f) for r in AUDIT for f, c in AUDIT[r].items() if c is not None])
def test_request_field_is_honoured_or_refused(server, llm, route, field):
    AUDIT[route][field](field)(Audit(server, llm, route))


@pytest.mark.parametrize("route", ["completion", "chat"])
def test_user_is_logged(server, llm, route, caplog):
    check_user(Audit(server, llm, route), caplog)


# ----- /tokenize, /detokenize and /generate -------------------------------------------------


def tokenize(server, **fields) -> dict:
    response = httpx.post(f"{server.base_url}/tokenize", json={"model": MODEL_NAME, **fields}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def chat_tokens_text(server, llm, **fields) -> str:
    tokens = tokenize(server, messages=MESSAGES, chat_template=TEMPLATE, **fields)["tokens"]
    return llm.get_tokenizer().decode(tokens)


TOKENIZE_AUDIT = {
    "model": lambda s, llm: (
        httpx.post(f"{s.base_url}/tokenize", json={"model": "other", "prompt": "a"}).status_code == 404
    ),
    "prompt": lambda s, llm: tokenize(s, prompt=PROMPT)["tokens"] == llm.get_tokenizer().encode(PROMPT),
    "add_special_tokens": lambda s, llm: (
        tokenize(s, prompt=PROMPT)["tokens"]
        == [llm.get_tokenizer().bos_token_id] + tokenize(s, prompt=PROMPT, add_special_tokens=False)["tokens"]
    ),
    "return_token_strs": lambda s, llm: (
        tokenize(s, prompt=PROMPT, return_token_strs=True)["token_strs"]
        == llm.get_tokenizer().convert_ids_to_tokens(llm.get_tokenizer().encode(PROMPT))
    ),
    "messages": lambda s, llm: chat_tokens_text(s, llm) == "user: Name a colour.<end>assistant:",
    "add_generation_prompt": lambda s, llm: (
        chat_tokens_text(s, llm, add_generation_prompt=False) == "user: Name a colour.<end>"
    ),
    "continue_final_message": lambda s, llm: (
        llm.get_tokenizer().decode(
            tokenize(
                s,
                messages=[*MESSAGES, {"role": "assistant", "content": "Bl"}],
                chat_template=TEMPLATE,
                add_generation_prompt=False,
                continue_final_message=True,
            )["tokens"]
        )
        == "user: Name a colour.<end>assistant: Bl"
    ),
    "chat_template": lambda s, llm: (
        llm.get_tokenizer().decode(tokenize(s, messages=MESSAGES)["tokens"]) == "Name a colour."
    ),
    "chat_template_kwargs": lambda s, llm: chat_tokens_text(s, llm, chat_template_kwargs={"greeting": "hi"}).startswith(
        "hi;user:"
    ),
    "tools": lambda s, llm: chat_tokens_text(s, llm, tools=[TOOL]).startswith("tools=["),
    "documents": lambda s, llm: chat_tokens_text(s, llm, documents=[{"title": "t", "text": "x"}]).startswith("docs=["),
}


def test_every_tokenize_field_is_audited():
    from jllm.entrypoints.openai.protocol import TokenizeChatRequest, TokenizeCompletionRequest

    fields = set(TokenizeCompletionRequest.model_fields) | set(TokenizeChatRequest.model_fields)
    assert fields == set(TOKENIZE_AUDIT) | {"add_special_tokens"}


@pytest.mark.parametrize("field", list(TOKENIZE_AUDIT))
def test_tokenize_field_is_honoured(server, llm, field):
    assert TOKENIZE_AUDIT[field](server, llm)


def test_detokenize_and_generate_fields_all_reach_their_use():
    """/detokenize reads model and tokens; /generate passes every field but prompt and
    stream to SamplingParams by name (and refuses unknown ones)."""
    import dataclasses

    from jllm.entrypoints.openai.protocol import DetokenizeRequest, GenerateRequest

    assert set(DetokenizeRequest.model_fields) == {"model", "tokens"}
    sampling_fields = {f.name for f in dataclasses.fields(SamplingParams) if f.init}
    assert set(GenerateRequest.model_fields) - {"prompt", "stream"} <= sampling_fields
