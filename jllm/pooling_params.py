"""Pooling parameters for one request (vLLM's PoolingParams): what an embedding,
classification, score or reward request asks of the pooled output.

`verify(task, model_config)` fixes the task, takes the model's pooler defaults for what
the request leaves unset, and rejects parameters the task has no use for, with vLLM's
messages.
"""

from __future__ import annotations

import copy
from typing import Any

from jllm.sampling_params import RequestOutputKind

POOLING_TASKS = ("embed", "classify", "score", "token_embed", "token_classify")
_ALL_PARAMETERS = ("dimensions", "normalize", "use_activation")
_VALID_PARAMETERS = {
    "embed": ["dimensions", "normalize"],
    "token_embed": ["dimensions", "normalize"],
    "classify": ["use_activation"],
    "score": ["use_activation"],
    "token_classify": ["use_activation"],
}


class PoolingParams:
    """
    Args:
        truncate_prompt_tokens: keep only this many prompt tokens (-1: the model's limit),
            truncated as the tokenizer truncates.
        dimensions: Matryoshka models: keep the first `dimensions` of each embedding.
        normalize: L2-normalize embeddings (default: the model's pooler, else True).
        use_activation: softmax (sigmoid for one label) on classifier outputs (default
            True). `activation` and `softmax` are vLLM's older names for it.
        task: the pooling task; set by the LLM method or endpoint that runs the request.
    """

    def __init__(
        self,
        truncate_prompt_tokens: int | None = None,
        dimensions: int | None = None,
        normalize: bool | None = None,
        use_activation: bool | None = None,
        task: str | None = None,
        requires_token_ids: bool = False,
        extra_kwargs: dict[str, Any] | None = None,
        output_kind: RequestOutputKind = RequestOutputKind.FINAL_ONLY,
        *,
        activation: bool | None = None,
        softmax: bool | None = None,
    ) -> None:
        if truncate_prompt_tokens is not None and (truncate_prompt_tokens == 0 or truncate_prompt_tokens < -1):
            raise ValueError(f"truncate_prompt_tokens must be an integer >= 1 or -1, got {truncate_prompt_tokens}")
        if task is not None and task not in POOLING_TASKS:
            raise ValueError(f"Unknown pooling task: {task}")
        self.truncate_prompt_tokens = truncate_prompt_tokens
        self.dimensions = dimensions
        self.normalize = normalize
        self.use_activation = next((v for v in (use_activation, activation, softmax) if v is not None), None)
        self.task = task
        self.requires_token_ids = requires_token_ids
        self.extra_kwargs = extra_kwargs
        self.output_kind = output_kind

    @property
    def activation(self) -> bool | None:
        return self.use_activation

    @property
    def valid_parameters(self) -> list[str]:
        return _VALID_PARAMETERS[self.task]

    def clone(self) -> PoolingParams:
        # Every field is immutable but extra_kwargs: a shallow copy (cloned per request, so
        # deepcopy's cost would show at thousands of requests).
        clone = copy.copy(self)
        clone.extra_kwargs = copy.deepcopy(self.extra_kwargs)
        return clone

    def verify(self, task: str, model_config=None) -> None:
        """Fixes the task and fills what is unset from the model's pooler config, with
        vLLM's errors for a task this request was not made for, Matryoshka dimensions the
        model does not have, and parameters the task does not take."""
        if task not in POOLING_TASKS:
            raise ValueError(f"Unknown pooling task: {task}")
        if self.task is None:
            self.task = task
        elif self.task != task:
            raise ValueError(f"You cannot overwrite {self.task=!r} with {task=!r}!")
        pooler_config = getattr(model_config, "pooler_config", None)
        if pooler_config is not None:
            for name in _ALL_PARAMETERS:
                if getattr(self, name) is None and name in self.valid_parameters:
                    setattr(self, name, getattr(pooler_config, name, None))
        if self.task in ("embed", "token_embed"):
            if self.normalize is None:
                self.normalize = True
            if self.dimensions is not None and model_config is not None:
                self._verify_dimensions(model_config)
        elif self.use_activation is None:
            self.use_activation = True
        invalid = [k for k in _ALL_PARAMETERS if k not in self.valid_parameters and getattr(self, k) is not None]
        if invalid:
            raise ValueError(
                f"Task {self.task} only supports {self.valid_parameters} parameters, "
                f"does not support {invalid} parameters"
            )

    def _verify_dimensions(self, model_config) -> None:
        name = model_config.served_model_name or model_config.model
        if not model_config.is_matryoshka:
            raise ValueError(
                f'Model "{name}" does not support matryoshka representation, '
                "changing output dimensions will lead to poor results."
            )
        allowed = model_config.matryoshka_dimensions
        if allowed is not None:
            if self.dimensions not in allowed:
                raise ValueError(
                    f'Model "{name}" only supports {str(list(allowed))} matryoshka dimensions, '
                    "use other output dimensions will lead to poor results."
                )
        elif self.dimensions < 1:
            raise ValueError("Dimensions must be greater than 0")

    def __eq__(self, other) -> bool:
        return isinstance(other, PoolingParams) and vars(self) == vars(other)

    def __repr__(self) -> str:
        return (
            f"PoolingParams(task={self.task!r}, normalize={self.normalize}, dimensions={self.dimensions}, "
            f"use_activation={self.use_activation}, truncate_prompt_tokens={self.truncate_prompt_tokens})"
        )
