"""vLLM's basic example: four classic prompts, temperature 0.8, top_p 0.95:
`python scripts/basic.py [--model M] [engine flags]` (the default model without --model)."""

from __future__ import annotations

from example_args import PROMPTS, engine_kwargs

from jllm import LLM, SamplingParams


def main(argv=None) -> None:
    sampling_params = SamplingParams(temperature=0.8, top_p=0.95)
    llm = LLM(**engine_kwargs(__doc__, argv))
    outputs = llm.generate(PROMPTS, sampling_params)
    print("\nGenerated Outputs:\n" + "-" * 60)
    for output in outputs:
        print(f"Prompt:    {output.prompt!r}")
        print(f"Output:    {output.outputs[0].text!r}")
        print("-" * 60)


if __name__ == "__main__":
    main()
