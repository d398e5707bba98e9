"""The server as the official `openai` client sees it: completions, chat, streaming, n,
logprobs, echo, stops, models; greedy texts equal offline `LLM.generate` / `LLM.chat`.
Every test runs against the server on one device and with `--tensor-parallel-size 2`
(eight virtual CPU devices, tests/conftest.py); the offline reference runs on one."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from jllm import LLM, SamplingParams
from openai_server import InProcessServer, server_args
from tiny_model import ENGINE_ARGS, MAX_MODEL_LEN

MODEL_NAME = "tiny-llama"
PROMPT = "The capital of France is"
CONVERSATION = [{"role": "user", "content": "Write a haiku about JAX."}]
# --chat-template: SmolLM2's turn markers without the default system prompt its own template adds.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module", params=[1, pytest.param(2, marks=pytest.mark.slow)], ids=["tp1", "tp2"])
def server(request, tiny_llama_path, tmp_path_factory):
    template_path = tmp_path_factory.mktemp("template") / "chat_template.jinja"
    template_path.write_text(CHAT_TEMPLATE)
    server = InProcessServer(
        server_args(
            tiny_llama_path,
            "--served-model-name",
            MODEL_NAME,
            "--chat-template",
            str(template_path),
            "--trust-request-chat-template",
            "--tensor-parallel-size",
            str(request.param),
        )
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def llm(tiny_llama_path):
    return LLM(model=tiny_llama_path, **ENGINE_ARGS)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def offline(llm, prompt, **kwargs):
    return llm.generate([prompt], SamplingParams(temperature=0.0, **kwargs), use_tqdm=False)[0].outputs[0]


def test_models_lists_the_served_name_and_context(client, tiny_llama_path):
    [model] = client.models.list().data
    assert model.id == MODEL_NAME and model.owned_by == "vllm"
    assert model.root == tiny_llama_path and model.max_model_len == MAX_MODEL_LEN


def test_greedy_completion_equals_offline_generate(client, llm):
    expected = offline(llm, PROMPT, max_tokens=10)
    completion = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0)
    [choice] = completion.choices
    assert choice.text == expected.text and choice.finish_reason == "length"
    assert completion.id.startswith("cmpl-") and completion.model == MODEL_NAME
    prompt_len = len(llm.get_tokenizer().encode(PROMPT))
    usage = completion.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (prompt_len, 10, prompt_len + 10)


def test_completion_max_tokens_defaults_to_16(client):
    completion = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True}
    )
    assert completion.usage.completion_tokens == 16


def test_token_id_prompt_gives_the_same_completion(client, llm):
    ids = llm.get_tokenizer().encode(PROMPT)
    by_text = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0)
    by_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_several_prompts_come_back_in_order(client, llm):
    prompts = [PROMPT, "Once upon a time", "1, 2, 3,"]
    completion = client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=5, temperature=0)
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert [c.text for c in completion.choices] == [offline(llm, p, max_tokens=5).text for p in prompts]


def test_streaming_completion_concatenates_to_the_whole_text(client):
    whole = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0)
    chunks = list(
        client.completions.create(
            model=MODEL_NAME,
            prompt=PROMPT,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 8
    assert usage_chunk.usage.prompt_tokens == whole.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_n_seeded_samples_are_reproducible(client):
    kwargs = dict(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=6, n=3, temperature=1.0, seed=7, extra_body={"ignore_eos": True}
    )
    first, second = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert len({c.text for c in first.choices}) > 1  # n samples, not one sample n times
    assert first.usage.completion_tokens == 18


def test_streaming_n_samples_each_finish_once(client):
    chunks = list(
        client.completions.create(
            model=MODEL_NAME,
            prompt=PROMPT,
            max_tokens=5,
            n=2,
            temperature=1.0,
            seed=3,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    finishes = [(c.choices[0].index, c.choices[0].finish_reason) for c in chunks if c.choices[0].finish_reason]
    assert sorted(finishes) == [(0, "length"), (1, "length")]
    texts = {i: "".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in (0, 1)}
    whole = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=5, n=2, temperature=1.0, seed=3, extra_body={"ignore_eos": True}
    )
    assert texts == {c.index: c.text for c in whole.choices}


def test_completion_logprobs(client, llm):
    completion = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    choice = completion.choices[0]
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text and len(lp.tokens) == 5
    assert all(x <= 0 for x in lp.token_logprobs)
    assert lp.text_offset[0] == 0
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for token, token_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4
        # Greedy: the chosen token is the most likely one.
        assert top[token] == pytest.approx(token_lp) and token_lp == pytest.approx(max(top.values()))
    expected = offline(llm, PROMPT, max_tokens=5, logprobs=3)
    assert lp.token_logprobs == pytest.approx(
        [step[t].logprob for step, t in zip(expected.logprobs, expected.token_ids)], abs=1e-4
    )


def test_echo_returns_prompt_then_completion(client):
    plain = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0)
    echoed = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=4, temperature=0, echo=True, logprobs=1
    )
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    lp = echoed.choices[0].logprobs
    prompt_len = plain.usage.prompt_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    assert len(lp.tokens) == prompt_len + 4 and all(x is not None for x in lp.token_logprobs[1:])


def test_stop_string_and_stop_token_ids(client):
    base = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"return_token_ids": True}
    )
    text, token_ids = base.choices[0].text, base.choices[0].token_ids
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)]
    assert (cut.choices[0].finish_reason, cut.choices[0].stop_reason) == ("stop", stop)
    by_id = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT,
        max_tokens=8,
        temperature=0,
        extra_body={"stop_token_ids": [token_ids[2]], "return_token_ids": True},
    )
    choice = by_id.choices[0]
    assert choice.token_ids == token_ids[:3] and (choice.finish_reason, choice.stop_reason) == ("stop", token_ids[2])


def test_greedy_chat_equals_offline_chat_with_the_servers_template(client, llm):
    expected = llm.chat(
        CONVERSATION, SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False, chat_template=CHAT_TEMPLATE
    )[0]
    default = llm.chat(CONVERSATION, SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)[0]
    assert len(default.prompt_token_ids) > len(expected.prompt_token_ids)  # the template is not the tokenizer's
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=CONVERSATION, max_completion_tokens=8, temperature=0
    )
    [choice] = chat.choices
    assert chat.id.startswith("chatcmpl-") and chat.object == "chat.completion"
    assert choice.message.role == "assistant" and choice.message.content == expected.outputs[0].text
    assert chat.usage.prompt_tokens == len(expected.prompt_token_ids) and chat.usage.completion_tokens == 8


def test_chat_max_tokens_defaults_to_the_rest_of_the_context(client, llm):
    long_conversation = [{"role": "user", "content": "word " * 240}]
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=long_conversation, temperature=0, extra_body={"ignore_eos": True}
    )
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.total_tokens == MAX_MODEL_LEN


def test_streaming_chat(client):
    whole = client.chat.completions.create(model=MODEL_NAME, messages=CONVERSATION, max_tokens=6, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=CONVERSATION,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    first, text_chunks, usage_chunk = chunks[0], chunks[1:-1], chunks[-1]
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content for c in text_chunks) == whole.choices[0].message.content
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 6


def test_streaming_chat_n_choices(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME, messages=CONVERSATION, max_tokens=4, n=3, temperature=0.8, seed=1, stream=True
        )
    )
    roles = [c.choices[0].index for c in chunks if c.choices[0].delta.role == "assistant"]
    finished = sorted(c.choices[0].index for c in chunks if c.choices[0].finish_reason)
    assert roles == [0, 1, 2] and finished == [0, 1, 2]


def test_a_request_chat_template_is_honoured_when_trusted(client, llm):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=CONVERSATION, max_tokens=2, temperature=0, extra_body={"chat_template": template}
    )
    assert chat.usage.prompt_tokens == len(llm.get_tokenizer().encode(CONVERSATION[0]["content"]))


def test_chat_content_parts_are_joined(client):
    parts = [{"type": "text", "text": "Write a haiku"}, {"type": "text", "text": "about JAX."}]
    as_parts = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": parts}], max_tokens=4, temperature=0
    )
    as_text = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Write a haiku\nabout JAX."}],
        max_tokens=4,
        temperature=0,
    )
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content
    assert as_parts.usage.prompt_tokens == as_text.usage.prompt_tokens


def test_chat_logprobs(client):
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=CONVERSATION, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    choice = chat.choices[0]
    content = choice.logprobs.content
    assert "".join(c.token for c in content) == choice.message.content and len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token


def test_chat_echo_and_continue_final_message(client):
    conversation = CONVERSATION + [{"role": "assistant", "content": "Arrays"}]
    chat = client.chat.completions.create(
        model=MODEL_NAME,
        messages=conversation,
        max_tokens=4,
        temperature=0,
        extra_body={"echo": True, "add_generation_prompt": False, "continue_final_message": True},
    )
    assert chat.choices[0].message.content.startswith("Arrays")
    assert len(chat.choices[0].message.content) > len("Arrays")


def test_legacy_generate_endpoint(server, llm):
    expected = offline(llm, PROMPT, max_tokens=5)
    response = httpx.post(f"{server.base_url}/generate", json={"prompt": PROMPT, "max_tokens": 5, "temperature": 0})
    assert response.status_code == 200 and response.json() == {"text": [PROMPT + expected.text]}
    with httpx.stream(
        "POST",
        f"{server.base_url}/generate",
        json={"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True},
    ) as streamed:
        lines = [line for line in streamed.iter_lines() if line]
    texts = [json.loads(line)["text"][0] for line in lines]
    assert texts[-1] == PROMPT + expected.text and all(t.startswith(PROMPT) for t in texts)


def test_tokenize_detokenize_roundtrip(server, llm):
    tokenizer = llm.get_tokenizer()
    response = httpx.post(f"{server.base_url}/tokenize", json={"prompt": PROMPT, "return_token_strs": True}).json()
    assert response["tokens"] == tokenizer.encode(PROMPT) and response["count"] == len(response["tokens"])
    assert response["max_model_len"] == MAX_MODEL_LEN
    assert response["token_strs"] == tokenizer.convert_ids_to_tokens(response["tokens"])
    back = httpx.post(f"{server.base_url}/detokenize", json={"tokens": response["tokens"]}).json()
    assert back == {"prompt": PROMPT}
    chat = httpx.post(f"{server.base_url}/tokenize", json={"messages": CONVERSATION}).json()
    text = tokenizer.apply_chat_template(
        CONVERSATION, chat_template=CHAT_TEMPLATE, add_generation_prompt=True, tokenize=False
    )
    assert chat["tokens"] == tokenizer.encode(text, add_special_tokens=False)


def test_health_and_version(server):
    import jllm

    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert httpx.get(f"{server.base_url}/version").json() == {"version": jllm.__version__}


def test_chat_template_flag_reads_a_file_or_a_literal(tmp_path):
    from jllm.entrypoints.openai.chat_utils import load_chat_template

    path = tmp_path / "t.jinja"
    path.write_text(CHAT_TEMPLATE)
    assert load_chat_template(str(path)) == CHAT_TEMPLATE
    assert load_chat_template("{{ messages[0]['content'] }}\\n") == "{{ messages[0]['content'] }}\n"
    with pytest.raises(ValueError, match=r"appears path-like, but doesn't exist!"):
        load_chat_template("templates/missing.jinja")
