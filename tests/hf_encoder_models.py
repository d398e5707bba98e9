"""The HF-transformers side of the encoder parity tests (not a test module).

Tiny random-weight BERT and XLM-RoBERTa models (base and sequence-classification), saved
as HF folders with a tokenizer built here from a small vocabulary: WordPiece for BERT,
Unigram (SentencePiece-style) for XLM-R; optionally as a sentence-transformers folder.
"""

from __future__ import annotations

import json
import os
import string

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    BertTokenizer,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
    XLMRobertaModel,
    XLMRobertaTokenizer,
)

# Enough characters that every test text tokenizes into pieces; the rest is [UNK].
_CHARS = string.ascii_lowercase + string.digits + string.punctuation + "éèàüößçñ"
_WORDS = ["the", "is", "of", "and", "to", "in", "what", "how", "capital", "france", "paris", "model"]

# Small enough to build and run in a second, with the real models' layout: 4 heads, 2 layers.
_TINY_DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)

ARCHITECTURES = {
    "BertModel": BertModel,
    "BertForSequenceClassification": BertForSequenceClassification,
    "XLMRobertaModel": XLMRobertaModel,
    "XLMRobertaForSequenceClassification": XLMRobertaForSequenceClassification,
}


def bert_tokenizer() -> BertTokenizer:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = specials + list(_CHARS) + ["##" + c for c in _CHARS] + _WORDS
    return BertTokenizer(vocab={piece: i for i, piece in enumerate(pieces)})


def xlm_roberta_tokenizer() -> XLMRobertaTokenizer:
    # fairseq's order: <s> 0, <pad> 1, </s> 2, <unk> 3 ... <mask> last.
    chars = _CHARS + string.ascii_uppercase
    pieces = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -3.0) for w in _WORDS] + [("▁" + c, -8.0) for c in chars] + [(c, -9.0) for c in chars]
    return XLMRobertaTokenizer(vocab=pieces + [("<mask>", 0.0)])


def _config(architecture: str, vocab_size: int):
    if architecture.startswith("Bert"):
        return BertConfig(vocab_size=vocab_size, max_position_embeddings=512, type_vocab_size=2, **_TINY_DIMS)
    return XLMRobertaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=514,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        **_TINY_DIMS,
    )


def randomize_weights(model: torch.nn.Module, seed: int, std: float = 0.15) -> None:
    """Every parameter (biases included) ~ N(0, std); LayerNorm scales ~ N(1, 0.2): HF's
    init (zero biases, unit norms) would leave those untested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            param.copy_(1.0 + 0.2 * noise if name.endswith("LayerNorm.weight") else std * noise)


def save_tiny_encoder(
    architecture: str, folder: str, num_labels: int = 2, seed: int = 0, vocab_size: int | None = None
) -> str:
    """Builds `architecture` with random weights and saves it (float32 safetensors, config,
    tokenizer) into `folder`; returns the folder. `vocab_size` widens the embedding table
    past the tokenizer's, as checkpoints pad theirs (to split it evenly over devices)."""
    tokenizer = bert_tokenizer() if architecture.startswith("Bert") else xlm_roberta_tokenizer()
    config = _config(architecture, vocab_size or len(tokenizer))
    config.num_labels = num_labels
    config.architectures = [architecture]
    torch.manual_seed(seed)
    model = ARCHITECTURES[architecture](config).to(torch.float32).eval()
    randomize_weights(model, seed)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_sentence_transformers_folder(folder: str, pooling: str, normalize: bool) -> str:
    """Adds sentence-transformers' modules (Transformer -> Pooling [-> Normalize]) to a
    saved base model, as `SentenceTransformer.save` writes them."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    hidden = json.load(open(os.path.join(folder, "config.json")))["hidden_size"]
    pooling_config = {
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": pooling == "CLS",
        "pooling_mode_mean_tokens": pooling == "MEAN",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    os.makedirs(os.path.join(folder, "1_Pooling"), exist_ok=True)
    json.dump(modules, open(os.path.join(folder, "modules.json"), "w"))
    json.dump(pooling_config, open(os.path.join(folder, "1_Pooling", "config.json"), "w"))
    json.dump(
        {"max_seq_length": 128, "do_lower_case": False}, open(os.path.join(folder, "sentence_bert_config.json"), "w")
    )
    return folder


def load_hf_encoder(folder: str):
    config = json.load(open(os.path.join(folder, "config.json")))
    model = ARCHITECTURES[config["architectures"][0]].from_pretrained(folder, dtype=torch.float32)
    return model.eval()
