"""OPT, GPT-2, BERT / XLM-RoBERTa and the Llama family's pooling models split over two
devices (tensor_parallel_size=2, the virtual CPU devices of tests/conftest.py), in
float32: the same greedy tokens as HF transformers, and pooled outputs equal to
transformers' and sentence-transformers' on the same random weights, and to one device.

Every tiny model has 4 heads and an ffn size that split in two, and a vocabulary that
does (OPT / GPT-2's 400 tokens, the encoders' tables padded to an even size, SmolLM2's
49152), so its embedding (and LM head) is vocabulary-parallel.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from hf_encoder_models import load_hf_encoder, make_sentence_transformers_folder, save_tiny_encoder
from hf_opt_gpt2_models import MAX_TOKENS, NUM_LOGPROBS, PROMPTS, assert_equal_to_hf, prompt_ids, save_tiny_models
from jllm import LLM, SamplingParams
from jllm.config import ParallelConfig
from jllm.distributed.mesh import TP_AXIS, make_mesh
from jllm.models.loader.gguf_loader import load_gguf_tokenizer
from jllm.models.model_loader import param_shapes
from jllm.models.registry import resolve_architecture
from pooling_models import (
    hf_last_hidden,
    hf_rewards,
    hf_sequence_logits,
    save_qwen2_reward_model,
    save_qwen3_base_model,
    save_sequence_classifier,
)
from tiny_model import ENGINE_ARGS

ENGINE = dict(ENGINE_ARGS, dtype="float32")
# A pooling prompt runs whole, in one step of at most 64 tokens (and the sentence-
# transformers folder's max_seq_length is 128).
POOLING_ENGINE = dict(ENGINE, max_model_len=64)
# opt-350m's layout (post-LN, project_in/out, biases, tied head) and GPT-2 with an untied
# head, exact gelu and n_inner 96.
GENERATORS = ["opt-post-ln-project", "gpt2-inverse-layer-scale-untied"]
# The encoders' tokenizers have 169 and 221 tokens; their tables are padded to split in two.
ENCODER_VOCAB_SIZE = 224
TEXTS = [
    "what is the capital of france?",
    "a",
    "How to model the weather in 2024: 12 tips & tricks!",
    "the " * 40 + "end",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, smollm2_gguf_path) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tp-families")
    out = save_tiny_models(str(root), GENERATORS)
    bert = save_tiny_encoder("BertModel", str(root / "bert"), vocab_size=ENCODER_VOCAB_SIZE)
    out["bert"] = make_sentence_transformers_folder(bert, "MEAN", normalize=True)
    for arch in ("XLMRobertaModel", "BertForSequenceClassification"):
        out[arch] = save_tiny_encoder(arch, str(root / arch), num_labels=3, seed=1, vocab_size=ENCODER_VOCAB_SIZE)
    tokenizer = load_gguf_tokenizer(smollm2_gguf_path)
    out["qwen3-embedding"] = save_qwen3_base_model(str(root / "qwen3"), tokenizer)
    out["qwen2-classifier"] = save_sequence_classifier(
        "Qwen2ForSequenceClassification", str(root / "qwen2"), tokenizer, num_labels=3
    )
    out["qwen2-reward"] = save_qwen2_reward_model(str(root / "qwen2-reward"), tokenizer)
    return out


def split_axes(folder: str) -> dict[str, int | None]:
    """Each parameter ("layers_0/fc1") -> the axis it is split along over a 2-device mesh, or None (whole)."""
    config = AutoConfig.from_pretrained(folder)
    _, family, head = resolve_architecture(config)
    spec = family.build_spec(config, head)
    model = family.module(spec, jnp.float32, mesh=make_mesh(ParallelConfig(tensor_parallel_size=2)))
    _, specs = param_shapes(model, spec, family.constants(spec, config, 64))
    axes = {}

    def visit(prefix: str, tree):
        for name, value in tree.items():
            if isinstance(value, dict):
                visit(f"{prefix}{name}/", value)
            else:
                axes[prefix + name] = tuple(value).index(TP_AXIS) if TP_AXIS in tuple(value) else None

    visit("", specs["params"])
    return axes


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "opt-post-ln-project",
            {
                "layers_0/self_attn/q_proj": 1,
                "layers_0/self_attn/v_bias": 0,
                "layers_0/self_attn/out_proj": 0,
                "layers_0/self_attn/out_bias": None,
                "layers_0/fc1": 1,
                "layers_0/fc1_bias": 0,
                "layers_0/fc2": 0,
                "layers_0/fc2_bias": None,
                "layers_0/final_layer_norm/weight": None,
                "embed_tokens": 0,
                "embed_positions": None,
                "project_in": None,
            },
        ),
        (
            "gpt2-inverse-layer-scale-untied",
            {
                "h_0/attn/c_attn": 2,
                "h_0/attn/c_attn_bias": 1,
                "h_0/attn/c_proj": 0,
                "h_0/attn/c_proj_bias": None,
                "h_0/mlp/c_fc": 1,
                "h_0/mlp/c_proj": 0,
                "h_0/ln_1/bias": None,
                "wte": 0,
                "wpe": None,
                "lm_head": 1,
            },
        ),
        (
            "BertForSequenceClassification",
            {
                "embeddings/word_embeddings": 0,
                "embeddings/position_embeddings": None,
                "embeddings/token_type_embeddings": None,
                "layers_0/attention/key": 1,
                "layers_0/attention/key_bias": 0,
                "layers_0/attention/dense": 0,
                "layers_0/attention/dense_bias": None,
                "layers_0/intermediate": 1,
                "layers_0/output": 0,
                "layers_0/output_LayerNorm/weight": None,
                "head_dense": None,
                "classifier": None,
            },
        ),
    ],
)
def test_heads_ffn_and_vocabulary_split_while_norms_positions_and_classifiers_stay_whole(folders, name, expected):
    axes = split_axes(folders[name])
    assert {path: axes[path] for path in expected} == expected


def generate(folder: str, tensor_parallel_size: int):
    llm = LLM(model=folder, tensor_parallel_size=tensor_parallel_size, **ENGINE)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=NUM_LOGPROBS)
    prompts = [{"prompt_token_ids": ids} for ids in prompt_ids(folder, PROMPTS[:3])]
    return llm.generate(prompts, params, use_tqdm=False)


@pytest.mark.parametrize("name", GENERATORS)
def test_opt_and_gpt2_at_tp_2_equal_hf_greedy_and_tp_1_logprobs(folders, name):
    """Three prompts of 5 to ~80 tokens in 64-token steps: the longest is prefilled in
    chunks beside the others' decodes."""
    folder = folders[name]
    tp1, tp2 = generate(folder, 1), generate(folder, 2)
    assert_equal_to_hf(folder, tp2, with_logprobs=True)
    for one, two in zip(tp1, tp2):
        assert list(two.outputs[0].token_ids) == list(one.outputs[0].token_ids)
        for want, got in zip(one.outputs[0].logprobs, two.outputs[0].logprobs):
            assert set(got) == set(want)
            for token_id, lp in got.items():
                assert abs(lp.logprob - want[token_id].logprob) <= 1e-4


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def embed(folder: str, tensor_parallel_size: int, inputs, **kwargs) -> list[np.ndarray]:
    llm = LLM(folder, tensor_parallel_size=tensor_parallel_size, **POOLING_ENGINE, **kwargs)
    return [np.asarray(out.outputs.embedding) for out in llm.embed(inputs, use_tqdm=False)]


def test_bert_embeddings_at_tp_2_equal_sentence_transformers_and_tp_1(folders):
    """MEAN pooling and Normalize, read from the sentence-transformers folder."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    folder = folders["bert"]
    expected = sentence_transformers.SentenceTransformer(folder, device="cpu").encode(TEXTS)
    tp2, tp1 = embed(folder, 2, TEXTS), embed(folder, 1, TEXTS)
    for text, got, one, reference in zip(TEXTS, tp2, tp1, expected):
        assert cosine(got, reference) > 1 - 1e-5, text
        np.testing.assert_allclose(got, reference, atol=1e-5, err_msg=text)
        np.testing.assert_allclose(got, one, atol=1e-5, err_msg=text)


def test_xlm_roberta_cls_embeddings_at_tp_2_equal_hf(folders):
    """CLS pooling of XLM-R (positions counted past its padding index), unnormalized."""
    folder = folders["XLMRobertaModel"]
    encodings = [AutoTokenizer.from_pretrained(folder)(text) for text in TEXTS]
    got = embed(
        folder,
        2,
        [{"prompt_token_ids": e["input_ids"]} for e in encodings],
        pooler_config={"pooling_type": "CLS", "normalize": False},
    )
    model = load_hf_encoder(folder)
    for text, embedding, encoding in zip(TEXTS, got, encodings):
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([encoding["input_ids"]])).last_hidden_state[0].numpy()
        np.testing.assert_allclose(embedding, hidden[0], atol=1e-5, err_msg=text)


def test_bert_classifier_at_tp_2_equals_hf_softmax(folders):
    folder = folders["BertForSequenceClassification"]
    llm = LLM(folder, tensor_parallel_size=2, **POOLING_ENGINE)
    model = load_hf_encoder(folder)
    tokenizer = llm.get_tokenizer()
    for text, out in zip(TEXTS, llm.classify(TEXTS, use_tqdm=False)):
        with torch.no_grad():
            logits = model(**{k: torch.tensor([v]) for k, v in tokenizer(text).items()}).logits[0]
        np.testing.assert_allclose(out.outputs.probs, torch.softmax(logits, -1).numpy(), atol=1e-5, err_msg=text)


def llama_family_ids(folder: str) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return [list(tokenizer(text)["input_ids"]) for text in TEXTS]


def test_qwen3_last_token_embeddings_at_tp_2_equal_hf(folders):
    """Qwen3-Embedding's layout: a base model, LAST pooling, normalized; kv heads split too."""
    folder = folders["qwen3-embedding"]
    ids = llama_family_ids(folder)
    got = embed(folder, 2, [{"prompt_token_ids": i} for i in ids])
    for embedding, prompt in zip(got, ids):
        last = hf_last_hidden(folder, prompt)[-1].numpy()
        expected = last / np.linalg.norm(last)
        assert cosine(embedding, expected) > 1 - 1e-5
        np.testing.assert_allclose(embedding, expected, atol=1e-5)


def test_qwen2_sequence_classifier_at_tp_2_equals_hf_softmax(folders):
    folder = folders["qwen2-classifier"]
    ids = llama_family_ids(folder)
    llm = LLM(folder, tensor_parallel_size=2, **POOLING_ENGINE)
    outputs = llm.classify([{"prompt_token_ids": i} for i in ids], use_tqdm=False)
    for out, prompt in zip(outputs, ids):
        expected = torch.softmax(hf_sequence_logits(folder, prompt), -1).numpy()
        np.testing.assert_allclose(out.outputs.probs, expected, atol=1e-5)


def test_qwen2_reward_model_per_token_rewards_at_tp_2_equal_reference(folders):
    """Every token's output ("ALL" pooling) through the two-layer score head."""
    folder = folders["qwen2-reward"]
    ids = llama_family_ids(folder)
    llm = LLM(folder, tensor_parallel_size=2, **POOLING_ENGINE)
    for out, prompt in zip(llm.reward([{"prompt_token_ids": i} for i in ids], use_tqdm=False), ids):
        np.testing.assert_allclose(out.outputs.data, hf_rewards(folder, prompt).numpy(), atol=1e-5)


def test_all_minilm_l6_v2_at_tp_4_equals_sentence_transformers():
    """The real model: 12 heads and ffn 1536 split in four, its 30522-token vocabulary
    does not (the word embeddings stay whole)."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    from jllm.models.loader.default_model import get_default_embedding_model_path

    folder = get_default_embedding_model_path()
    texts = TEXTS + ["Paris is the capital and most populous city of France.", "Je pense, donc je suis."]
    got = embed(folder, 4, texts)
    expected = sentence_transformers.SentenceTransformer(folder, device="cpu").encode(texts)
    for text, embedding, reference in zip(texts, got, expected):
        assert cosine(embedding, reference) > 1 - 1e-5, text
        np.testing.assert_allclose(embedding, reference, atol=1e-5, err_msg=text)
