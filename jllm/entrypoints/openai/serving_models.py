"""The served model's names, `GET /v1/models`, and the 404 for a name not served
(vLLM's OpenAIServingModels, without LoRA adapters)."""

from __future__ import annotations

import uuid

from jllm.entrypoints.openai.errors import NotFoundError
from jllm.entrypoints.openai.protocol import ModelCard, ModelList, ModelPermission


class OpenAIServingModels:
    def __init__(
        self,
        served_model_names: list[str],
        model_path: str,
        max_model_len: int,
        supported_tasks: tuple[str, ...] = ("generate",),
    ) -> None:
        if not served_model_names:
            raise ValueError("At least one served model name is needed.")
        self.served_model_names = list(served_model_names)
        self.model_path = model_path
        self.max_model_len = max_model_len
        self.supported_tasks = list(supported_tasks)

    @property
    def model_name(self) -> str:
        """The name responses report: the first served name."""
        return self.served_model_names[0]

    def check_model(self, model: str | None) -> None:
        """A request without a model means the served one; any other name is a 404."""
        if model and model not in self.served_model_names:
            raise NotFoundError(f"The model `{model}` does not exist.", param="model")

    def show_available_models(self) -> ModelList:
        return ModelList(
            data=[
                ModelCard(
                    id=name,
                    root=self.model_path,
                    max_model_len=self.max_model_len,
                    supported_tasks=self.supported_tasks,
                    permission=[ModelPermission(id=f"modelperm-{uuid.uuid4().hex}")],
                )
                for name in self.served_model_names
            ]
        )
