"""jllm: vLLM's inference engine rebuilt on JAX/XLA."""

from jllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
from jllm.engine.async_llm_engine import AsyncLLMEngine
from jllm.engine.llm_engine import LLMEngine
from jllm.entrypoints.llm import LLM
from jllm.inputs import TextPrompt, TokensPrompt
from jllm.outputs import (
    ClassificationOutput,
    ClassificationRequestOutput,
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    Logprob,
    PoolingOutput,
    PoolingRequestOutput,
    RequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from jllm.pooling_params import PoolingParams
from jllm.sampling_params import RequestOutputKind, SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "LLMEngine",
    "AsyncLLMEngine",
    "EngineArgs",
    "AsyncEngineArgs",
    "SamplingParams",
    "PoolingParams",
    "PoolingOutput",
    "PoolingRequestOutput",
    "EmbeddingOutput",
    "EmbeddingRequestOutput",
    "ClassificationOutput",
    "ClassificationRequestOutput",
    "ScoringOutput",
    "ScoringRequestOutput",
    "RequestOutputKind",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "TextPrompt",
    "TokensPrompt",
    "__version__",
]
