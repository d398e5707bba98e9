"""The server's flags: vLLM's frontend flags plus every engine argument (EngineArgs)."""
from __future__ import annotations

import argparse

from jllm.engine.arg_utils import EngineArgs
from jllm.entrypoints.openai.chat_utils import load_chat_template

# Bodies larger than this are refused with 413 before any parsing.
DEFAULT_MAX_REQUEST_BODY_BYTES = 32 * 1024 * 1024


def make_arg_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("server")
    group.add_argument("--host", type=str, default=None, help="Host name to bind; all interfaces by default.")
    group.add_argument("--port", type=int, default=8000, help="Port number.")
    group.add_argument("--uvicorn-log-level", type=str, default="info",
                       choices=["debug", "info", "warning", "error", "critical", "trace"],
                       help="Log level for uvicorn.")
    group.add_argument("--disable-uvicorn-access-log", action="store_true", help="Disable uvicorn's access log.")
    group.add_argument("--api-key", type=str, nargs="+", default=None,
                       help="If given, /v1 routes need one of these keys in the Authorization: Bearer header.")
    group.add_argument("--chat-template", type=str, default=None,
                       help="The chat template (a file path or the template itself); defaults to the tokenizer's.")
    group.add_argument("--trust-request-chat-template", action="store_true",
                       help="Honour a chat_template sent in a request.")
    group.add_argument("--response-role", type=str, default="assistant",
                       help="The role of the reply when add_generation_prompt is true.")
    group.add_argument("--root-path", type=str, default=None, help="FastAPI root_path behind a path-based proxy.")
    group.add_argument("--enable-log-requests", action=argparse.BooleanOptionalAction, default=False,
                       help="Log every request's prompt and sampling parameters.")
    group.add_argument("--max-log-len", type=int, default=None,
                       help="Most prompt characters or token ids a request log line shows; no limit by default.")
    group.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_REQUEST_BODY_BYTES,
                       help="Larger request bodies are refused with HTTP 413.")
    EngineArgs.add_cli_args(parser)
    # The server logs its throughput every few seconds unless told not to (vLLM's default).
    parser.set_defaults(disable_log_stats=False)
    return parser


def validate_parsed_serve_args(args: argparse.Namespace) -> None:
    """Refuse a bad flag before the engine spends time loading the model."""
    if args.model is None:
        raise ValueError("No model given: pass it as `jllm serve MODEL` or --model MODEL.")
    load_chat_template(args.chat_template)
    if args.max_log_len is not None and args.max_log_len < 0:
        raise ValueError(f"--max-log-len must be non-negative, got {args.max_log_len}.")
    if args.max_request_body_bytes <= 0:
        raise ValueError(f"--max-request-body-bytes must be positive, got {args.max_request_body_bytes}.")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}.")
