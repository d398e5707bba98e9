"""Data parallelism on eight virtual CPU devices (tests/conftest.py): data_parallel_size
replicas behind one LLM or one server (DataParallelEngine) give every request the output
one engine gives, in request order; requests are spread over the replicas and stay on
theirs (samples, aborts); the replicas step at the same time.

The reference is one engine on one device (TP 1) with the same settings; stand-in
replicas (no model) show the stepping rules."""

from __future__ import annotations

import random
import threading
from types import SimpleNamespace

import httpx
import pytest

from jllm import LLM, SamplingParams
from jllm.engine.data_parallel import DataParallelEngine
from openai_server import InProcessServer, server_args
from tiny_model import ENGINE_ARGS

ARGS = {**ENGINE_ARGS, "dtype": "float32"}
# Two shared prefixes longer than two 16-token pages (45 and 57 tokens), so that later prompts find them cached.
PREFIX_A = "You are a careful assistant who answers questions about geography in one short sentence. " * 3
PREFIX_B = "Write a short poem about the sea, the wind and the sailors who cross it at night. " * 3
# Spread in order over the replicas: 0 and 2 on replica 0, 1 and 3 on replica 1.
FIRST_PROMPTS = [PREFIX_A + "France?", PREFIX_B + "Verse one:", "Hello, my name is", "One, two, three,"]
# The same prefixes again, on the replicas that hold them: each is a prefix-cache hit.
SECOND_PROMPTS = [PREFIX_A + "Spain?", PREFIX_B + "Verse two:"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


@pytest.fixture(scope="module")
def reference(tiny_llama_path) -> LLM:
    return LLM(tiny_llama_path, **ARGS)


@pytest.fixture(scope="module")
def llm(tiny_llama_path) -> LLM:
    return LLM(tiny_llama_path, tensor_parallel_size=2, data_parallel_size=2, disable_log_stats=False, **ARGS)


def texts_and_tokens(outputs) -> list[list[tuple[str, list[int]]]]:
    return [[(c.text, list(c.token_ids)) for c in o.outputs] for o in outputs]


def run_to_completion(engine) -> dict:
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    return finished


# ----- one LLM over two replicas of two devices each -----------------------------------------


def test_dp2_tp2_greedy_outputs_equal_tp1_in_request_order_with_prefix_caching(llm, reference):
    # Each replica's KV pool lies on its own pair of devices.
    pools = [r.runner.kv_caches[0].k.sharding.mesh for r in llm.llm_engine.engines]
    assert [tuple(d.id for d in mesh.devices) for mesh in pools] == [(0, 1), (2, 3)]
    for prompts in (FIRST_PROMPTS, SECOND_PROMPTS):
        outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
        expected = reference.generate(prompts, GREEDY, use_tqdm=False)
        assert [o.prompt for o in outputs] == prompts
        assert texts_and_tokens(outputs) == texts_and_tokens(expected)
    # The second prompts found their prefixes on their replicas, as on the one engine.
    assert all(o.num_cached_tokens >= 32 for o in outputs)
    assert [o.num_cached_tokens for o in outputs] == [o.num_cached_tokens for o in expected]


def test_requests_are_spread_over_the_replicas_by_fewest_unfinished(llm):
    engine = llm.llm_engine
    engine.add_request("long", "Tell me a story.", SamplingParams(max_tokens=30, ignore_eos=True))
    engine.add_request("short", "Hello", SamplingParams(max_tokens=1))
    engine.step()  # "short" ends: replica 0 holds "long", replica 1 nothing
    for i in range(3):
        engine.add_request(f"r{i}", "Hello", GREEDY)
    # The emptier replica first, the lower rank on a tie (round robin would start at rank 0).
    assert [engine.engine_index_of(r) for r in ("long", "r0", "r1", "r2")] == [0, 1, 0, 1]
    assert [r.get_num_unfinished_requests() for r in engine.engines] == [2, 2]
    assert set(run_to_completion(engine)) == {"long", "r0", "r1", "r2"}
    assert engine.get_num_unfinished_requests() == 0


def test_every_sample_of_a_request_runs_on_its_replica_and_matches_one_engine(llm, reference):
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=6)
    engine = llm.llm_engine
    engine.add_request("other", "Hello", GREEDY)
    engine.add_request("n3", "The future of AI is", params)
    owner = engine.engines[engine.engine_index_of("n3")]
    assert engine.engine_index_of("n3") == 1
    assert sorted(owner.scheduler.requests) == ["0_n3", "1_n3", "2_n3"]
    outputs = run_to_completion(engine)
    [expected] = reference.generate(["The future of AI is"], params, use_tqdm=False)
    assert len(outputs["n3"].outputs) == 3
    assert texts_and_tokens([outputs["n3"]]) == texts_and_tokens([expected])


def test_an_abort_reaches_the_replica_that_runs_the_request(llm):
    engine = llm.llm_engine
    long = SamplingParams(max_tokens=30, ignore_eos=True)
    for request_id in ("a", "b", "c"):
        engine.add_request(request_id, "Tell me a story.", long)
    engine.step()
    assert engine.engine_index_of("b") == 1
    engine.abort_request(["b", "unknown"])
    assert engine.engines[1].get_num_unfinished_requests() == 0
    outputs = run_to_completion(engine)
    assert set(outputs) == {"a", "c"}
    assert all(len(o.outputs[0].token_ids) == 30 for o in outputs.values())
    for replica in engine.engines:
        replica.scheduler.block_manager.check_no_leaks()


def test_metrics_are_labelled_by_engine_and_add_up_to_the_outputs(llm):
    before = {m.labels["engine"]: m.value for m in llm.get_metrics() if m.name == "vllm:prompt_tokens"}
    prompts = ["The capital of France is", "The future of AI is"]
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    after = {m.labels["engine"]: m.value for m in llm.get_metrics() if m.name == "vllm:prompt_tokens"}
    assert sorted(after) == ["0", "1"]
    # One prompt on each replica.
    assert [after[e] - before[e] for e in ("0", "1")] == [len(o.prompt_token_ids) for o in outputs]


def test_dp_times_tp_beyond_the_devices_is_refused(tiny_llama_path):
    with pytest.raises(ValueError, match=r"World size \(16: tensor_parallel_size=4 x data_parallel_size=4\)"):
        LLM(tiny_llama_path, tensor_parallel_size=4, data_parallel_size=4, **ARGS)


# ----- the stepping rules, on stand-in replicas ------------------------------------------------


class FakeReplica:
    """LLMEngine's surface: one request at a time; `step` runs `on_step` and finishes it."""

    def __init__(self, engine_index: int, on_step=lambda: None) -> None:
        self.engine_index = engine_index
        self.on_step = on_step
        self.model_config = SimpleNamespace(seed=0)
        self.scheduler_config = self.cache_config = self.tokenizer = self.hf_config = None
        self.generation_config = None
        self.vocab_size = 0
        self.added: dict[str, SamplingParams] = {}

    def add_request(self, request_id, prompt, params=None, arrival_time=None) -> None:
        self.added[request_id] = params

    def abort_request(self, request_ids) -> None:
        for request_id in request_ids:
            self.added.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.added)

    def get_num_unfinished_requests(self) -> int:
        return len(self.added)

    def step(self) -> list:
        self.on_step()
        outputs = [SimpleNamespace(request_id=r, finished=True) for r in self.added]
        self.added.clear()
        return outputs


def test_replicas_step_at_the_same_time_on_their_own_threads():
    # Each step waits for the other replica's: steps run one after the other would time out.
    barrier = threading.Barrier(2, timeout=10)
    threads = []

    def on_step():
        threads.append(threading.current_thread().name)
        barrier.wait()

    engine = DataParallelEngine([FakeReplica(0, on_step), FakeReplica(1, on_step)])
    engine.add_request("a", "x")
    engine.add_request("b", "y")
    assert [o.request_id for o in engine.step()] == ["a", "b"]
    assert len(set(threads)) == 2 and not engine.has_unfinished_requests()


def test_a_replica_step_that_raises_raises_as_one_engine_would():
    error = RuntimeError("device lost")
    stepped = []

    def fail():
        raise error

    engine = DataParallelEngine([FakeReplica(0, lambda: stepped.append(0)), FakeReplica(1, fail)])
    engine.add_request("a", "x")
    engine.add_request("b", "y")
    with pytest.raises(RuntimeError) as raised:
        engine.step()
    assert raised.value is error and stepped == [0]


def test_request_ids_are_unique_across_replicas():
    engine = DataParallelEngine([FakeReplica(0), FakeReplica(1)])
    engine.add_request("a", "x")
    with pytest.raises(ValueError, match="Request id a already running"):
        engine.add_request("a", "y")


def test_unseeded_requests_get_one_engines_seeds_in_arrival_order():
    engine = DataParallelEngine([FakeReplica(0), FakeReplica(1)])
    user_params = SamplingParams(temperature=1.0)
    for request_id in ("a", "b", "c"):
        engine.add_request(request_id, "same prompt", user_params)
    seeds = [r.added[i].seed for i, r in zip("abc", (engine.engines[0], engine.engines[1], engine.engines[0]))]
    rng = random.Random(0)
    assert seeds == [rng.getrandbits(64) for _ in range(3)]
    assert user_params.seed is None


# ----- one server over two replicas ------------------------------------------------------------


@pytest.mark.slow
def test_server_with_two_replicas_answers_completions_and_chat_as_one_engine(tiny_llama_path, reference):
    server = InProcessServer(server_args(tiny_llama_path, "--data-parallel-size", "2", "--dtype", "float32"))
    model = server.app.state.openai_serving_models.model_name
    try:
        prompts = ["The capital of France is", "One, two, three,"]
        body = {"model": model, "prompt": prompts, "max_tokens": 8, "temperature": 0}
        response = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        choices = sorted(response.json()["choices"], key=lambda c: c["index"])
        expected = reference.generate(prompts, GREEDY, use_tqdm=False)
        assert [c["text"] for c in choices] == [o.outputs[0].text for o in expected]

        messages = [{"role": "user", "content": "Name a colour."}]
        body = {"model": model, "messages": messages, "max_tokens": 8, "temperature": 0}
        response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        [expected_chat] = reference.chat(messages, GREEDY, use_tqdm=False)
        assert response.json()["choices"][0]["message"]["content"] == expected_chat.outputs[0].text

        # The two prompts of the completion ran on the two replicas: each counts one.
        prompt_tokens = [
            server.registry.get_sample_value("vllm:prompt_tokens_total", {"model_name": model, "engine": e})
            for e in "01"
        ]
        assert all(prompt_tokens)
    finally:
        server.stop()
