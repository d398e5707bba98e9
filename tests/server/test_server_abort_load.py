"""Clients that leave abort their requests and give every KV page back; 200 concurrent
streams all finish with exactly their token counts and the offline greedy texts."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from jllm import LLM, SamplingParams
from openai_server import InProcessServer, server_args
from tiny_model import ENGINE_ARGS, MAX_MODEL_LEN

NUM_LOAD_REQUESTS = 200


@pytest.fixture(scope="module")
def server(tiny_llama_path):
    server = InProcessServer(server_args(tiny_llama_path))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def llm(tiny_llama_path):
    return LLM(model=tiny_llama_path, **ENGINE_ARGS)


def metric(server, name: str, **labels) -> float:
    labels = {"model_name": server.app.state.openai_serving_models.model_name, "engine": "0", **labels}
    return server.registry.get_sample_value(name, labels) or 0.0


def long_request(**fields) -> dict:
    # Long enough that no request could finish during the test: only an abort ends it.
    return {
        "prompt": "Tell me a long story about the sea.",
        "max_tokens": MAX_MODEL_LEN - 20,
        "ignore_eos": True,
        "temperature": 0,
        **fields,
    }


async def leave_mid_stream(client: httpx.AsyncClient, chunks_to_read: int) -> int:
    """Opens a stream, reads `chunks_to_read` events and hangs up; returns the events read."""
    read = 0
    async with client.stream("POST", "/v1/completions", json=long_request(stream=True)) as response:
        assert response.status_code == 200
        if chunks_to_read:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    read += 1
                    if read == chunks_to_read:
                        break
    return read


def test_clients_leaving_mid_stream_leave_the_pool_as_before(server):
    server.wait_idle()
    block_manager = server.block_manager
    block_manager.check_no_leaks()
    free_before = block_manager.num_free_blocks
    aborts_before = metric(server, "vllm:request_success_total", finished_reason="abort")
    tokens_before = metric(server, "vllm:generation_tokens_total")
    # More clients than max_num_seqs (16): some leave while running, some while waiting.
    num_clients = 24

    async def main():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            return await asyncio.gather(*(leave_mid_stream(client, 3 if i % 2 else 0) for i in range(num_clients)))

    read = asyncio.run(main())
    assert read == [3 if i % 2 else 0 for i in range(num_clients)]
    server.wait_idle(timeout=60)
    assert metric(server, "vllm:request_success_total", finished_reason="abort") - aborts_before == num_clients
    generated = metric(server, "vllm:generation_tokens_total") - tokens_before
    assert generated < num_clients * long_request()["max_tokens"] / 4
    block_manager.check_no_leaks()
    assert block_manager.num_free_blocks == free_before


def test_non_streaming_client_that_times_out_is_aborted(server):
    server.wait_idle()
    aborts_before = metric(server, "vllm:request_success_total", finished_reason="abort")
    with pytest.raises(httpx.ReadTimeout):
        # n=8 long samples: seconds of work on the CPU, and the client waits half a second.
        httpx.post(f"{server.base_url}/v1/completions", json=long_request(n=8, temperature=1.0), timeout=0.5)
    server.wait_idle(timeout=60)
    assert metric(server, "vllm:request_success_total", finished_reason="abort") - aborts_before == 1
    server.block_manager.check_no_leaks()


async def stream_completion(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> dict:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    result = {"text": "", "token_ids": [], "usage": None, "done": False, "finish_reason": None}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line:
                continue
            payload = line.removeprefix("data: ")
            if payload == "[DONE]":
                result["done"] = True
                continue
            chunk = json.loads(payload)
            if chunk["choices"]:
                choice = chunk["choices"][0]
                result["text"] += choice["text"]
                result["token_ids"] += choice["token_ids"]
                result["finish_reason"] = choice["finish_reason"] or result["finish_reason"]
            else:
                result["usage"] = chunk["usage"]
    return result


def test_200_concurrent_streams_finish_exactly_and_match_offline_greedy(server, llm):
    prompts = [f"Request {i}: " + "the sea " * (i % 13) for i in range(NUM_LOAD_REQUESTS)]
    max_tokens = [4 + i % 9 for i in range(NUM_LOAD_REQUESTS)]

    async def main():
        limits = httpx.Limits(max_connections=NUM_LOAD_REQUESTS, max_keepalive_connections=NUM_LOAD_REQUESTS)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300, limits=limits) as client:
            return await asyncio.wait_for(
                asyncio.gather(*(stream_completion(client, p, m) for p, m in zip(prompts, max_tokens))), 600
            )

    results = asyncio.run(main())
    expected = llm.generate(
        prompts, [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens], use_tqdm=False
    )
    for result, m, want in zip(results, max_tokens, expected):
        assert result["done"] and result["finish_reason"] == "length"
        assert len(result["token_ids"]) == m and result["usage"]["completion_tokens"] == m
        assert result["token_ids"] == list(want.outputs[0].token_ids)
        assert result["text"] == want.outputs[0].text
    server.wait_idle()
    server.block_manager.check_no_leaks()
