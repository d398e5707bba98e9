"""vLLM's basic classify example: `python scripts/classify.py --model M [engine flags]`
(a `*ForSequenceClassification` folder, or a generative model with --convert classify)."""

from __future__ import annotations

from example_args import PROMPTS, engine_kwargs, trimmed

from jllm import LLM


def main(argv=None) -> None:
    llm = LLM(**engine_kwargs(__doc__, argv, needs_model=True, runner="pooling"))
    outputs = llm.classify(PROMPTS)
    print("\nGenerated Outputs:\n" + "-" * 60)
    for prompt, output in zip(PROMPTS, outputs):
        probs = output.outputs.probs
        print(f"Prompt: {prompt!r} \nClass Probabilities: {trimmed(probs)} (size={len(probs)})")
        print("-" * 60)


if __name__ == "__main__":
    main()
