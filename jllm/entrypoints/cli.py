"""The `jllm` command (vLLM's `vllm` CLI): `jllm serve MODEL [flags]` starts the
OpenAI-compatible server; every engine argument is a flag."""
from __future__ import annotations

import argparse

from jllm import __version__


def main(argv: list[str] | None = None) -> None:
    from jllm.entrypoints.openai.api_server import run_server
    from jllm.entrypoints.openai.cli_args import make_arg_parser

    parser = argparse.ArgumentParser(prog="jllm", description="jllm: vLLM's inference engine on JAX.")
    parser.add_argument("-v", "--version", action="version", version=__version__)
    subparsers = parser.add_subparsers(dest="subcommand", required=True)
    serve = subparsers.add_parser(
        "serve", help="Start the OpenAI-compatible HTTP server.", usage="jllm serve [model_tag] [options]",
        description="Start the OpenAI-compatible HTTP server.")
    serve.add_argument("model_tag", type=str, nargs="?", default=None,
                       help="The model to serve (the same as --model).")
    make_arg_parser(serve)
    args = parser.parse_args(argv)
    if args.subcommand == "serve":
        if args.model_tag is not None:
            if args.model is not None and args.model != args.model_tag:
                serve.error(f"The model is given twice and differently: {args.model_tag!r} and "
                            f"--model {args.model!r}.")
            args.model = args.model_tag
        try:
            run_server(args)
        except ValueError as e:
            serve.error(str(e))


if __name__ == "__main__":
    main()
