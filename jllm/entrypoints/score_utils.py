"""LLM.score's inputs and outputs: pairing data_1 with data_2 (1:1, 1:N, N:N), a cross-
encoder's pair prompts, and the cosine scores of an embedding model (vLLM's score_utils)."""

from __future__ import annotations

import numpy as np

from jllm.outputs import PoolingOutput, PoolingRequestOutput


def validate_score_input(data_1, data_2) -> tuple[list, list]:
    """Both sides as lists, paired: one query against N documents is repeated N times."""
    data_1 = [data_1] if isinstance(data_1, (str, dict)) else list(data_1)
    data_2 = [data_2] if isinstance(data_2, (str, dict)) else list(data_2)
    if len(data_1) > 1 and len(data_1) != len(data_2):
        raise ValueError("Input lengths must be either 1:1, 1:N or N:N")
    if len(data_1) == 0:
        raise ValueError("At least one text element must be given")
    if len(data_2) == 0:
        raise ValueError("At least one text_pair element must be given")
    if len(data_1) == 1:
        data_1 = data_1 * len(data_2)
    for text in (*data_1, *data_2):
        if not isinstance(text, str):
            raise ValueError(f"Score inputs must be strings, got {type(text).__name__}.")
    return data_1, data_2


def cross_encoder_prompt(tokenizer, text_1: str, text_2: str, truncate: int | None) -> dict:
    """The pair as the tokenizer joins it ([CLS] a [SEP] b [SEP] for BERT), with its token
    types where the tokenizer gives them."""
    encoded = tokenizer(text_1, text_pair=text_2, truncation=truncate is not None, max_length=truncate)
    prompt = {"prompt_token_ids": list(encoded["input_ids"])}
    if "token_type_ids" in encoded:
        prompt["token_type_ids"] = list(encoded["token_type_ids"])
    return prompt


def cosine_scores(
    embeds_1: list[PoolingRequestOutput], embeds_2: list[PoolingRequestOutput], pad_token_id: int | None
) -> list[PoolingRequestOutput]:
    """Each pair's cosine similarity, as one PoolingRequestOutput per pair."""
    padding = [pad_token_id] if pad_token_id is not None else []
    scores = []
    for e1, e2 in zip(embeds_1, embeds_2):
        a, b = np.asarray(e1.outputs.data, np.float64), np.asarray(e2.outputs.data, np.float64)
        cosine = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
        scores.append(
            PoolingRequestOutput(
                f"{e1.request_id}_{e2.request_id}",
                PoolingOutput(np.asarray(cosine, np.float32)),
                e1.prompt_token_ids + padding + e2.prompt_token_ids,
                finished=True,
            )
        )
    return scores
