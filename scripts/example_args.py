"""The command line vLLM's basic examples share: every engine flag (FlexibleArgumentParser
+ EngineArgs), with each example's own defaults."""

from __future__ import annotations

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jllm import EngineArgs  # noqa: E402
from jllm.utils import FlexibleArgumentParser  # noqa: E402

PROMPTS = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]


def engine_kwargs(description: str, argv=None, *, needs_model: bool = False, **defaults) -> dict:
    """The LLM(**kwargs) of the command line; `defaults` are the example's own."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = FlexibleArgumentParser(description=description)
    EngineArgs.add_cli_args(parser)
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if needs_model and args.model is None:
        parser.error("--model is required: no model of this kind ships with jllm (an HF folder or a cached repo id).")
    return vars(args)


def trimmed(values) -> str:
    """vLLM's print of a long vector: the first 16 values, then '...'."""
    values = list(values)
    return (str(values[:16])[:-1] + ", ...]") if len(values) > 16 else str(values)
