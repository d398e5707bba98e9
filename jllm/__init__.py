"""jllm: vLLM's inference engine rebuilt on JAX/XLA."""

from jllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
from jllm.engine.async_llm_engine import AsyncLLMEngine
from jllm.engine.llm_engine import LLMEngine
from jllm.entrypoints.llm import LLM
from jllm.inputs import TextPrompt, TokensPrompt
from jllm.outputs import CompletionOutput, Logprob, RequestOutput
from jllm.sampling_params import RequestOutputKind, SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "LLMEngine",
    "AsyncLLMEngine",
    "EngineArgs",
    "AsyncEngineArgs",
    "SamplingParams",
    "RequestOutputKind",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "TextPrompt",
    "TokensPrompt",
    "__version__",
]
