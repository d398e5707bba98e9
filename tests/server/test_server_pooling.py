"""The pooling routes as vLLM serves them: /v1/embeddings (through the official `openai`
client too), /pooling, /classify, /score, /rerank; values equal the offline LLM's on the
same model and HF transformers' own; vLLM's refusals for routes a model's task cannot serve
and for bad inputs, after which the server goes on serving; a list input is one engine
step's batch, and a client that leaves aborts it. SageMaker's /invocations and run-batch's
lines reach the same handlers."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM, Qwen2Config, Qwen2ForSequenceClassification

from hf_models import _TINY_DIMS, randomize_weights
from jllm import LLM, PoolingParams
from jllm.entrypoints.openai.protocol_pooling import ScoreRequest
from openai_server import InProcessServer, engine_flags, server_args

# Pooling requests run whole in one step, so a step holds max_model_len tokens at least.
MAX_MODEL_LEN = 128
ENGINE_ARGS = dict(
    max_model_len=MAX_MODEL_LEN,
    max_num_batched_tokens=256,
    max_num_seqs=16,
    compilation_config={"token_buckets": [32, 128]},
    seed=0,
)
EMBED_MODEL, RERANK_MODEL, CLASSIFY_MODEL = "tiny-embed", "tiny-reranker", "tiny-classifier"
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
TEXTS = ["The capital of France is", "Once upon a time", "JAX compiles numpy programs", "hello"]
QUERY = "What is the capital of France?"
DOCUMENTS = ["Paris is the capital of France.", "The sea is deep.", "France is in Europe.", "Cats sleep a lot."]


def pooling_server(model: str, *extra: str) -> InProcessServer:
    from jllm.entrypoints.openai.cli_args import make_arg_parser

    parser = make_arg_parser(argparse.ArgumentParser())
    return InProcessServer(parser.parse_args(["--model", model, *engine_flags(ENGINE_ARGS), *extra]))


def save_qwen2_classifier(folder: str, tokenizer_path: str, num_labels: int, seed: int) -> str:
    """A 2-layer random-weight Qwen2ForSequenceClassification with SmolLM2's tokenizer."""
    labels = {"id2label": LABELS, "label2id": {v: k for k, v in LABELS.items()}} if num_labels == 3 else {}
    config = Qwen2Config(
        **{**_TINY_DIMS, "num_hidden_layers": 2}, use_sliding_window=False, num_labels=num_labels, **labels
    )
    torch.manual_seed(seed)
    model = Qwen2ForSequenceClassification(config).to(torch.float32)
    randomize_weights(model, seed)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reranker_path(tiny_llama_path, tmp_path_factory) -> str:
    return save_qwen2_classifier(str(tmp_path_factory.mktemp("reranker")), tiny_llama_path, 1, seed=1)


@pytest.fixture(scope="module")
def classifier_path(tiny_llama_path, tmp_path_factory) -> str:
    return save_qwen2_classifier(str(tmp_path_factory.mktemp("classifier")), tiny_llama_path, 3, seed=2)


def serve(model: str, name: str, *extra: str):
    server = pooling_server(model, "--served-model-name", name, *extra)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def embed_server(tiny_llama_path):
    yield from serve(tiny_llama_path, EMBED_MODEL, "--runner", "pooling")


@pytest.fixture(scope="module")
def rerank_server(reranker_path):
    yield from serve(reranker_path, RERANK_MODEL)


@pytest.fixture(scope="module")
def classify_server(classifier_path):
    yield from serve(classifier_path, CLASSIFY_MODEL)


@pytest.fixture(scope="module")
def embed_llm(tiny_llama_path):
    return LLM(tiny_llama_path, runner="pooling", **ENGINE_ARGS)


@pytest.fixture(scope="module")
def rerank_llm(reranker_path):
    return LLM(reranker_path, **ENGINE_ARGS)


@pytest.fixture(scope="module")
def classify_llm(classifier_path):
    return LLM(classifier_path, **ENGINE_ARGS)


@pytest.fixture(scope="module")
def client(embed_server):
    return openai.OpenAI(base_url=f"{embed_server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def post(server: InProcessServer, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, timeout=120)


def ok(server: InProcessServer, path: str, body: dict) -> dict:
    response = post(server, path, body)
    assert response.status_code == 200, response.text
    return response.json()


def assert_refused(response: httpx.Response, message: str, status: int = 400, err_type: str = "BadRequestError"):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] == message and error["type"] == err_type and error["code"] == status


def metric(server, name: str, **labels) -> float:
    labels = {"model_name": server.app.state.openai_serving_models.model_name, "engine": "0", **labels}
    return server.registry.get_sample_value(name, labels) or 0.0


def num_tokens(llm: LLM, text: str) -> int:
    return len(llm.get_tokenizer()(text)["input_ids"])


# ----- /v1/embeddings ------------------------------------------------------------------------


def test_embeddings_equal_offline_embed_in_input_order(client, embed_llm):
    response = client.embeddings.create(model=EMBED_MODEL, input=TEXTS)
    expected = [o.outputs.embedding for o in embed_llm.embed(TEXTS, use_tqdm=False)]
    assert [d.index for d in response.data] == [0, 1, 2, 3]
    for data, reference in zip(response.data, expected):
        np.testing.assert_allclose(data.embedding, reference, atol=1e-6)
    assert response.id.startswith("embd-") and response.object == "list" and response.model == EMBED_MODEL
    prompt_tokens = sum(num_tokens(embed_llm, t) for t in TEXTS)
    assert (response.usage.prompt_tokens, response.usage.total_tokens) == (prompt_tokens, prompt_tokens)


def test_the_clients_base64_embeddings_equal_float_ones(client):
    """The client asks for base64 unless told otherwise, and decodes it (np.frombuffer, float32)."""
    by_default = client.embeddings.create(model=EMBED_MODEL, input=TEXTS[:2])
    floats = client.embeddings.create(model=EMBED_MODEL, input=TEXTS[:2], encoding_format="float")
    encoded = client.embeddings.create(model=EMBED_MODEL, input=TEXTS[:2], encoding_format="base64")
    for a, b, c in zip(by_default.data, floats.data, encoded.data):
        assert a.embedding == b.embedding
        assert np.frombuffer(base64.b64decode(c.embedding), dtype=np.float32).tolist() == b.embedding


def test_base64_embedding_is_little_endian_float32(embed_server):
    body = ok(embed_server, "/v1/embeddings", {"input": "hello", "encoding_format": "base64"})
    floats = ok(embed_server, "/v1/embeddings", {"input": "hello"})
    decoded = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(decoded, np.asarray(floats["data"][0]["embedding"], dtype=np.float32))


def test_embedding_is_hf_last_token_hidden_state_normalized(client, tiny_llama_path, embed_llm):
    """`--runner pooling` turns the causal LM into a last-token embedder (vLLM's convert)."""
    model = LlamaForCausalLM.from_pretrained(tiny_llama_path, torch_dtype=torch.float32).eval()
    ids = embed_llm.get_tokenizer()(TEXTS[0])["input_ids"]
    with torch.no_grad():
        hidden = model.model(torch.tensor([ids])).last_hidden_state[0, -1]
    expected = torch.nn.functional.normalize(hidden, dim=-1).numpy()
    [data] = client.embeddings.create(model=EMBED_MODEL, input=TEXTS[0]).data
    np.testing.assert_allclose(data.embedding, expected, atol=1e-4)


def test_token_id_inputs_embed_as_their_text(client, embed_llm):
    ids = [embed_llm.get_tokenizer()(t)["input_ids"] for t in TEXTS[:2]]
    by_text = client.embeddings.create(model=EMBED_MODEL, input=TEXTS[:2])
    by_ids = client.embeddings.create(model=EMBED_MODEL, input=ids)
    one = client.embeddings.create(model=EMBED_MODEL, input=ids[0])
    for a, b in zip(by_text.data, by_ids.data):
        np.testing.assert_allclose(a.embedding, b.embedding, atol=1e-6)
    np.testing.assert_allclose(one.data[0].embedding, by_text.data[0].embedding, atol=1e-6)
    assert by_ids.usage.prompt_tokens == sum(map(len, ids))


def test_vllm_extras_truncate_and_normalize_match_offline(embed_server, embed_llm):
    text = " ".join(TEXTS)
    body = ok(embed_server, "/v1/embeddings", {"input": text, "truncate_prompt_tokens": 5, "normalize": False})
    [expected] = embed_llm.embed(
        text, truncate_prompt_tokens=5, pooling_params=PoolingParams(normalize=False), use_tqdm=False
    )
    np.testing.assert_allclose(body["data"][0]["embedding"], expected.outputs.embedding, atol=1e-6)
    assert body["usage"]["prompt_tokens"] == 5
    assert np.linalg.norm(body["data"][0]["embedding"]) != pytest.approx(1.0)


def test_chat_style_embedding_embeds_the_rendered_conversation(embed_server, embed_llm):
    messages = [{"role": "user", "content": "Embed this conversation."}]
    body = ok(embed_server, "/v1/embeddings", {"messages": messages})
    tokenizer = embed_llm.get_tokenizer()
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    [expected] = embed_llm.embed({"prompt_token_ids": ids}, use_tqdm=False)
    np.testing.assert_allclose(body["data"][0]["embedding"], expected.outputs.embedding, atol=1e-6)
    assert body["usage"]["prompt_tokens"] == len(ids)


def test_a_list_input_runs_as_one_engine_step(embed_server):
    """The inputs are admitted together, so the engine pools them in the same step."""
    engine = embed_server.engine.engine
    embed_server.wait_idle()
    step, sizes = engine.step, []

    def recording_step():
        outputs = step()
        sizes.append(len(outputs))
        return outputs

    engine.step = recording_step
    try:
        ok(embed_server, "/v1/embeddings", {"input": TEXTS})
    finally:
        del engine.step
    assert sizes == [len(TEXTS)]


def test_pooling_requests_count_as_prompt_tokens_and_successes(embed_server, embed_llm):
    embed_server.wait_idle()
    before = {
        name: metric(embed_server, name)
        for name in (
            "vllm:prompt_tokens_total",
            "vllm:generation_tokens_total",
            "vllm:time_to_first_token_seconds_count",
        )
    }
    successes = metric(embed_server, "vllm:request_success_total", finished_reason="stop")
    ok(embed_server, "/v1/embeddings", {"input": TEXTS[:3]})
    assert metric(embed_server, "vllm:request_success_total", finished_reason="stop") - successes == 3
    prompt_tokens = sum(num_tokens(embed_llm, t) for t in TEXTS[:3])
    assert metric(embed_server, "vllm:prompt_tokens_total") - before["vllm:prompt_tokens_total"] == prompt_tokens
    assert metric(embed_server, "vllm:generation_tokens_total") == before["vllm:generation_tokens_total"]
    ttft = metric(embed_server, "vllm:time_to_first_token_seconds_count")
    assert ttft - before["vllm:time_to_first_token_seconds_count"] == 3


def test_async_engine_encode_yields_the_final_pooling_output(embed_server, embed_llm):
    async def encode():
        return [
            output
            async for output in embed_server.engine.encode(TEXTS[1], PoolingParams(task="embed"), "encode-direct")
        ]

    [output] = asyncio.run(encode())
    [expected] = embed_llm.embed(TEXTS[1], use_tqdm=False)
    assert output.finished and output.request_id == "encode-direct"
    np.testing.assert_allclose(output.outputs.data, expected.outputs.embedding, atol=1e-6)


# ----- /pooling --------------------------------------------------------------------------


def test_pooling_defaults_to_one_vector_per_token(embed_server, embed_llm):
    body = ok(embed_server, "/pooling", {"model": EMBED_MODEL, "input": TEXTS[:2]})
    expected = embed_llm.encode(TEXTS[:2], pooling_task="token_embed", use_tqdm=False)
    assert body["id"].startswith("pool-") and body["object"] == "list"
    for data, reference in zip(body["data"], expected):
        assert data["object"] == "pooling"
        np.testing.assert_allclose(data["data"], reference.outputs.data, atol=1e-6)
    assert body["usage"]["prompt_tokens"] == sum(len(o.prompt_token_ids) for o in expected)


def test_pooling_with_task_embed_equals_the_embedding(embed_server):
    pooled = ok(embed_server, "/pooling", {"input": TEXTS[0], "task": "embed"})
    embedded = ok(embed_server, "/v1/embeddings", {"input": TEXTS[0]})
    np.testing.assert_allclose(pooled["data"][0]["data"], embedded["data"][0]["embedding"], atol=1e-6)


# ----- /score and /rerank --------------------------------------------------------------------


def test_embedding_model_scores_by_cosine_similarity(embed_server, embed_llm):
    body = ok(embed_server, "/score", {"text_1": QUERY, "text_2": DOCUMENTS})
    expected = embed_llm.score(QUERY, DOCUMENTS, use_tqdm=False)
    assert [d["score"] for d in body["data"]] == pytest.approx([o.outputs.score for o in expected], abs=1e-6)


@pytest.mark.parametrize(
    "text_1, text_2",
    [(QUERY, DOCUMENTS[0]), (QUERY, DOCUMENTS), (DOCUMENTS[:2], DOCUMENTS[2:])],
    ids=["1:1", "1:N", "N:N"],
)
def test_cross_encoder_scores_equal_offline_score(rerank_server, rerank_llm, text_1, text_2):
    body = ok(rerank_server, "/score", {"model": RERANK_MODEL, "text_1": text_1, "text_2": text_2})
    expected = rerank_llm.score(text_1, text_2, use_tqdm=False)
    assert body["id"].startswith("score-") and body["object"] == "list" and body["model"] == RERANK_MODEL
    assert [d["index"] for d in body["data"]] == list(range(len(expected)))
    assert all(d["object"] == "score" for d in body["data"])
    assert [d["score"] for d in body["data"]] == [o.outputs.score for o in expected]
    prompt_tokens = sum(len(o.prompt_token_ids) for o in expected)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == prompt_tokens


def test_cross_encoder_score_is_sigmoid_of_hf_logit(rerank_server, reranker_path):
    model = Qwen2ForSequenceClassification.from_pretrained(reranker_path, torch_dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(reranker_path)
    ids = tokenizer(QUERY, text_pair=DOCUMENTS[0])["input_ids"]
    with torch.no_grad():
        expected = torch.sigmoid(model(torch.tensor([ids])).logits[0, 0]).item()
    body = ok(rerank_server, "/score", {"text_1": QUERY, "text_2": DOCUMENTS[0]})
    assert body["data"][0]["score"] == pytest.approx(expected, abs=1e-4)


def test_newer_score_field_names_and_v1_route(rerank_server):
    by_text = ok(rerank_server, "/score", {"text_1": QUERY, "text_2": DOCUMENTS})
    for path, body in [
        ("/score", {"queries": QUERY, "documents": DOCUMENTS}),
        ("/score", {"queries": QUERY, "items": DOCUMENTS}),
        ("/score", {"data_1": QUERY, "data_2": DOCUMENTS}),
        ("/v1/score", {"text_1": QUERY, "text_2": DOCUMENTS}),
    ]:
        assert ok(rerank_server, path, body)["data"] == by_text["data"], (path, body)


def test_rerank_orders_documents_by_score_and_keeps_top_n(rerank_server, rerank_llm):
    scores = [o.outputs.score for o in rerank_llm.score(QUERY, DOCUMENTS, use_tqdm=False)]
    order = sorted(range(len(DOCUMENTS)), key=lambda i: scores[i], reverse=True)
    body = ok(rerank_server, "/rerank", {"model": RERANK_MODEL, "query": QUERY, "documents": DOCUMENTS, "top_n": 2})
    assert body["id"].startswith("rerank-") and body["model"] == RERANK_MODEL
    assert [r["index"] for r in body["results"]] == order[:2]
    for result in body["results"]:
        assert result["document"] == {"text": DOCUMENTS[result["index"]]}
        assert result["relevance_score"] == scores[result["index"]]
    assert body["usage"]["total_tokens"] > 0
    everything = ok(rerank_server, "/rerank", {"query": QUERY, "documents": DOCUMENTS})
    assert [r["index"] for r in everything["results"]] == order
    for path in ("/v1/rerank", "/v2/rerank"):
        assert ok(rerank_server, path, {"query": QUERY, "documents": DOCUMENTS})["results"] == everything["results"]


def test_score_with_mismatched_lengths_is_refused(rerank_server):
    response = post(rerank_server, "/score", {"text_1": DOCUMENTS[:2], "text_2": DOCUMENTS[:3]})
    assert_refused(response, "Input lengths must be either 1:1, 1:N or N:N")


# ----- /classify -----------------------------------------------------------------------------


def test_classify_equals_offline_classify_with_labels(classify_server, classify_llm):
    body = ok(classify_server, "/classify", {"model": CLASSIFY_MODEL, "input": TEXTS})
    expected = classify_llm.classify(TEXTS, use_tqdm=False)
    assert body["id"].startswith("classify-") and body["object"] == "list" and body["model"] == CLASSIFY_MODEL
    for data, reference in zip(body["data"], expected):
        assert data["probs"] == reference.outputs.probs and data["num_classes"] == 3
        assert data["label"] == LABELS[int(np.argmax(reference.outputs.probs))]
    assert [d["index"] for d in body["data"]] == [0, 1, 2, 3]
    assert body["usage"]["prompt_tokens"] == sum(len(o.prompt_token_ids) for o in expected)


def test_classify_probs_are_softmax_of_hf_logits(classify_server, classifier_path):
    model = Qwen2ForSequenceClassification.from_pretrained(classifier_path, torch_dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(classifier_path)(TEXTS[0])["input_ids"]
    with torch.no_grad():
        expected = torch.softmax(model(torch.tensor([ids])).logits[0], dim=-1).numpy()
    body = ok(classify_server, "/classify", {"input": TEXTS[0]})
    np.testing.assert_allclose(body["data"][0]["probs"], expected, atol=1e-4)


# ----- what a model's task cannot serve ------------------------------------------------------


@pytest.mark.parametrize(
    "server_name, path, body, api",
    [
        ("embed_server", "/v1/completions", {"prompt": "hi"}, "Completions API"),
        (
            "embed_server",
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}]},
            "Chat Completions API",
        ),
        ("embed_server", "/classify", {"input": "hi"}, "Classification API"),
        ("classify_server", "/v1/embeddings", {"input": "hi"}, "Embeddings API"),
        ("classify_server", "/score", {"text_1": "a", "text_2": "b"}, "Score API"),
        ("classify_server", "/rerank", {"query": "a", "documents": ["b"]}, "Rerank (Score) API"),
        ("rerank_server", "/v1/embeddings", {"input": "hi"}, "Embeddings API"),
    ],
)
def test_routes_the_task_cannot_serve_are_refused(request, server_name, path, body, api):
    server = request.getfixturevalue(server_name)
    assert_refused(post(server, path, body), f"The model does not support {api}")


def test_pooling_routes_on_a_generative_model_are_refused(tiny_llama_path):
    server = InProcessServer(server_args(tiny_llama_path))
    try:
        for path, body, api in [
            ("/v1/embeddings", {"input": "hi"}, "Embeddings API"),
            ("/pooling", {"input": "hi"}, "Pooling API"),
            ("/classify", {"input": "hi"}, "Classification API"),
            ("/score", {"text_1": "a", "text_2": "b"}, "Score API"),
            ("/rerank", {"query": "a", "documents": ["b"]}, "Rerank (Score) API"),
        ]:
            assert_refused(post(server, path, body), f"The model does not support {api}")
    finally:
        server.stop()


# ----- bad inputs ----------------------------------------------------------------------------


def too_long_text(llm: LLM) -> tuple[str, int]:
    text = " ".join(["word"] * (MAX_MODEL_LEN + 10))
    return text, num_tokens(llm, text)


def test_bad_embedding_requests_get_vllm_errors_and_the_server_goes_on(embed_server, embed_llm):
    text, length = too_long_text(embed_llm)
    cases = [
        ({"input": []}, "please provide at least one prompt"),
        ({"input": [[]]}, "please provide at least one prompt"),
        (
            {"input": ["short", text]},
            f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you requested {length} "
            "tokens in the input for embedding generation. Please reduce the length of the input.",
        ),
        (
            {"input": "hi", "dimensions": 8},
            f'Model "{EMBED_MODEL}" does not support matryoshka representation, changing output dimensions '
            "will lead to poor results.",
        ),
        ({"input": "hi", "priority": 1}, "Got priority 1 but Priority scheduling is not enabled."),
        (
            {"input": "hi", "truncate_prompt_tokens": MAX_MODEL_LEN + 1},
            "truncate_prompt_tokens value is greater than max_model_len. Please, select a smaller truncation size.",
        ),
        (
            {"input": [embed_llm.llm_engine.vocab_size]},
            f"Token id {embed_llm.llm_engine.vocab_size} is out of vocabulary",
        ),
    ]
    for body, message in cases:
        assert_refused(post(embed_server, "/v1/embeddings", body), message)
    response = post(embed_server, "/v1/embeddings", {"input": "hi", "encoding_format": "float16"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "Bad Request"
    assert_refused(
        post(embed_server, "/v1/embeddings", {"input": "hi", "model": "nope"}),
        "The model `nope` does not exist.",
        404,
        "NotFoundError",
    )
    embed_server.wait_idle()
    assert ok(embed_server, "/v1/embeddings", {"input": TEXTS})["data"][3]["index"] == 3


def test_too_long_inputs_name_their_operation(embed_server, classify_server, rerank_server, embed_llm):
    text, length = too_long_text(embed_llm)
    refusal = (
        f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you requested {{}} tokens in the "
        "input for {}. Please reduce the length of the input."
    )
    assert_refused(post(classify_server, "/classify", {"input": text}), refusal.format(length, "classification"))
    response = post(rerank_server, "/score", {"text_1": text, "text_2": "b"})
    assert response.status_code == 400 and response.json()["error"]["message"].endswith(
        "tokens in the input for score. Please reduce the length of the input."
    )
    # truncate_prompt_tokens=-1 cuts to the model's limit instead.
    body = ok(classify_server, "/classify", {"input": text, "truncate_prompt_tokens": -1})
    assert body["usage"]["prompt_tokens"] == MAX_MODEL_LEN
    assert ok(embed_server, "/v1/embeddings", {"input": "still serving"})["data"]


def test_a_client_that_leaves_aborts_its_requests(embed_server):
    """The engine holds the requests (its step is held back) while the client hangs up."""
    engine = embed_server.engine.engine
    embed_server.wait_idle()
    aborts = metric(embed_server, "vllm:request_success_total", finished_reason="abort")
    release = threading.Event()

    def held_step():
        release.wait(60)
        return []

    engine.step = held_step
    try:

        def leave():
            try:
                httpx.post(embed_server.base_url + "/v1/embeddings", json={"input": TEXTS}, timeout=1.0)
            except httpx.ReadTimeout:
                pass

        client = threading.Thread(target=leave)
        client.start()
        deadline = time.monotonic() + 30
        while embed_server.engine.get_num_unfinished_requests() < len(TEXTS):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        client.join(30)
        time.sleep(0.5)  # the server notices the hang-up and aborts
    finally:
        del engine.step
        release.set()
    embed_server.wait_idle()
    assert metric(embed_server, "vllm:request_success_total", finished_reason="abort") - aborts == len(TEXTS)
    assert ok(embed_server, "/v1/embeddings", {"input": TEXTS[0]})["data"]


def test_models_list_shows_what_each_model_serves(embed_server, rerank_server):
    embed_card = httpx.get(f"{embed_server.base_url}/v1/models").json()["data"][0]
    rerank_card = httpx.get(f"{rerank_server.base_url}/v1/models").json()["data"][0]
    assert embed_card["supported_tasks"] == ["embed", "token_embed"]
    assert rerank_card["supported_tasks"] == ["classify", "token_classify"]


# ----- /invocations --------------------------------------------------------------------------


def without_id_and_created(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("id", "created")}


@pytest.mark.parametrize(
    "server_name, path, body",
    [
        ("embed_server", "/v1/embeddings", {"input": TEXTS[:2]}),
        ("embed_server", "/v1/embeddings", {"messages": [{"role": "user", "content": "Embed this conversation."}]}),
        ("embed_server", "/score", {"text_1": QUERY, "text_2": DOCUMENTS}),
        ("rerank_server", "/score", {"queries": QUERY, "documents": DOCUMENTS[:2]}),
        ("rerank_server", "/rerank", {"query": QUERY, "documents": DOCUMENTS, "top_n": 2}),
        ("classify_server", "/classify", {"input": TEXTS[:2]}),
    ],
    ids=["embeddings", "chat-style-embeddings", "cosine-score", "cross-encoder-score", "rerank", "classify"],
)
def test_invocations_answer_as_the_dedicated_route(request, server_name, path, body):
    """vLLM's dispatch: the first request type, among those the model serves, that the body
    validates as (embeddings, classify, rerank, score, pooling after generation's)."""
    server = request.getfixturevalue(server_name)
    direct, invoked = ok(server, path, body), ok(server, "/invocations", body)
    assert invoked["id"].split("-")[0] == direct["id"].split("-")[0]
    assert without_id_and_created(invoked) == without_id_and_created(direct)


def test_invocations_refusal_names_the_types_the_model_serves(embed_server):
    """A completion body on an embedding model: no served type reads it; unions are named
    as str() gives them, as vLLM names them."""
    module = "jllm.entrypoints.openai.protocol_pooling"
    expected = [
        f"{module}.EmbeddingCompletionRequest | {module}.EmbeddingChatRequest",
        "RerankRequest",
        "ScoreRequest",
        f"{module}.PoolingCompletionRequest | {module}.PoolingChatRequest",
    ]
    assert_refused(
        post(embed_server, "/invocations", {"prompt": "hi", "max_tokens": 4}),
        f"Cannot find suitable handler for request. Expected one of: {expected}",
    )


# ----- run-batch lines -----------------------------------------------------------------------

# custom_id -> url and body of each line, for the cross-encoder; run-batch routes /score and
# /rerank by the url's end, as vLLM's does.
RERANK_BATCH = {
    "score": ("/score", {"text_1": QUERY, "text_2": DOCUMENTS}),
    "score-v1": ("/v1/score", {"queries": DOCUMENTS[:2], "documents": DOCUMENTS[2:]}),
    "embeddings": ("/v1/embeddings", {"input": "hi"}),
    "rerank": ("/rerank", {"query": QUERY, "documents": DOCUMENTS, "top_n": 2}),
    "rerank-v1": ("/v1/rerank", {"query": QUERY, "documents": DOCUMENTS}),
    "rerank-v2": ("/v2/rerank", {"query": QUERY, "documents": DOCUMENTS}),
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    "classify": ("/classify", {"input": "hi"}),
}


@pytest.fixture(scope="module")
def rerank_batch_rows(rerank_server, tmp_path_factory) -> dict[str, dict]:
    """RERANK_BATCH through run-batch's parse, run and write, on the server's own handlers."""
    from jllm.entrypoints.openai import run_batch

    lines = [
        json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})
        for custom_id, (url, body) in RERANK_BATCH.items()
    ]
    requests = run_batch.parse_batch("\n".join(lines), "batch.jsonl")
    outputs = asyncio.run(run_batch.run_requests(rerank_server.app.state, requests))
    path = tmp_path_factory.mktemp("batch") / "out.jsonl"
    run_batch.write_file(str(path), outputs, None)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [row["custom_id"] for row in rows] == list(RERANK_BATCH)
    return {row["custom_id"]: row for row in rows}


def batch_body(row: dict) -> dict:
    assert row["error"] is None and row["response"]["status_code"] == 200, row
    return row["response"]["body"]


def test_batch_score_lines_equal_offline_score(rerank_batch_rows, rerank_llm):
    for custom_id in ("score", "score-v1"):
        url, body = RERANK_BATCH[custom_id]
        data_1, data_2 = ScoreRequest.model_validate(body).sides()
        expected = [o.outputs.score for o in rerank_llm.score(data_1, data_2, use_tqdm=False)]
        served = batch_body(rerank_batch_rows[custom_id])
        assert served["object"] == "list" and served["model"] == RERANK_MODEL and served["id"].startswith("score-")
        assert [d["score"] for d in served["data"]] == pytest.approx(expected, abs=1e-6)


def test_batch_rerank_lines_equal_the_rerank_route(rerank_batch_rows, rerank_server):
    for custom_id in ("rerank", "rerank-v1", "rerank-v2"):
        direct = ok(rerank_server, "/rerank", RERANK_BATCH[custom_id][1])
        assert without_id_and_created(batch_body(rerank_batch_rows[custom_id])) == without_id_and_created(direct)


def test_batch_lines_the_model_cannot_serve_get_vllms_errors(rerank_batch_rows):
    refusals = {
        "embeddings": "The model does not support Embeddings API",
        "chat": "The model does not support Chat Completions API",
        "classify": "URL /classify was used. Supported endpoints: /v1/chat/completions, /v1/completions, "
        "/v1/embeddings, /score, /rerank.",
    }
    for custom_id, message in refusals.items():
        row = rerank_batch_rows[custom_id]
        assert row["error"] == message
        assert row["response"]["status_code"] == 400 and row["response"]["body"] is None
