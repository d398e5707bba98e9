"""vLLM's basic reward example: `python scripts/reward.py --model M [engine flags]` (a
reward model such as Qwen2ForRewardModel: one reward per prompt token)."""

from __future__ import annotations

from example_args import PROMPTS, engine_kwargs, trimmed

from jllm import LLM


def main(argv=None) -> None:
    llm = LLM(**engine_kwargs(__doc__, argv, needs_model=True, runner="pooling"))
    outputs = llm.reward(PROMPTS)
    print("\nGenerated Outputs:\n" + "-" * 60)
    for prompt, output in zip(PROMPTS, outputs):
        rewards = output.outputs.data.reshape(len(output.prompt_token_ids), -1)[:, 0]
        print(f"Prompt: {prompt!r} \nReward: {trimmed(rewards.tolist())} (size={len(rewards)})")
        print("-" * 60)


if __name__ == "__main__":
    main()
