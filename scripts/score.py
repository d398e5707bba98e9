"""vLLM's basic score example: `python scripts/score.py --model M [engine flags]`: a
cross-encoder (e.g. an XLMRobertaForSequenceClassification reranker) scores each pair; an
embedding model gives the cosine similarity of the two embeddings."""

from __future__ import annotations

from example_args import engine_kwargs

from jllm import LLM


def main(argv=None) -> None:
    llm = LLM(**engine_kwargs(__doc__, argv, needs_model=True, runner="pooling"))
    text_1 = "What is the capital of France?"
    texts_2 = ["The capital of Brazil is Brasilia.", "The capital of France is Paris."]
    outputs = llm.score(text_1, texts_2)
    print("\nGenerated Outputs:\n" + "-" * 60)
    for text_2, output in zip(texts_2, outputs):
        print(f"Pair: {[text_1, text_2]!r} \nScore: {output.outputs.score}")
        print("-" * 60)


if __name__ == "__main__":
    main()
