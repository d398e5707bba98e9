"""Helpers at the import paths vLLM's example programs use."""

from jllm.utils.argparse_utils import FlexibleArgumentParser

__all__ = ["FlexibleArgumentParser"]
