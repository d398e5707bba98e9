"""A pooling request's raw model output (float32, from the runner) turned into what it
asked for: Matryoshka truncation and L2 normalization of embeddings, the activation on
classifier outputs (vLLM's pooler post-processing, on the host)."""

from __future__ import annotations

import numpy as np

from jllm.pooling_params import PoolingParams

# torch.nn.functional.normalize's floor on the norm.
_NORM_EPS = 1e-12
# sentence-transformers' names for a cross-encoder's activation (config.json's
# "sentence_transformers": {"activation_fn": ...}).
_SBERT_ACTIVATIONS = {
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.modules.activation.Tanh": "tanh",
}


def classifier_activation(hf_config, num_labels: int, task: str) -> str:
    """What use_activation applies, as vLLM resolves it: a cross-encoder's sentence-
    transformers activation, else the config's problem_type (transformers' loss), else
    sigmoid for one label and softmax for several."""
    if task == "score":
        sbert = getattr(hf_config, "sentence_transformers", None) or {}
        name = sbert.get("activation_fn") if isinstance(sbert, dict) else None
        if name is not None:
            if name not in _SBERT_ACTIVATIONS:
                raise ValueError(f"Unsupported sentence-transformers activation_fn {name!r}.")
            return _SBERT_ACTIVATIONS[name]
    problem_type = getattr(hf_config, "problem_type", None)
    if problem_type == "regression":
        return "identity"
    if problem_type == "multi_label_classification":
        return "sigmoid"
    return "sigmoid" if num_labels < 2 else "softmax"


def postprocess(data: np.ndarray, params: PoolingParams, activation: str) -> np.ndarray:
    """data: [dims] or [tokens, dims] float32."""
    if params.task in ("embed", "token_embed"):
        if params.dimensions is not None:
            data = data[..., : params.dimensions]
        if params.normalize:
            norm = np.linalg.norm(data, axis=-1, keepdims=True)
            data = data / np.maximum(norm, _NORM_EPS)
        return data.astype(np.float32)
    if not params.use_activation or activation == "identity":
        return data
    if activation == "sigmoid":
        return (1.0 / (1.0 + np.exp(-data))).astype(np.float32)
    if activation == "tanh":
        return np.tanh(data)
    shifted = np.exp(data - data.max(axis=-1, keepdims=True))
    return (shifted / shifted.sum(axis=-1, keepdims=True)).astype(np.float32)
