"""The server's flags: vLLM's frontend flags plus every engine argument (EngineArgs).

`add_frontend_args` holds the flags that shape responses, shared by `jllm serve` and
`jllm run-batch`; `make_arg_parser` adds the HTTP server's own.
"""

from __future__ import annotations

import argparse
import os

from jllm.engine.arg_utils import EngineArgs
from jllm.entrypoints.openai.chat_utils import load_chat_template

# Where the API key comes from when --api-key is not given, in this order; vLLM's users
# set VLLM_API_KEY.
API_KEY_ENV_VARS = ("JLLM_API_KEY", "VLLM_API_KEY")

# Bodies larger than this are refused with 413 before any parsing.
DEFAULT_MAX_REQUEST_BODY_BYTES = 32 * 1024 * 1024


def add_frontend_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """How requests become prompts and outputs become responses (vLLM's FrontendArgs
    that are not about HTTP), plus every engine argument."""
    group = parser.add_argument_group("frontend")
    group.add_argument(
        "--chat-template",
        type=str,
        default=None,
        help="The chat template (a file path or the template itself); defaults to the tokenizer's.",
    )
    group.add_argument(
        "--trust-request-chat-template", action="store_true", help="Honour a chat_template sent in a request."
    )
    group.add_argument(
        "--response-role",
        type=str,
        default="assistant",
        help="The role of the reply when add_generation_prompt is true.",
    )
    group.add_argument(
        "--enable-log-requests",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Log every request's prompt and sampling parameters.",
    )
    group.add_argument(
        "--max-log-len",
        type=int,
        default=None,
        help="Most prompt characters or token ids a request log line shows; no limit by default.",
    )
    group.add_argument(
        "--return-tokens-as-token-ids",
        action="store_true",
        help="Logprob tokens as 'token_id:N' strings, unless a request's return_tokens_as_token_ids says otherwise.",
    )
    group.add_argument(
        "--enable-force-include-usage",
        action="store_true",
        help="Streams end with a usage chunk even when stream_options does not ask for one.",
    )
    group.add_argument(
        "--enable-prompt-tokens-details",
        action="store_true",
        help="usage.prompt_tokens_details.cached_tokens: prompt tokens served from the prefix cache.",
    )
    EngineArgs.add_cli_args(parser)
    return parser


def make_arg_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("server")
    group.add_argument("--host", type=str, default=None, help="Host name to bind; all interfaces by default.")
    group.add_argument("--port", type=int, default=8000, help="Port number.")
    group.add_argument(
        "--uds", type=str, default=None, help="Serve on this unix domain socket; --host and --port are then ignored."
    )
    group.add_argument(
        "--uvicorn-log-level",
        type=str,
        default="info",
        choices=["debug", "info", "warning", "error", "critical", "trace"],
        help="Log level for uvicorn.",
    )
    group.add_argument("--disable-uvicorn-access-log", action="store_true", help="Disable uvicorn's access log.")
    group.add_argument(
        "--api-key",
        type=str,
        nargs="+",
        default=None,
        help="If given, /v1 routes need one of these keys in the Authorization: Bearer header. "
        "Without it the key is read from JLLM_API_KEY, then VLLM_API_KEY.",
    )
    group.add_argument("--root-path", type=str, default=None, help="FastAPI root_path behind a path-based proxy.")
    group.add_argument(
        "--max-request-body-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BODY_BYTES,
        help="Larger request bodies are refused with HTTP 413.",
    )
    group.add_argument(
        "--enable-request-id-headers",
        action="store_true",
        help="Every response carries an X-Request-Id header: the request's own, or a new one.",
    )
    group.add_argument(
        "--enable-server-load-tracking",
        action="store_true",
        help="GET /load reports the generation requests in flight.",
    )
    group.add_argument(
        "--enable-tokenizer-info-endpoint",
        action="store_true",
        help="Serve GET /tokenizer_info (the tokenizer's configuration and chat template).",
    )
    add_frontend_args(parser)
    # The server logs its throughput every few seconds unless told not to (vLLM's default).
    parser.set_defaults(disable_log_stats=False)
    return parser


def resolve_api_keys(flag_keys: list[str] | None, environ=os.environ) -> list[str] | None:
    """--api-key wins; else the first of API_KEY_ENV_VARS that is set and not empty."""
    if flag_keys:
        return flag_keys
    for name in API_KEY_ENV_VARS:
        if environ.get(name):
            return [environ[name]]
    return None


def validate_frontend_args(args: argparse.Namespace) -> None:
    """Refuse a bad flag before the engine spends time loading the model."""
    if args.model is None:
        raise ValueError("No model given: pass --model MODEL (or `jllm serve MODEL`).")
    load_chat_template(args.chat_template)
    if args.max_log_len is not None and args.max_log_len < 0:
        raise ValueError(f"--max-log-len must be non-negative, got {args.max_log_len}.")


def validate_parsed_serve_args(args: argparse.Namespace) -> None:
    validate_frontend_args(args)
    if args.max_request_body_bytes <= 0:
        raise ValueError(f"--max-request-body-bytes must be positive, got {args.max_request_body_bytes}.")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}.")
