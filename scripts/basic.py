"""vLLM's basic example: four classic prompts, temperature 0.8, top_p 0.95."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jllm import LLM, SamplingParams  # noqa: E402
from scripts.generate import DEFAULT_PROMPTS as prompts  # noqa: E402


def main() -> None:
    sampling_params = SamplingParams(temperature=0.8, top_p=0.95)
    llm = LLM(model=sys.argv[1] if len(sys.argv) > 1 else None)
    outputs = llm.generate(prompts, sampling_params)
    print("\nGenerated Outputs:\n" + "-" * 60)
    for output in outputs:
        print(f"Prompt:    {output.prompt!r}")
        print(f"Output:    {output.outputs[0].text!r}")
        print("-" * 60)


if __name__ == "__main__":
    main()
