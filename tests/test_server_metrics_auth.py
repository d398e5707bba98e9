"""`jllm serve` as a user starts it (a subprocess): --api-key on /v1 routes, /metrics in
Prometheus text whose counters move by exactly what was served, request logs cut to
--max-log-len, and scripts/benchmark_serving.py against the running server."""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from openai_server import RemoteServer
from tiny_model import VOCAB_SIZE

KEYS = ("sk-first", "sk-second")
MODEL_NAME = "tiny"
MAX_LOG_LEN = 12
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def server(tiny_llama_path, tmp_path_factory):
    log_path = str(tmp_path_factory.mktemp("jllm_serve") / "server.log")
    server = RemoteServer(tiny_llama_path, ["--api-key", *KEYS, "--served-model-name", MODEL_NAME,
                                           "--enable-log-requests", "--max-log-len", str(MAX_LOG_LEN)], log_path)
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
                samples[sample.name + (f"[{reason}]" if reason else "")
                        + (f"[le={sample.labels['le']}]" if "le" in sample.labels else "")] = sample.value
    return samples


@pytest.mark.parametrize("headers", [{}, auth("sk-wrong"), {"Authorization": "sk-first"},
                                     {"Authorization": "Basic sk-first"}], ids=["none", "wrong", "no_scheme", "basic"])
def test_v1_routes_refuse_a_missing_or_wrong_key(server, headers):
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")):
        response = httpx.request(method, f"{server.base_url}{path}", headers=headers,
                                 json={"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]})
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
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:num_preemptions_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                 "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_count", "vllm:request_success_total[length]"):
        assert name in before, name
    response = httpx.post(f"{server.base_url}/v1/completions", headers=auth(KEYS[0]), timeout=120,
                          json={"prompt": prompt_ids, "max_tokens": 5, "ignore_eos": True, "temperature": 0})
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
    response = httpx.post(f"{server.base_url}/v1/completions", headers=auth(KEYS[0]),
                          json={"prompt": prompt, "max_tokens": 2}, timeout=120)
    assert response.status_code == 200
    request_id = response.json()["id"]
    [line] = [line for line in server.log().splitlines() if f"Received request {request_id}:" in line]
    assert f"prompt: {prompt[:MAX_LOG_LEN]!r}," in line and prompt[:MAX_LOG_LEN + 1] not in line


def test_benchmark_script_against_the_running_server(server, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "benchmark_serving.py"), "--base-url", server.base_url,
           "--api-key", KEYS[0], "--model", MODEL_NAME, "--vocab-size", str(VOCAB_SIZE), "--num-prompts", "8",
           "--random-input-len", "16", "--random-output-len", "4", "--max-concurrency", "4",
           "--request-rate", "100", "--result-dir", str(tmp_path), "--label", "smoke"]
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
    done = subprocess.run([sys.executable, "-m", "jllm.entrypoints.cli", "serve", "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "No model given" in done.stderr
