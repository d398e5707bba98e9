"""The worker sees only the scheduler's per-step message: nothing under jllm/worker/
imports the engine's Request, the scheduler or SamplingParams, or any engine module."""

import ast
import pathlib

import jllm.worker

WORKER = pathlib.Path(jllm.worker.__file__).parent
# What a worker module may import from jllm: the message, configs, the mesh, layers, models.
ALLOWED = ("jllm.core.scheduler_output", "jllm.config", "jllm.distributed", "jllm.layers", "jllm.models", "jllm.worker")
FORBIDDEN_NAMES = {"Request", "ScheduledRequest", "SamplingParams", "RequestStatus"}


def imported_modules(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.module or ""


def test_worker_modules_import_only_the_message_from_the_scheduler_side():
    modules = sorted(WORKER.glob("*.py"))
    assert len(modules) >= 6
    for path in modules:
        tree = ast.parse(path.read_text())
        for module in imported_modules(tree):
            if module.startswith("jllm"):
                assert module.startswith(ALLOWED), f"{path.name} imports {module}"
        names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        names |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        assert not names & (FORBIDDEN_NAMES | {"sampling_params"}), f"{path.name} reads {names & FORBIDDEN_NAMES}"


def test_the_check_sees_a_forbidden_import():
    tree = ast.parse("from jllm.engine.request import Request\nx = req.sampling_params")
    assert [m for m in imported_modules(tree) if not m.startswith(ALLOWED)] == ["jllm.engine.request"]
