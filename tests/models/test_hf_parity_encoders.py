"""jllm's BERT and XLM-RoBERTa encoders against HF transformers and sentence-transformers.

The references are transformers' own models (float32) on the same weights: tiny random-
weight BertModel, XLMRobertaModel and their *ForSequenceClassification, built and saved by
tests/hf_encoder_models.py, each text run alone (no padding) and its last_hidden_state
pooled as vLLM pools it; and sentence-transformers' `encode` on a sentence-transformers
folder (a tiny one, and the real all-MiniLM-L6-v2).
"""

import numpy as np
import pytest
import torch

from hf_encoder_models import load_hf_encoder, make_sentence_transformers_folder, save_tiny_encoder
from jllm import LLM

BASE_MODELS = ["BertModel", "XLMRobertaModel"]
CLASSIFIERS = ["BertForSequenceClassification", "XLMRobertaForSequenceClassification"]
# No warm-up compile: each test runs a few step shapes once.
ENGINE_ARGS = dict(dtype="float32", enforce_eager=True)

TEXTS = [
    "what is the capital of france?",
    "paris is the capital of france.",
    "a",
    "How to model the weather in 2024: 12 tips & tricks!",
    "café, naïve, über, señor",
    "x = [i ** 2 for i in range(10)]  # squares",
    "the " * 60 + "end",
]
QUERY = "what is the capital of france?"
DOCUMENTS = ["paris is the capital of france.", "the model is 42 layers deep", "How to bake bread"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    """architecture (and ":1" for a one-label classifier) -> a saved tiny HF folder."""
    root = tmp_path_factory.mktemp("encoders")
    out = {arch: save_tiny_encoder(arch, str(root / arch)) for arch in BASE_MODELS}
    for arch in CLASSIFIERS:
        out[arch] = save_tiny_encoder(arch, str(root / arch), num_labels=3, seed=1)
        out[arch + ":1"] = save_tiny_encoder(arch, str(root / (arch + "-1")), num_labels=1, seed=2)
    return out


def hf_outputs(folder: str, encodings: list[dict]) -> list[np.ndarray]:
    """The HF model's output for each encoding, run alone: last_hidden_state [tokens, D]
    for a base model, the logits [labels] for a classifier."""
    model = load_hf_encoder(folder)
    outs = []
    with torch.no_grad():
        for encoding in encodings:
            out = model(**{k: torch.tensor([v]) for k, v in encoding.items()})
            outs.append((out.logits if hasattr(out, "logits") else out.last_hidden_state)[0].numpy())
    return outs


def pooled(hidden: np.ndarray, pooling_type: str, normalize: bool) -> np.ndarray:
    vector = hidden[0] if pooling_type == "CLS" else hidden.mean(axis=0)
    return vector / np.linalg.norm(vector) if normalize else vector


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("pooling_type", ["CLS", "MEAN"])
@pytest.mark.parametrize("arch", BASE_MODELS)
def test_embeddings_match_hf_pooled_last_hidden_state(folders, arch, pooling_type, normalize):
    llm = LLM(folders[arch], pooler_config={"pooling_type": pooling_type, "normalize": normalize}, **ENGINE_ARGS)
    got = [out.outputs.embedding for out in llm.embed(TEXTS, use_tqdm=False)]
    tokenizer = llm.get_tokenizer()
    hidden = hf_outputs(folders[arch], [tokenizer(text) for text in TEXTS])
    for text, embedding, h in zip(TEXTS, got, hidden):
        expected = pooled(h, pooling_type, normalize)
        assert cosine(embedding, expected) >= 1 - 1e-5, text
        np.testing.assert_allclose(embedding, expected, atol=1e-5, rtol=1e-5, err_msg=text)


@pytest.mark.parametrize("arch", CLASSIFIERS)
def test_classifier_probs_are_softmax_of_hf_logits(folders, arch):
    llm = LLM(folders[arch], **ENGINE_ARGS)
    got = [out.outputs.probs for out in llm.classify(TEXTS, use_tqdm=False)]
    tokenizer = llm.get_tokenizer()
    logits = hf_outputs(folders[arch], [tokenizer(text) for text in TEXTS])
    for text, probs, row in zip(TEXTS, got, logits):
        expected = torch.softmax(torch.from_numpy(row), dim=-1).numpy()
        assert len(probs) == 3
        np.testing.assert_allclose(probs, expected, atol=1e-4, err_msg=text)


@pytest.mark.parametrize("arch", CLASSIFIERS)
def test_cross_encoder_score_is_sigmoid_of_hf_logit_on_the_pair(folders, arch):
    """The pair goes in as the tokenizer encodes it: BERT's [CLS] a [SEP] b [SEP] with
    token types 0 then 1; XLM-R's <s> a </s></s> b </s> without token types."""
    folder = folders[arch + ":1"]
    llm = LLM(folder, **ENGINE_ARGS)
    got = [out.outputs.score for out in llm.score(QUERY, DOCUMENTS, use_tqdm=False)]
    tokenizer = llm.get_tokenizer()
    pairs = [tokenizer(QUERY, text_pair=doc) for doc in DOCUMENTS]
    assert ("token_type_ids" in pairs[0]) == arch.startswith("Bert")
    logits = hf_outputs(folder, pairs)
    for doc, score, row in zip(DOCUMENTS, got, logits):
        assert score == pytest.approx(float(torch.sigmoid(torch.from_numpy(row))[0]), abs=1e-4), doc


def test_bert_cross_encoder_reads_the_pair_token_types(folders):
    """The same pair scored with all-zero token types gives another score: the type
    embeddings of the second segment reach the model."""
    folder = folders["BertForSequenceClassification:1"]
    llm = LLM(folder, **ENGINE_ARGS)
    pair = llm.get_tokenizer()(QUERY, text_pair=DOCUMENTS[0])
    ids = list(pair["input_ids"])
    typed, untyped = llm.classify(
        [{"prompt_token_ids": ids, "token_type_ids": list(pair["token_type_ids"])}, {"prompt_token_ids": ids}],
        use_tqdm=False,
    )
    (logit_typed,), (logit_untyped,) = hf_outputs(folder, [pair, {"input_ids": ids, "token_type_ids": [0] * len(ids)}])
    assert typed.outputs.probs[0] == pytest.approx(float(torch.sigmoid(torch.tensor(logit_typed))), abs=1e-4)
    assert untyped.outputs.probs[0] == pytest.approx(float(torch.sigmoid(torch.tensor(logit_untyped))), abs=1e-4)
    assert abs(typed.outputs.probs[0] - untyped.outputs.probs[0]) > 1e-3


def test_xlm_roberta_positions_skip_padding_tokens_as_hf(folders):
    """HF numbers XLM-R's positions from padding_idx + 1 and counts only non-padding
    tokens; a padding id inside a prompt sits at padding_idx and does not advance them."""
    folder = folders["XLMRobertaModel"]
    llm = LLM(folder, pooler_config={"pooling_type": "MEAN", "normalize": False}, **ENGINE_ARGS)
    pad = llm.get_tokenizer().pad_token_id
    ids = [0, 20, pad, 30, pad, pad, 40, 2]
    (out,) = llm.embed([{"prompt_token_ids": ids}], use_tqdm=False)
    (hidden,) = hf_outputs(folder, [{"input_ids": ids, "attention_mask": [1] * len(ids)}])
    np.testing.assert_allclose(out.outputs.embedding, hidden.mean(axis=0), atol=1e-5)


def test_xlm_roberta_max_model_len_is_its_positions_past_padding_idx(folders):
    llm = LLM(folders["XLMRobertaModel"], **ENGINE_ARGS)
    assert llm.llm_engine.model_config.max_model_len == 514 - 1 - 1


@pytest.mark.parametrize("arch", BASE_MODELS)
def test_embedding_is_the_same_alone_and_in_a_batch_of_32(folders, arch):
    rng = np.random.default_rng(0)
    words = "the capital of france is paris and model what how to".split()
    texts = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(1, 120, size=32)]
    llm = LLM(folders[arch], pooler_config={"pooling_type": "MEAN"}, **ENGINE_ARGS)
    batch = [out.outputs.embedding for out in llm.embed(texts, use_tqdm=False)]
    for i in (0, 7, 31):
        (alone,) = llm.embed([texts[i]], use_tqdm=False)
        np.testing.assert_allclose(alone.outputs.embedding, batch[i], atol=1e-6, rtol=0)


@pytest.mark.parametrize(("arch", "pooling_type"), [("BertModel", "MEAN"), ("XLMRobertaModel", "CLS")])
def test_sentence_transformers_folder_embeds_as_sentence_transformers(tmp_path, arch, pooling_type):
    """The folder's Pooling and Normalize modules pick jllm's pooling; no pooler_config given."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    folder = make_sentence_transformers_folder(save_tiny_encoder(arch, str(tmp_path)), pooling_type, normalize=True)
    llm = LLM(folder, **ENGINE_ARGS)
    got = [out.outputs.embedding for out in llm.embed(TEXTS, use_tqdm=False)]
    expected = sentence_transformers.SentenceTransformer(folder, device="cpu").encode(TEXTS)
    for text, embedding, reference in zip(TEXTS, got, expected):
        np.testing.assert_allclose(embedding, reference, atol=1e-5, err_msg=text)


MINILM_TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "A man is eating food.",
    "A man is riding a horse.",
    "Machine learning models turn text into vectors.",
    "I love programming in Python.",
    "Das Wetter ist heute sehr schön.",
    "Ich habe keine Zeit, morgen komme ich wieder.",
    "Où se trouve la gare la plus proche ?",
    "Je pense, donc je suis.",
    "今天天气很好，我们去公园散步吧。",
    "机器学习是人工智能的一个分支。",
    "東京は日本の首都です。",
    "吾輩は猫である。名前はまだ無い。",
    "Москва — столица России.",
    "Я люблю читать книги по вечерам.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "SELECT name, COUNT(*) FROM users GROUP BY name HAVING COUNT(*) > 1;",
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    "🚀🔥 launch day! 🎉🎉",
    "I ❤️ NY 🗽",
    "a",
    "?",
    "ok",
    "   spaces   around   ",
    "UPPER CASE AND lower case",
    "E = mc^2 and ∑ᵢ xᵢ² ≥ 0",
    "¿Dónde está la biblioteca? Está al lado del banco.",
    " ".join(["Embeddings truncate at the model's max_seq_length of 256 tokens."] * 40),
]


@pytest.fixture(scope="module")
def minilm_path() -> str:
    from jllm.models.loader.default_model import get_default_embedding_model_path

    return get_default_embedding_model_path()


def test_all_minilm_l6_v2_matches_sentence_transformers(minilm_path):
    """The real model (BertModel, MEAN pooling, Normalize, max_seq_length 256): the long
    text is cut by the tokenizer to 256 tokens, [CLS] ... [SEP] kept, as sentence-
    transformers cuts it; jllm does so where truncate_prompt_tokens asks for it."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    llm = LLM(minilm_path, **ENGINE_ARGS)
    assert llm.llm_engine.model_config.max_model_len == 256
    assert len(llm.get_tokenizer()(MINILM_TEXTS[-1])["input_ids"]) > 256
    got = [out.outputs.embedding for out in llm.embed(MINILM_TEXTS, truncate_prompt_tokens=-1, use_tqdm=False)]
    expected = sentence_transformers.SentenceTransformer(minilm_path, device="cpu").encode(MINILM_TEXTS)
    for text, embedding, reference in zip(MINILM_TEXTS, got, expected):
        assert cosine(embedding, reference) >= 0.9999, text
