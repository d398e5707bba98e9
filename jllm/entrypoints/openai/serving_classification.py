"""`POST /classify` (vLLM's ServingClassification): each input's class probabilities, and
the label (config.json's id2label) of the most likely class."""

from __future__ import annotations

import time

import numpy as np
from fastapi import Request

from jllm.entrypoints.openai.protocol_pooling import ClassificationData, ClassificationRequest, ClassificationResponse
from jllm.entrypoints.openai.serving_pooling_base import PoolingServing


class ServingClassification(PoolingServing):
    async def create_classify(
        self, request: ClassificationRequest, raw_request: Request | None = None
    ) -> ClassificationResponse:
        self.check_request(request)
        request_id = self.request_id("classify", request, raw_request)
        created = int(time.time())
        prompts = await self.text_prompts(
            request.input, request.truncate_prompt_tokens, request.add_special_tokens, "classification"
        )
        outputs = await self.encode(request_id, prompts, request.to_pooling_params(), request.user)
        id2label = getattr(self.engine.hf_config, "id2label", None) or {}
        data = []
        for i, output in enumerate(outputs):
            probs = np.asarray(output.outputs.data, dtype=np.float32).tolist()
            label = id2label.get(int(np.argmax(probs)))
            data.append(ClassificationData(index=i, label=label, probs=probs, num_classes=len(probs)))
        return ClassificationResponse(
            id=request_id, created=created, model=self.models.model_name, data=data, usage=self.pooling_usage(outputs)
        )
