"""Llama-family pooling models against HF transformers in float32: sequence classifiers
(Llama/Qwen2/Qwen3 `*ForSequenceClassification`: last-token pooling and the `score`
head), cross-encoder scores (one label, sigmoid), Qwen2ForRewardModel's per-token rewards,
last-token embeddings of a base model saved on its own (Qwen3-Embedding's layout) and of
a generative model converted with `--convert embed` / `classify`."""

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer
from pooling_models import (
    SEQUENCE_CLASSIFIERS,
    hf_last_hidden,
    hf_rewards,
    hf_sequence_logits,
    save_qwen2_reward_model,
    save_qwen3_base_model,
    save_sequence_classifier,
)

from jllm import LLM
from jllm.models.loader.gguf_loader import load_gguf_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France",
    "a",
    "def add(a, b):\n    return a + b  # sums two numbers, as every tutorial's first function does",
    "Die Katze sitzt auf der Matte.",
]
ENGINE = dict(dtype="float32", max_model_len=256, max_num_seqs=8, seed=0)


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf_path):
    return load_gguf_tokenizer(smollm2_gguf_path)


def _ids(folder: str, text: str) -> list[int]:
    """The prompt as HF tokenizes it with the folder's own tokenizer (the saved copy of the
    GGUF-built one splits some whitespace runs differently)."""
    return list(AutoTokenizer.from_pretrained(folder)(text)["input_ids"])


@pytest.mark.parametrize("arch", sorted(SEQUENCE_CLASSIFIERS))
def test_sequence_classifier_probabilities_match_hf(arch, tokenizer, tmp_path):
    folder = save_sequence_classifier(arch, str(tmp_path), tokenizer, num_labels=3)
    llm = LLM(model=folder, **ENGINE)
    assert llm.llm_engine.model_config.runner_type == "pooling"
    assert llm.supported_tasks == ("classify", "token_classify")
    outputs = llm.classify(TEXTS, use_tqdm=False)
    for text, out in zip(TEXTS, outputs):
        expected = torch.softmax(hf_sequence_logits(folder, _ids(folder, text)), -1).numpy()
        assert out.outputs.num_classes == 3
        np.testing.assert_allclose(out.outputs.probs, expected, atol=1e-4)


def test_cross_encoder_scores_match_hf_sigmoid(tokenizer, tmp_path):
    folder = save_sequence_classifier("Qwen2ForSequenceClassification", str(tmp_path), tokenizer, num_labels=1)
    llm = LLM(model=folder, **ENGINE)
    query, documents = "What is the capital of France?", TEXTS
    scores = llm.score(query, documents, use_tqdm=False)
    assert len(scores) == len(documents)
    for doc, out in zip(documents, scores):
        ids = list(AutoTokenizer.from_pretrained(folder)(query, text_pair=doc)["input_ids"])
        expected = torch.sigmoid(hf_sequence_logits(folder, ids))[0].item()
        assert out.outputs.score == pytest.approx(expected, abs=1e-4)
    # Without an activation the score is the raw logit.
    from jllm import PoolingParams

    raw = llm.score(query, documents[:1], pooling_params=PoolingParams(use_activation=False), use_tqdm=False)
    ids = list(AutoTokenizer.from_pretrained(folder)(query, text_pair=documents[0])["input_ids"])
    assert raw[0].outputs.score == pytest.approx(hf_sequence_logits(folder, ids)[0].item(), abs=1e-4)


def test_reward_model_per_token_rewards_match_reference(tokenizer, tmp_path):
    folder = save_qwen2_reward_model(str(tmp_path), tokenizer)
    llm = LLM(model=folder, **ENGINE)
    assert llm.supported_tasks == ("token_classify",)
    outputs = llm.reward(TEXTS, use_tqdm=False)
    for text, out in zip(TEXTS, outputs):
        expected = hf_rewards(folder, _ids(folder, text)).numpy()
        assert out.outputs.data.shape == expected.shape
        np.testing.assert_allclose(out.outputs.data, expected, atol=1e-4)


def test_base_model_last_token_embeddings_match_hf(tokenizer, tmp_path):
    folder = save_qwen3_base_model(str(tmp_path), tokenizer)
    llm = LLM(model=folder, **ENGINE)
    outputs = llm.embed(TEXTS, use_tqdm=False)
    for text, out in zip(TEXTS, outputs):
        last = hf_last_hidden(folder, _ids(folder, text))[-1].numpy()
        expected = last / np.linalg.norm(last)
        got = np.asarray(out.outputs.embedding)
        assert 1 - got @ expected < 1e-5
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_generative_model_converted_to_embed_and_classify(tokenizer, tiny_llama_path, tmp_path):
    """--convert embed: last-token pooling of the causal LM's hidden states; --convert
    classify reads a `score` head from the checkpoint (a *ForSequenceClassification
    saved under a *ForCausalLM architecture name)."""
    llm = LLM(model=tiny_llama_path, runner="pooling", convert="embed", **ENGINE)
    for text, out in zip(TEXTS, llm.embed(TEXTS, use_tqdm=False)):
        last = hf_last_hidden(tiny_llama_path, _ids(tiny_llama_path, text))[-1].numpy()
        np.testing.assert_allclose(out.outputs.embedding, last / np.linalg.norm(last), atol=1e-5)
    del llm
    folder = save_sequence_classifier("LlamaForSequenceClassification", str(tmp_path), tokenizer, num_labels=2)
    llm = LLM(model=folder, hf_overrides={"architectures": ["LlamaForCausalLM"]}, convert="classify", **ENGINE)
    assert llm.llm_engine.model_config.convert_type == "classify"
    for text, out in zip(TEXTS, llm.classify(TEXTS, use_tqdm=False)):
        expected = torch.softmax(hf_sequence_logits(folder, _ids(folder, text)), -1).numpy()
        np.testing.assert_allclose(out.outputs.probs, expected, atol=1e-4)
