"""vLLM's chat example: one conversation, then a batch of 10 with the progress bar."""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jllm import LLM, EngineArgs, SamplingParams  # noqa: E402


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    EngineArgs.add_cli_args(parser)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument(
        "--chat-template-path", type=str, default=None, help="A Jinja chat template file to use instead of the model's."
    )
    args = parser.parse_args(argv)
    llm = LLM(**vars(EngineArgs.from_cli_args(args)))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    chat_template = None
    if args.chat_template_path:
        with open(args.chat_template_path, encoding="utf-8") as f:
            chat_template = f.read()

    conversation = [
        {"role": "system", "content": "You are a helpful assistant"},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hello! How can I assist you today?"},
        {"role": "user", "content": "Write an essay about the importance of higher education."},
    ]
    outputs = llm.chat(conversation, params, use_tqdm=False, chat_template=chat_template)
    print(f"Prompt: {outputs[0].prompt!r}\nGenerated text: {outputs[0].outputs[0].text!r}\n" + "-" * 60)

    conversations = [conversation for _ in range(10)]
    outputs = llm.chat(conversations, params, use_tqdm=True, chat_template=chat_template)
    for out in outputs:
        print(f"Generated text: {out.outputs[0].text[:80]!r}")


if __name__ == "__main__":
    main()
