"""Multi-host tensor parallelism, as two processes on this machine: jax.distributed over
localhost, 2 processes x 2 virtual CPU devices, one TP 4 mesh across them (the model's
all-reduces run over gloo, JAX's CPU collectives). Process 0 schedules and broadcasts each
step's inputs; process 1 replays them. The greedy tokens must equal HF transformers' on
the same weights (offline), and the one-device engine's, itself tested against HF (server)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from hf_models import hf_greedy, load_hf_model
from jllm import LLM, SamplingParams
from openai_server import RemoteServer, engine_flags
from tiny_model import ENGINE_ARGS

WORKER = os.path.join(os.path.dirname(__file__), "multi_process_llm.py")
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(folder: str, engine_args: dict, prompts, out) -> list:
    """Both processes of the run; process 0's results."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    args = [json.dumps(engine_args), json.dumps(prompts)]
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, str(rank), str(port), folder, str(out), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=600)[0])
        finally:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    return json.loads(out.read_text())


def test_two_processes_at_tp_4_equal_hf(tiny_llama_path, tmp_path):
    rng = np.random.default_rng(5)
    prompts = [rng.integers(100, 40000, size=n).tolist() for n in (6, 70)]
    tokens = run_two_processes(tiny_llama_path, {**ENGINE_ARGS, "tensor_parallel_size": 4}, prompts, tmp_path / "o")
    tokenizer = type("NoText", (), {"decode": staticmethod(lambda ids, **kw: "")})
    hf = hf_greedy(load_hf_model(tiny_llama_path), tokenizer, prompts, 8)
    assert tokens == [o.token_ids for o in hf]


def test_two_processes_embed_at_tp_4_equal_hf(tiny_llama_path, tmp_path):
    """The pooling runner's steps replay the same way: last-token embeddings, normalized."""
    import torch
    from transformers import AutoModel

    rng = np.random.default_rng(6)
    prompts = [rng.integers(100, 40000, size=n).tolist() for n in (3, 40)]
    engine_args = {**ENGINE_ARGS, "tensor_parallel_size": 4, "runner": "pooling", "max_model_len": 64}
    embeddings = run_two_processes(tiny_llama_path, engine_args, prompts, tmp_path / "o")
    model = AutoModel.from_pretrained(tiny_llama_path, dtype=torch.float32).eval()
    with torch.no_grad():
        for prompt, got in zip(prompts, embeddings):
            last = model(torch.tensor([prompt])).last_hidden_state[0, -1]
            np.testing.assert_allclose(got, torch.nn.functional.normalize(last, dim=-1).numpy(), atol=1e-5)


def test_two_process_server_serves_from_process_0_only(tiny_llama_path, tmp_path):
    """`jllm serve` on both processes: process 0 serves HTTP at TP 4 over both, process 1
    binds nothing, and exits when process 0 is stopped."""
    port = _free_port()
    flags = ["--tensor-parallel-size", "4", "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port)]
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    follower_port = _free_port()
    follower = subprocess.Popen(
        [sys.executable, "-m", "jllm.entrypoints.cli", "serve", tiny_llama_path, "--port", str(follower_port)]
        + engine_flags()
        + flags
        + ["--node-rank", "1"],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        server = RemoteServer(tiny_llama_path, [*flags, "--node-rank", "0"], str(tmp_path / "server.log"), env=env)
        try:
            with server.client(timeout=120) as client:
                body = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0.0}
                text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
            with socket.socket() as s:  # the follower never listened
                assert s.connect_ex(("127.0.0.1", follower_port)) != 0
        finally:
            server.stop()
        assert follower.wait(120) == 0, follower.stdout.read()[-3000:]
    finally:
        follower.kill()
    offline = LLM(model=tiny_llama_path, **ENGINE_ARGS)
    expected = offline.generate(["The capital of France is"], SamplingParams(temperature=0.0, max_tokens=8))
    assert text == expected[0].outputs[0].text
