"""`jllm run-batch` as a user runs it (a subprocess): OpenAI batch lines in, one vLLM
BatchRequestOutput line per request out, in input order; per-request errors as vLLM writes
them; a bad line fails the whole run; input and output over HTTP; /metrics on its own port.
The greedy completion is checked against HF transformers on the same weights, and a pooling
model's embeddings and scores against the offline LLM's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from hf_models import hf_greedy, load_hf_model
from openai_server import engine_flags, free_port
from prometheus_client.parser import text_string_to_metric_families
from tiny_model import ENGINE_ARGS

# Slow tier: each case runs jllm run-batch in a fresh process.
pytestmark = pytest.mark.slow

PROMPT_IDS = [1000 + i for i in range(7)]
MAX_TOKENS = 8
GOOD_COMPLETION = {"prompt": PROMPT_IDS, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True}
CHAT_MESSAGES = [{"role": "user", "content": "Hello!"}]

# custom_id -> the line's url and body; the file holds them in this order, with blank lines between some.
BATCH = {
    "greedy-ids": ("/v1/completions", GOOD_COMPLETION),
    "text": ("/v1/completions", {"prompt": "Hello, my name is", "max_tokens": 4, "n": 2, "ignore_eos": True}),
    "chat": ("/v1/chat/completions", {"messages": CHAT_MESSAGES, "max_tokens": MAX_TOKENS}),
    "wrong-model": ("/v1/chat/completions", {"model": "NonExistModel", "messages": CHAT_MESSAGES}),
    "bad-url": ("/bad_url", {"messages": CHAT_MESSAGES}),
    "stream": ("/v1/completions", {"prompt": "Hi", "stream": True}),
    "bad-temperature": ("/v1/completions", {"prompt": "Hi", "temperature": 3}),
    "embeddings": ("/v1/embeddings", {"input": "Hi"}),
    "score": ("/v1/score", {"text_1": "Hi", "text_2": "Hello"}),
}


def batch_line(custom_id: str, url: str, body: dict) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def run_batch(
    input_file: str,
    output_file: str,
    model: str,
    *extra: str,
    module: str = "jllm.entrypoints.cli run-batch",
    engine_args: dict = ENGINE_ARGS,
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", *module.split(), "-i", input_file, "-o", output_file, "--model", model]
    cmd += [*extra, *engine_flags(engine_args)]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)


class FileServer:
    """Serves `files` on GET and keeps PUT bodies in `uploads`, on 127.0.0.1; `on_put` runs
    before a PUT is answered, and the first `fail_puts` PUTs are answered 500."""

    def __init__(self, files: dict[str, bytes], on_put=None, fail_puts: int = 0) -> None:
        self.files, self.uploads, self.on_put, self.fail_puts = files, {}, on_put, fail_puts
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = owner.files[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if owner.fail_puts:
                    owner.fail_puts -= 1
                    self.send_response(500)
                else:
                    owner.uploads[self.path] = body
                    if owner.on_put is not None:
                        owner.on_put()
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def batch_run(tiny_llama_path):
    """The batch in BATCH, read over GET and written over PUT, with --enable-metrics; /metrics
    is scraped when the output arrives (the run is over, the metrics server still up)."""
    lines = [batch_line(custom_id, url, body) for custom_id, (url, body) in BATCH.items()]
    text = "\n".join(lines[:2]) + "\n\n   \n" + "\n".join(lines[2:]) + "\n"
    metrics_port = free_port()
    scraped = []

    def scrape_metrics() -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as response:
            scraped.append(response.read().decode())

    server = FileServer({"/in.jsonl": text.encode()}, on_put=scrape_metrics)
    try:
        metrics_flags = ["--enable-metrics", "--host", "127.0.0.1", "--port", str(metrics_port)]
        done = run_batch(server.url("/in.jsonl"), server.url("/out.jsonl"), tiny_llama_path, *metrics_flags)
    finally:
        server.close()
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in server.uploads["/out.jsonl"].decode().split("\n")]
    return rows, scraped


def rows_by_id(rows: list[dict]) -> dict[str, dict]:
    return {row["custom_id"]: row for row in rows}


def test_one_row_per_request_in_input_order_with_vllm_ids(batch_run):
    rows, _ = batch_run
    assert [row["custom_id"] for row in rows] == list(BATCH)
    for row in rows:
        assert list(row) == ["id", "custom_id", "response", "error"]
        assert list(row["response"]) == ["status_code", "request_id", "body"]
        assert row["id"].startswith("vllm-") and len(row["id"]) == len("vllm-") + 32
        assert row["response"]["request_id"].startswith("vllm-batch-")
    assert len({row["id"] for row in rows}) == len(rows)


def test_greedy_completion_matches_hf_transformers(batch_run, tiny_llama_path):
    from transformers import AutoTokenizer

    row = rows_by_id(batch_run[0])["greedy-ids"]
    assert row["error"] is None and row["response"]["status_code"] == 200
    body = row["response"]["body"]
    assert body["object"] == "text_completion" and body["model"] == tiny_llama_path
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    [expected] = hf_greedy(load_hf_model(tiny_llama_path), tokenizer, [PROMPT_IDS], MAX_TOKENS)
    [choice] = body["choices"]
    assert choice["token_ids"] == expected.token_ids
    assert choice["text"] == expected.text
    assert body["usage"] == {
        "prompt_tokens": len(PROMPT_IDS),
        "completion_tokens": len(expected.token_ids),
        "total_tokens": len(PROMPT_IDS) + len(expected.token_ids),
        "prompt_tokens_details": None,
    }


def test_text_completion_and_chat_succeed(batch_run):
    rows = rows_by_id(batch_run[0])
    text = rows["text"]["response"]["body"]
    assert rows["text"]["error"] is None and rows["text"]["response"]["status_code"] == 200
    assert [choice["index"] for choice in text["choices"]] == [0, 1] and text["usage"]["completion_tokens"] == 2 * 4
    chat = rows["chat"]["response"]["body"]
    assert rows["chat"]["error"] is None and rows["chat"]["response"]["status_code"] == 200
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["role"] == "assistant" and chat["choices"][0]["message"]["content"]


def test_handler_errors_carry_vllms_error_response(batch_run):
    rows = rows_by_id(batch_run[0])
    assert rows["wrong-model"]["response"]["status_code"] == 404 and rows["wrong-model"]["response"]["body"] is None
    assert rows["wrong-model"]["error"] == {
        "error": {
            "message": "The model `NonExistModel` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }
    assert rows["bad-temperature"]["response"]["status_code"] == 400
    assert rows["bad-temperature"]["response"]["body"] is None
    assert rows["bad-temperature"]["error"] == {
        "error": {
            "message": "temperature must be in [0, 2], got 3.0.",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        }
    }


def test_runner_errors_are_plain_strings(batch_run):
    rows = rows_by_id(batch_run[0])
    assert rows["bad-url"]["error"] == (
        "URL /bad_url was used. Supported endpoints: /v1/chat/completions, /v1/completions, /v1/embeddings, "
        "/score, /rerank."
    )
    assert rows["stream"]["error"] == "Request must not be sent in stream mode"
    assert rows["embeddings"]["error"] == "The model does not support Embeddings API"
    assert rows["score"]["error"] == "The model does not support Scores API"
    for custom_id in ("bad-url", "stream", "embeddings", "score"):
        assert rows[custom_id]["response"]["status_code"] == 400 and rows[custom_id]["response"]["body"] is None


def test_metrics_count_what_the_batch_served(batch_run):
    rows, scraped = batch_run
    [text] = scraped
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    served = [row["response"]["body"] for row in rows if row["error"] is None]
    assert totals["vllm:request_success_total"] == len(served) == 3
    assert totals["vllm:generation_tokens_total"] == sum(body["usage"]["completion_tokens"] for body in served)


def test_an_invalid_line_fails_the_run_before_anything_is_written(tmp_path, tiny_llama_path):
    good = batch_line("ok", *BATCH["greedy-ids"])
    bad = batch_line("no-messages", "/v1/chat/completions", {"max_tokens": 4})
    (tmp_path / "in.jsonl").write_text(f"{good}\n{bad}\n")
    done = run_batch(str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), tiny_llama_path)
    assert done.returncode == 1
    assert "Line 2 of" in done.stderr and "messages" in done.stderr and "Field required" in done.stderr
    assert "Loaded" not in done.stderr  # refused before the model was loaded
    assert not (tmp_path / "out.jsonl").exists()


def test_an_empty_input_gives_an_empty_output_file(tmp_path, tiny_llama_path):
    (tmp_path / "in.jsonl").write_text("")
    done = run_batch(
        str(tmp_path / "in.jsonl"),
        str(tmp_path / "out.jsonl"),
        tiny_llama_path,
        module="jllm.entrypoints.openai.run_batch",
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.jsonl").read_text() == ""


def test_run_batch_without_a_model_is_a_usage_error():
    done = subprocess.run(
        [sys.executable, "-m", "jllm.entrypoints.cli", "run-batch", "-i", "in", "-o", "out"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "No model given" in done.stderr and "usage: jllm run-batch" in done.stderr


def test_output_tmp_dir_stages_the_file_and_a_failed_put_is_retried(tmp_path, monkeypatch):
    from jllm.entrypoints.openai import run_batch as run_batch_module

    monkeypatch.setattr(run_batch_module, "UPLOAD_RETRY_DELAY_S", 0)
    output = run_batch_module.make_error_request_output(
        run_batch_module.BatchRequestInput(custom_id="x", method="POST", url="/bad", body={}), "refused", 400
    )
    server = FileServer({}, fail_puts=2)
    try:
        run_batch_module.write_file(server.url("/out.jsonl"), [output, output], str(tmp_path))
    finally:
        server.close()
    assert server.uploads["/out.jsonl"].decode() == (output.model_dump_json() + "\n") * 2
    assert os.listdir(tmp_path) == []  # the staged file is gone


# ----- a pooling model ----------------------------------------------------------------------

# Pooling requests run whole in one step, so a step holds max_model_len tokens at least.
POOLING_ENGINE_ARGS = dict(
    max_model_len=128,
    max_num_batched_tokens=256,
    max_num_seqs=16,
    compilation_config={"token_buckets": [32, 128]},
    seed=0,
)
TEXTS = ["The capital of France is", "Once upon a time", "JAX compiles numpy programs"]
QUERY = "What is the capital of France?"
DOCUMENTS = ["Paris is the capital of France.", "The sea is deep.", "France is in Europe."]
POOLING_BATCH = {
    "embed-texts": ("/v1/embeddings", {"input": TEXTS}),
    "score": ("/score", {"text_1": QUERY, "text_2": DOCUMENTS}),
    "chat": ("/v1/chat/completions", {"messages": CHAT_MESSAGES}),
    "embed-one": ("/v1/embeddings", {"input": TEXTS[0], "encoding_format": "float"}),
    "score-v1": ("/v1/score", {"queries": DOCUMENTS[:2], "documents": DOCUMENTS[1:]}),
    "completion": ("/v1/completions", {"prompt": "Hi"}),
}


@pytest.fixture(scope="module")
def pooling_rows(tmp_path_factory, tiny_llama_path) -> dict[str, dict]:
    """POOLING_BATCH through `jllm run-batch --runner pooling` (the tiny Llama as a
    last-token embedder) from and to local files."""
    folder = tmp_path_factory.mktemp("pooling_batch")
    lines = [batch_line(custom_id, url, body) for custom_id, (url, body) in POOLING_BATCH.items()]
    (folder / "in.jsonl").write_text("\n".join(lines) + "\n")
    done = run_batch(
        str(folder / "in.jsonl"),
        str(folder / "out.jsonl"),
        tiny_llama_path,
        "--runner",
        "pooling",
        engine_args=POOLING_ENGINE_ARGS,
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (folder / "out.jsonl").read_text().splitlines()]
    assert [row["custom_id"] for row in rows] == list(POOLING_BATCH)
    return rows_by_id(rows)


@pytest.fixture(scope="module")
def pooling_llm(tiny_llama_path):
    from jllm import LLM

    return LLM(tiny_llama_path, runner="pooling", **POOLING_ENGINE_ARGS)


def served_body(row: dict) -> dict:
    assert row["error"] is None and row["response"]["status_code"] == 200, row
    return row["response"]["body"]


def test_batch_embeddings_and_scores_equal_offline_embed_and_score(pooling_rows, pooling_llm, tiny_llama_path):
    for custom_id, texts in (("embed-texts", TEXTS), ("embed-one", TEXTS[:1])):
        body = served_body(pooling_rows[custom_id])
        assert body["object"] == "list" and body["model"] == tiny_llama_path and body["id"].startswith("embd-")
        expected = [o.outputs.embedding for o in pooling_llm.embed(texts, use_tqdm=False)]
        assert [d["index"] for d in body["data"]] == list(range(len(texts)))
        for data, reference in zip(body["data"], expected):
            assert data["object"] == "embedding"
            np.testing.assert_allclose(data["embedding"], reference, rtol=0, atol=1e-6)
    for custom_id, (data_1, data_2) in (("score", (QUERY, DOCUMENTS)), ("score-v1", (DOCUMENTS[:2], DOCUMENTS[1:]))):
        body = served_body(pooling_rows[custom_id])
        assert body["object"] == "list" and body["id"].startswith("score-")
        expected = [o.outputs.score for o in pooling_llm.score(data_1, data_2, use_tqdm=False)]
        assert [d["score"] for d in body["data"]] == pytest.approx(expected, abs=1e-6)


def test_batch_generation_lines_on_a_pooling_model_get_vllms_errors(pooling_rows):
    for custom_id, api in (("chat", "Chat Completions API"), ("completion", "Completions API")):
        row = pooling_rows[custom_id]
        assert row["error"] == f"The model does not support {api}"
        assert row["response"]["status_code"] == 400 and row["response"]["body"] is None
