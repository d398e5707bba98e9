"""One request's failure reaches its own client only: a request whose processing raises
in the engine gets a 500 (or an error event in its stream) while requests beside it are
served in full; a dead engine makes /health answer 503 and the server exit instead of
answering 500 for ever."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from jllm.engine.async_llm_engine import EngineDeadError
from jllm.engine.output_processor import RequestState
from openai_server import InProcessServer, server_args

GOOD = [{"prompt": f"Request number {i} says", "max_tokens": 8, "temperature": 0} for i in range(4)]
# The marker the injected fault looks for.
FAULTY_LOGPROBS = 4


class Boom(RuntimeError):
    pass


@pytest.fixture(scope="module")
def server(tiny_llama_path):
    server = InProcessServer(server_args(tiny_llama_path))
    yield server
    server.stop()


def complete(server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=120)


def test_a_request_that_fails_in_the_engine_fails_alone(server, monkeypatch):
    alone = [complete(server, body).json()["choices"][0]["text"] for body in GOOD]
    original = RequestState.add_sampled_logprobs

    def add_sampled_logprobs(self, *args, **kwargs):
        if self.params.logprobs == FAULTY_LOGPROBS and len(args[0].request.output_token_ids) == 3:
            raise Boom("logprobs of the third token")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RequestState, "add_sampled_logprobs", add_sampled_logprobs)
    faulty = {"prompt": "This one breaks", "max_tokens": 8, "logprobs": FAULTY_LOGPROBS}
    results: dict[str, httpx.Response] = {}

    def send(name: str, body: dict) -> None:
        results[name] = complete(server, body)

    threads = [threading.Thread(target=send, args=(f"good-{i}", body)) for i, body in enumerate(GOOD)]
    threads += [
        threading.Thread(target=send, args=("faulty", faulty)),
        threading.Thread(target=send, args=("faulty-stream", {**faulty, "stream": True})),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    failed = results["faulty"]
    assert failed.status_code == 500
    assert failed.json()["error"]["type"] == "InternalServerError" and "Boom" in failed.json()["error"]["message"]
    stream = results["faulty-stream"]
    assert stream.status_code == 200  # the status line had gone out before the fault
    events = [line[6:] for line in stream.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == 500
    for i, text in enumerate(alone):
        assert results[f"good-{i}"].status_code == 200
        assert results[f"good-{i}"].json()["choices"][0]["text"] == text
    server.wait_idle()
    server.block_manager.check_no_leaks()
    assert complete(server, GOOD[0]).json()["choices"][0]["text"] == alone[0]


def test_health_reports_a_dead_engine(server, monkeypatch):
    def dead():
        raise EngineDeadError("Engine loop has died: RuntimeError('device lost')")

    monkeypatch.setattr(server.engine, "check_health", dead)
    for method in ("GET", "POST"):
        assert httpx.request(method, f"{server.base_url}/ping").status_code == 503
    assert httpx.get(f"{server.base_url}/health").status_code == 503


def test_a_dead_engine_fails_its_requests_and_the_server_exits(tiny_llama_path):
    server = InProcessServer(server_args(tiny_llama_path))
    assert complete(server, GOOD[0]).status_code == 200

    def step():
        raise RuntimeError("device lost")

    server.engine.engine.step = step
    response = complete(server, GOOD[1])
    assert response.status_code == 500
    assert response.json()["error"] == {
        "message": "Engine loop has died: RuntimeError('device lost')",
        "type": "EngineDeadError",
        "param": None,
        "code": 500,
    }
    assert server.engine.errored
    deadline = time.monotonic() + 30
    while server.thread.is_alive():
        try:
            # Until uvicorn has closed its socket, a probe sees the engine is dead.
            assert httpx.get(f"{server.base_url}/health", timeout=2).status_code == 503
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not exit"
        time.sleep(0.05)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.base_url}/health", timeout=2)
