"""jllm: vLLM's inference engine rebuilt on JAX/XLA."""

from jllm.engine.arg_utils import EngineArgs
from jllm.entrypoints.llm import LLM
from jllm.inputs import TextPrompt, TokensPrompt
from jllm.outputs import CompletionOutput, Logprob, RequestOutput
from jllm.sampling_params import RequestOutputKind, SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "EngineArgs",
    "SamplingParams",
    "RequestOutputKind",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "TextPrompt",
    "TokensPrompt",
    "__version__",
]
