"""jllm's OpenAI-compatible server for the server tests, on a real uvicorn bound to
127.0.0.1 and a free port: in this process (a thread; the tests can look into its
engine) or as a `jllm serve` subprocess (the command a user runs)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx

from tiny_model import ENGINE_ARGS

STARTUP_TIMEOUT_S = 240


def engine_flags(engine_args: dict = ENGINE_ARGS) -> list[str]:
    """The tests' engine settings as `jllm serve` flags."""
    flags = []
    for name, value in engine_args.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


def server_args(model: str, *extra: str) -> argparse.Namespace:
    from jllm.entrypoints.openai.cli_args import make_arg_parser

    parser = make_arg_parser(argparse.ArgumentParser())
    return parser.parse_args(["--model", model, *engine_flags(), *extra])


class InProcessServer:
    """build_app + init_app_state + uvicorn.Server on a daemon thread."""

    def __init__(self, args: argparse.Namespace) -> None:
        from jllm.engine.arg_utils import EngineArgs
        from jllm.engine.async_llm_engine import AsyncLLMEngine
        from jllm.entrypoints.openai.api_server import build_app, init_app_state, make_server

        self.engine = AsyncLLMEngine.from_engine_args(EngineArgs.from_cli_args(args))
        self.app = build_app(args)
        init_app_state(self.engine, self.app.state, args)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        args.uvicorn_log_level = "warning"
        self.server = make_server(self.app, args)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("The in-process server did not start.")
            time.sleep(0.05)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def registry(self):
        return self.app.state.metrics_registry

    @property
    def block_manager(self):
        return self.engine.engine.scheduler.block_manager

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Until the engine holds no request (aborts are applied between steps)."""
        deadline = time.monotonic() + timeout
        while self.engine.get_num_unfinished_requests() or self.engine.engine.has_unfinished_requests():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.engine.get_num_unfinished_requests()} requests still in the engine")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RemoteServer:
    """`python -m jllm.entrypoints.cli serve MODEL ...` in a subprocess, logging to a file."""

    def __init__(
        self, model: str, extra: list[str], log_path: str, env: dict[str, str] | None = None, uds: str | None = None
    ) -> None:
        """`env` is added to this process's environment; with `uds` the server listens on
        that unix socket instead of a port."""
        self.port = free_port()
        self.uds = uds
        self.log_path = log_path
        address = ["--uds", uds] if uds else ["--host", "127.0.0.1", "--port", str(self.port)]
        cmd = [sys.executable, "-m", "jllm.entrypoints.cli", "serve", model, *address, *engine_flags(), *extra]
        self.log_file = open(log_path, "w")
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"`jllm serve` exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with self.client(timeout=2) as client:
                    if client.get("/health").status_code == 200:
                        return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"`jllm serve` did not become healthy:\n{self.log()}")
            time.sleep(0.25)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs) -> httpx.Client:
        """An httpx client for this server, over its unix socket where it has one."""
        if self.uds:
            return httpx.Client(transport=httpx.HTTPTransport(uds=self.uds), base_url="http://jllm", **kwargs)
        return httpx.Client(base_url=self.base_url, **kwargs)

    def log(self) -> str:
        self.log_file.flush()
        with open(self.log_path) as f:
            return f.read()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
        self.log_file.close()
