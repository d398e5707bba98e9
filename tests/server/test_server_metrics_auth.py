"""`jllm serve` as a user starts it (a subprocess): --api-key on /v1 routes, /metrics in
Prometheus text whose counters move by exactly what was served, request logs cut to
--max-log-len, and scripts/benchmark_serving.py against the running server."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import jllm
from openai_server import RemoteServer
from tiny_model import VOCAB_SIZE

# Slow tier: starts several servers (keys, root paths, a unix socket).
pytestmark = pytest.mark.slow

KEYS = ("sk-first", "sk-second")
MODEL_NAME = "tiny"
MAX_LOG_LEN = 12
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def server(tiny_llama_path, tmp_path_factory):
    log_path = str(tmp_path_factory.mktemp("jllm_serve") / "server.log")
    server = RemoteServer(
        tiny_llama_path,
        [
            "--api-key",
            *KEYS,
            "--served-model-name",
            MODEL_NAME,
            "--enable-log-requests",
            "--max-log-len",
            str(MAX_LOG_LEN),
        ],
        log_path,
    )
    yield server
    server.stop()


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def scrape(server) -> dict[str, float]:
    """Every sample of /metrics by name and labels (finished_reason only, the rest are fixed)."""
    response = httpx.get(f"{server.base_url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "vllm:cache_config_info":  # vLLM's: no model_name label
                assert sample.value == 1 and sample.labels["engine"] == "0"
            elif sample.name.startswith("vllm:"):
                assert sample.labels["model_name"] == MODEL_NAME and sample.labels["engine"] == "0"
                reason = sample.labels.get("finished_reason")
                samples[
                    sample.name
                    + (f"[{reason}]" if reason else "")
                    + (f"[le={sample.labels['le']}]" if "le" in sample.labels else "")
                ] = sample.value
    return samples


@pytest.mark.parametrize(
    "headers",
    [{}, auth("sk-wrong"), {"Authorization": "sk-first"}, {"Authorization": "Basic sk-first"}],
    ids=["none", "wrong", "no_scheme", "basic"],
)
def test_v1_routes_refuse_a_missing_or_wrong_key(server, headers):
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")):
        response = httpx.request(
            method,
            f"{server.base_url}{path}",
            headers=headers,
            json={"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert response.status_code == 401 and response.json() == {"error": "Unauthorized"}


def test_every_configured_key_is_accepted(server):
    for key in KEYS:
        response = httpx.get(f"{server.base_url}/v1/models", headers=auth(key))
        assert response.status_code == 200 and response.json()["data"][0]["id"] == MODEL_NAME


def test_openai_client_with_a_wrong_key_gets_authentication_error(server):
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2)
    good = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEYS[1], max_retries=0)
    assert good.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2).usage.completion_tokens >= 1


def test_routes_outside_v1_need_no_key(server):
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert httpx.get(f"{server.base_url}/version").status_code == 200
    assert httpx.get(f"{server.base_url}/metrics").status_code == 200
    assert httpx.post(f"{server.base_url}/tokenize", json={"prompt": "hi"}).status_code == 200


def test_metrics_parse_and_move_by_what_was_served(server):
    prompt_ids = [1000 + i for i in range(7)]
    before = scrape(server)
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:num_preemptions_total",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_count",
        "vllm:inter_token_latency_seconds_count",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:request_success_total[length]",
    ):
        assert name in before, name
    response = httpx.post(
        f"{server.base_url}/v1/completions",
        headers=auth(KEYS[0]),
        timeout=120,
        json={"prompt": prompt_ids, "max_tokens": 5, "ignore_eos": True, "temperature": 0},
    )
    assert response.status_code == 200
    after = scrape(server)
    moved = {name: after[name] - before.get(name, 0.0) for name in after}
    assert moved["vllm:prompt_tokens_total"] == 7 and moved["vllm:generation_tokens_total"] == 5
    assert moved["vllm:request_success_total[length]"] == 1 and moved["vllm:request_success_total[stop]"] == 0
    assert moved["vllm:time_to_first_token_seconds_count"] == 1
    assert moved["vllm:inter_token_latency_seconds_count"] == 4
    assert moved["vllm:e2e_request_latency_seconds_count"] == 1
    assert moved["vllm:request_prompt_tokens_sum"] == 7 and moved["vllm:request_generation_tokens_sum"] == 5
    assert moved["vllm:prefix_cache_queries_total"] == 7
    assert after["vllm:num_requests_running"] == 0 and after["vllm:num_requests_waiting"] == 0
    assert after["vllm:kv_cache_usage_perc"] == 0.0
    assert after["vllm:num_preemptions_total"] == 0.0
    # Histogram buckets are cumulative and end at +Inf with the count.
    assert after["vllm:time_to_first_token_seconds_bucket[le=+Inf]"] == after["vllm:time_to_first_token_seconds_count"]


def test_request_log_lines_cut_the_prompt_to_max_log_len(server):
    prompt = "abcdefghijklmnopqrstuvwxyz"
    response = httpx.post(
        f"{server.base_url}/v1/completions",
        headers=auth(KEYS[0]),
        json={"prompt": prompt, "max_tokens": 2},
        timeout=120,
    )
    assert response.status_code == 200
    request_id = response.json()["id"]
    [line] = [line for line in server.log().splitlines() if f"Received request {request_id}:" in line]
    assert f"prompt: {prompt[:MAX_LOG_LEN]!r}," in line and prompt[: MAX_LOG_LEN + 1] not in line


def test_benchmark_script_against_the_running_server(server, tmp_path):
    cmd = [
        sys.executable,
        os.path.join(ROOT, "scripts", "benchmark_serving.py"),
        "--base-url",
        server.base_url,
        "--api-key",
        KEYS[0],
        "--model",
        MODEL_NAME,
        "--vocab-size",
        str(VOCAB_SIZE),
        "--num-prompts",
        "8",
        "--random-input-len",
        "16",
        "--random-output-len",
        "4",
        "--max-concurrency",
        "4",
        "--request-rate",
        "100",
        "--result-dir",
        str(tmp_path),
        "--label",
        "smoke",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    [result_file] = list(tmp_path.glob("serving_smoke_*.json"))
    record = json.loads(result_file.read_text())
    assert record["completed"] == 8 and record["failed"] == 0
    assert record["total_input_tokens"] == 8 * 16 and record["total_output_tokens"] == 8 * 4
    assert record["server_generation_tokens_total"] == 8 * 4
    for metric in ("ttft", "tpot", "itl", "e2el"):
        assert 0 < record[f"median_{metric}_ms"] <= record[f"p99_{metric}_ms"]
    assert record["request_throughput"] > 0 and record["output_throughput"] > 0


def test_jllm_console_script_runs_the_cli():
    [entry] = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "jllm"]
    assert entry.value == "jllm.entrypoints.cli:main"


def test_serve_without_a_model_is_a_usage_error():
    done = subprocess.run(
        [sys.executable, "-m", "jllm.entrypoints.cli", "serve", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "No model given" in done.stderr


# ----- the API key from the environment, under --root-path, and on a unix socket --------------


@pytest.fixture(scope="module")
def env_key_server(tiny_llama_path, tmp_path_factory):
    """VLLM_API_KEY set as vLLM's users set it, behind a path-based proxy's root path."""
    log_path = str(tmp_path_factory.mktemp("jllm_serve_env") / "server.log")
    server = RemoteServer(
        tiny_llama_path,
        ["--root-path", "/llm", "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning"],
        log_path,
        env={"VLLM_API_KEY": "sk-env"},
    )
    yield server
    server.stop()


def protected_routes(server) -> list[tuple[str, str]]:
    """Every (method, path) of the app under an authenticated prefix, from its OpenAPI document."""
    from jllm.entrypoints.openai.middleware import AUTHENTICATED_PREFIXES

    paths = httpx.get(f"{server.base_url}/openapi.json").json()["paths"]
    routes = [
        (method.upper(), path)
        for path, ops in paths.items()
        for method in ops
        if path.startswith(AUTHENTICATED_PREFIXES)
    ]
    assert {("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")} <= set(routes)
    return routes


@pytest.mark.parametrize("prefix", ["/llm", ""], ids=["with_root_path", "stripped_by_proxy"])
def test_env_api_key_guards_every_protected_route(env_key_server, prefix):
    body = {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for method, path in protected_routes(env_key_server):
        url = f"{env_key_server.base_url}{prefix}{path}"
        for headers in ({}, auth("sk-wrong"), auth(KEYS[0])):
            response = httpx.request(method, url, headers=headers, json=body)
            assert response.status_code == 401 and response.json() == {"error": "Unauthorized"}, (method, path)
        response = httpx.request(method, url, headers=auth("sk-env"), json=body, timeout=120)
        # Past authentication: served, or, for a pooling route on this generative model (whose
        # body is not a pooling body), answered by the route itself with a 400 body.
        pooling_route = any(name in path for name in ("embeddings", "score", "rerank", "classify", "pooling"))
        expected = 400 if pooling_route else 200
        assert response.status_code == expected and response.json() != {"error": "Unauthorized"}, (method, path)
    assert httpx.get(f"{env_key_server.base_url}{prefix}/health").status_code == 200


def test_start_up_log_says_authentication_is_on(env_key_server):
    assert "API key authentication is on" in env_key_server.log()


def test_uvicorn_log_flags(server, env_key_server):
    httpx.get(f"{server.base_url}/version")
    httpx.get(f"{env_key_server.base_url}/version")
    access_line = '"GET /version HTTP/1.1" 200'
    assert access_line in server.log() and "Application startup complete." in server.log()
    # --disable-uvicorn-access-log and --uvicorn-log-level warning
    assert access_line not in env_key_server.log() and "Application startup complete." not in env_key_server.log()


def test_flag_key_wins_over_the_environment_on_a_unix_socket(tiny_llama_path, tmp_path):
    uds = str(tmp_path / "jllm.sock")
    server = RemoteServer(
        tiny_llama_path,
        ["--api-key", "sk-flag"],
        str(tmp_path / "server.log"),
        uds=uds,
        env={"JLLM_API_KEY": "sk-jllm", "VLLM_API_KEY": "sk-vllm"},
    )
    try:
        with server.client(timeout=120) as client:
            assert client.get("/version").json() == {"version": jllm.__version__}
            for key, status in (("sk-flag", 200), ("sk-jllm", 401), ("sk-vllm", 401)):
                assert client.get("/v1/models", headers=auth(key)).status_code == status
        assert f"Serving {tiny_llama_path} on unix:{uds}" in server.log()
    finally:
        server.stop()


def test_api_key_sources_in_order():
    from jllm.entrypoints.openai.cli_args import resolve_api_keys

    both = {"JLLM_API_KEY": "sk-jllm", "VLLM_API_KEY": "sk-vllm"}
    assert resolve_api_keys(["sk-flag"], both) == ["sk-flag"]
    assert resolve_api_keys(None, both) == ["sk-jllm"]
    assert resolve_api_keys(None, {"VLLM_API_KEY": "sk-vllm"}) == ["sk-vllm"]
    assert resolve_api_keys(None, {"JLLM_API_KEY": "", "VLLM_API_KEY": ""}) is None


# ----- the metric series of vLLM's own metrics test ----------------------------------------


def families(server) -> dict:
    response = httpx.get(f"{server.base_url}/metrics")
    return {family.name: family for family in text_string_to_metric_families(response.text)}


def test_metrics_counts_as_vllms_test_expects(server):
    """vLLM's test_metrics_counts: N sequential requests of max_tokens tokens each."""
    num_requests, max_tokens, prompt_ids = 3, 5, [2000 + i for i in range(9)]
    before = scrape(server)
    for _ in range(num_requests):
        response = httpx.post(
            f"{server.base_url}/v1/completions",
            headers=auth(KEYS[0]),
            timeout=120,
            json={"prompt": prompt_ids, "max_tokens": max_tokens, "ignore_eos": True},
        )
        assert response.status_code == 200
    after = scrape(server)
    moved = {name: after[name] - before.get(name, 0.0) for name in after}
    n, p, m = num_requests, len(prompt_ids), max_tokens
    assert moved["vllm:iteration_tokens_total_count"] == n * m
    assert moved["vllm:iteration_tokens_total_sum"] == n * (p + m)
    for name in (
        "request_prefill_time_seconds",
        "request_decode_time_seconds",
        "request_queue_time_seconds",
        "request_inference_time_seconds",
        "request_time_per_output_token_seconds",
        "request_params_n",
        "request_max_num_generation_tokens",
    ):
        assert moved[f"vllm:{name}_count"] == n, name
    assert moved["vllm:request_params_n_sum"] == n
    assert moved["vllm:request_params_max_tokens_count"] == n and moved["vllm:request_params_max_tokens_sum"] == n * m
    assert moved["vllm:request_max_num_generation_tokens_sum"] == n * m
    assert moved["vllm:time_per_output_token_seconds_count"] == n * (m - 1)
    assert moved["vllm:inter_token_latency_seconds_count"] == n * (m - 1)


def test_metrics_have_vllms_names_and_no_created_series(server):
    text = httpx.get(f"{server.base_url}/metrics").text
    for name in (
        "vllm:iteration_tokens_total",
        "vllm:cache_config_info",
        "vllm:request_params_n",
        "vllm:request_params_max_tokens",
        "vllm:time_per_output_token_seconds",
        "vllm:request_prefill_time_seconds",
        "vllm:request_decode_time_seconds",
    ):
        assert name in text, name
    assert "_created" not in text
    [info] = families(server)["vllm:cache_config_info"].samples
    assert info.value == 1 and info.labels["block_size"] == "16" and info.labels["enable_prefix_caching"] == "True"
    assert int(info.labels["num_gpu_blocks"]) > 0
    reasons = {s.labels["finished_reason"] for s in families(server)["vllm:request_success"].samples}
    assert reasons == {"stop", "length", "abort", "error", "repetition"}


def test_running_gauge_returns_to_zero_after_an_abort(server):
    """vLLM's test_abort_metrics_reset: streams left mid-way leave no running request,
    waiting request or KV page behind in the gauges."""

    def gauges() -> tuple[float, float, float]:
        samples = scrape(server)
        return (
            samples["vllm:num_requests_running"],
            samples["vllm:num_requests_waiting"],
            samples["vllm:kv_cache_usage_perc"],
        )

    # Long enough that the streams are still running when their clients leave (the abort
    # counter below shows they were), and 12 sequences, so all three run at once.
    body = {"prompt": "Count to a thousand:", "max_tokens": 300, "n": 4, "ignore_eos": True, "stream": True}
    aborted_before = scrape(server)["vllm:request_success_total[abort]"]
    streams = []
    with httpx.Client(headers=auth(KEYS[0]), timeout=120) as client:
        for _ in range(3):
            response = client.send(
                client.build_request("POST", f"{server.base_url}/v1/completions", json=body), stream=True
            )
            # The line iterator is kept: closing it (when collected) would close the stream.
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            streams.append((response, lines))
        running, _, usage = gauges()
        assert running > 0 and usage > 0
        for response, _ in streams:
            response.close()
    deadline = time.monotonic() + 20
    while gauges() != (0, 0, 0):
        assert time.monotonic() < deadline, gauges()
        time.sleep(0.1)
    assert scrape(server)["vllm:request_success_total[abort]"] - aborted_before == 3
