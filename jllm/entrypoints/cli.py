"""The `jllm` command (vLLM's `vllm` CLI): `jllm serve MODEL [flags]` starts the
OpenAI-compatible server, `jllm run-batch -i IN -o OUT --model MODEL [flags]` runs a file of
OpenAI batch requests; every engine argument is a flag. `jllm convert MODEL OUT -tp N` saves a
model as a checkpoint pre-sharded for N devices."""

from __future__ import annotations

from jllm import __version__
from jllm.utils.argparse_utils import FlexibleArgumentParser


def main(argv: list[str] | None = None) -> None:
    from jllm.entrypoints import convert
    from jllm.entrypoints.openai import run_batch
    from jllm.entrypoints.openai.api_server import run_server
    from jllm.entrypoints.openai.cli_args import make_arg_parser

    parser = FlexibleArgumentParser(prog="jllm", description="jllm: vLLM's inference engine on JAX.")
    parser.add_argument("-v", "--version", action="version", version=__version__)
    subparsers = parser.add_subparsers(dest="subcommand", required=True)
    serve = subparsers.add_parser(
        "serve",
        help="Start the OpenAI-compatible HTTP server.",
        usage="jllm serve [model_tag] [options]",
        description="Start the OpenAI-compatible HTTP server.",
    )
    serve.add_argument("model_tag", type=str, nargs="?", default=None, help="The model to serve (the same as --model).")
    make_arg_parser(serve)
    batch = subparsers.add_parser(
        "run-batch",
        help="Run batch prompts and write results to file.",
        usage="jllm run-batch -i INPUT_FILE -o OUTPUT_FILE --model MODEL [options]",
        description="Run a file of OpenAI batch requests (/v1/completions, /v1/chat/completions, /v1/embeddings, "
        "/score, /rerank) and write one result line per request.",
    )
    run_batch.make_arg_parser(batch)
    converter = subparsers.add_parser(
        "convert",
        help="Save a model as a checkpoint pre-sharded for tensor parallelism.",
        usage="jllm convert [model] output_dir [--tensor-parallel-size N] [--dtype DTYPE]",
        description="Save a model's weights with orbax-checkpoint, laid out in the shards of N devices, beside "
        "its config, tokenizer and generation config; `LLM(model=output_dir)` or `jllm serve output_dir` then "
        "restores each shard straight onto its device.",
    )
    convert.make_arg_parser(converter)
    args = parser.parse_args(argv)
    if args.subcommand == "serve":
        if args.model_tag is not None:
            if args.model is not None and args.model != args.model_tag:
                serve.error(f"The model is given twice and differently: {args.model_tag!r} and --model {args.model!r}.")
            args.model = args.model_tag
        try:
            run_server(args)
        except ValueError as e:
            serve.error(str(e))
    elif args.subcommand == "run-batch":
        try:
            run_batch.validate_run_batch_args(args)
        except ValueError as e:
            batch.error(str(e))
        run_batch.run_batch(args)
    elif args.subcommand == "convert":
        try:
            convert.convert(args.model, args.output_dir, args.tensor_parallel_size, args.dtype, args.revision)
        except ValueError as e:
            converter.error(str(e))


if __name__ == "__main__":
    main()
