"""Tiny random-weight Llama-family pooling models saved as HF folders (not a test module):
`*ForSequenceClassification`, Qwen2ForRewardModel (a Qwen2 body with Qwen2.5-Math-RM's
two-layer `score` head, which transformers does not ship, so its reference is computed
here in torch), and base models saved on their own (`Qwen3Model`, as Qwen3-Embedding is),
with the SmolLM2 tokenizer and the torch references the parity tests compare against."""

from __future__ import annotations

import json
import os

import torch
from hf_models import _TINY_DIMS, randomize_weights
from safetensors.torch import save_file
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    Qwen2Config,
    Qwen2ForSequenceClassification,
    Qwen2Model,
    Qwen3Config,
    Qwen3ForSequenceClassification,
    Qwen3Model,
)

_SMALL = {**_TINY_DIMS, "num_hidden_layers": 2}
SEQUENCE_CLASSIFIERS = {
    "LlamaForSequenceClassification": (LlamaConfig, LlamaForSequenceClassification, {}),
    "Qwen2ForSequenceClassification": (Qwen2Config, Qwen2ForSequenceClassification, {"use_sliding_window": False}),
    "Qwen3ForSequenceClassification": (
        Qwen3Config,
        Qwen3ForSequenceClassification,
        {"head_dim": 32, "use_sliding_window": False},
    ),
}


def _save(model, folder: str, tokenizer, seed: int) -> str:
    randomize_weights(model, seed)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_sequence_classifier(arch: str, folder: str, tokenizer, num_labels: int, seed: int = 0) -> str:
    config_cls, model_cls, extra = SEQUENCE_CLASSIFIERS[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**_SMALL, **extra, num_labels=num_labels)).to(torch.float32)
    return _save(model, folder, tokenizer, seed)


def save_qwen3_base_model(folder: str, tokenizer, seed: int = 0) -> str:
    """A Qwen3Model saved on its own: tensor names without the `model.` prefix."""
    torch.manual_seed(seed)
    model = Qwen3Model(Qwen3Config(**_SMALL, head_dim=32, use_sliding_window=False)).to(torch.float32)
    return _save(model, folder, tokenizer, seed)


def save_qwen2_reward_model(folder: str, tokenizer, seed: int = 0) -> str:
    """Qwen2ForRewardModel's checkpoint layout: `model.*` and `score.0` / `score.2` (Linear, ReLU, Linear)."""
    torch.manual_seed(seed)
    config = Qwen2Config(**_SMALL, use_sliding_window=False, num_labels=1)
    body = Qwen2Model(config).to(torch.float32)
    randomize_weights(body, seed)
    D = config.hidden_size
    score = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.ReLU(), torch.nn.Linear(D, 1))
    randomize_weights(score, seed + 1)
    tensors = {f"model.{k}": v.contiguous() for k, v in body.state_dict().items()}
    tensors.update({f"score.{k}": v.contiguous() for k, v in score.state_dict().items()})
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    config.architectures = ["Qwen2ForRewardModel"]
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["architectures"] == ["Qwen2ForRewardModel"]
    return folder


@torch.no_grad()
def hf_sequence_logits(folder: str, token_ids: list[int]) -> torch.Tensor:
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    return model(torch.tensor([token_ids])).logits[0]


@torch.no_grad()
def hf_last_hidden(folder: str, token_ids: list[int]) -> torch.Tensor:
    """The base model's final hidden states [tokens, D]."""
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    return model(torch.tensor([token_ids])).last_hidden_state[0]


@torch.no_grad()
def hf_rewards(folder: str, token_ids: list[int]) -> torch.Tensor:
    """Qwen2ForRewardModel's per-token rewards [tokens, 1]: the Qwen2 body through the score MLP."""
    from safetensors.torch import load_file

    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    hidden = model(torch.tensor([token_ids])).last_hidden_state[0]
    weights = load_file(os.path.join(folder, "model.safetensors"))
    h = torch.relu(hidden @ weights["score.0.weight"].T + weights["score.0.bias"])
    return h @ weights["score.2.weight"].T + weights["score.2.bias"]
