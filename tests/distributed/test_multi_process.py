"""Multi-host tensor parallelism, as two processes on this machine: jax.distributed over
localhost, 2 processes x 2 virtual CPU devices, one TP 4 mesh across them (the model's
all-reduces run over gloo, JAX's CPU collectives). Process 0 schedules and broadcasts each
step's inputs; process 1 replays them. The greedy tokens must equal HF transformers' on
the same weights."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from hf_models import hf_greedy, load_hf_model
from tiny_model import ENGINE_ARGS

WORKER = os.path.join(os.path.dirname(__file__), "multi_process_llm.py")
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_at_tp_4_equal_hf(tiny_llama_path, tmp_path):
    rng = np.random.default_rng(5)
    prompts = [rng.integers(100, 40000, size=n).tolist() for n in (6, 70)]
    port, out = _free_port(), tmp_path / "tokens.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    args = [json.dumps({**ENGINE_ARGS, "tensor_parallel_size": 4}), json.dumps(prompts)]
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, str(rank), str(port), tiny_llama_path, str(out), *args],
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
    tokenizer = type("NoText", (), {"decode": staticmethod(lambda ids, **kw: "")})
    hf = hf_greedy(load_hf_model(tiny_llama_path), tokenizer, prompts, 8)
    assert json.loads(out.read_text()) == [o.token_ids for o in hf]
