"""`POST /generate`: the body that vLLM's demo API server (vllm/entrypoints/api_server.py)
takes and older vLLM clients still send: {"prompt", "stream", SamplingParams fields}.

The answer is {"text": [prompt + completion for each of the n samples]}; streaming sends
one such JSON object per line, each with the whole text so far.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator

from fastapi.responses import JSONResponse

from jllm.entrypoints.openai.errors import OpenAIServingError
from jllm.entrypoints.openai.protocol import GenerateRequest
from jllm.entrypoints.openai.serving_engine import EngineStreamingResponse, OpenAIServing, random_uuid
from jllm.outputs import RequestOutput
from jllm.sampling_params import RequestOutputKind, SamplingParams


class ServingGenerate(OpenAIServing):
    async def generate(self, request: GenerateRequest):
        fields = request.model_dump(exclude={"prompt", "stream"})
        fields["output_kind"] = RequestOutputKind.CUMULATIVE if request.stream else RequestOutputKind.FINAL_ONLY
        try:
            params = SamplingParams(**fields)
            self._check_engine_limits(params)
        except ValueError as e:
            raise OpenAIServingError(str(e)) from e
        request_id = random_uuid()
        self.log_inputs(request_id, request.prompt, None, params)
        streams = await self.add_requests([(request_id, request.prompt, params)])
        outputs = self.engine.stream_outputs(streams)
        if request.stream:
            return EngineStreamingResponse(
                self._stream(request.prompt, outputs), self.engine, streams, media_type="application/x-ndjson"
            )
        final = None
        async for _, output in outputs:
            final = output
        return JSONResponse(_texts(request.prompt, final))

    @staticmethod
    async def _stream(prompt: str, outputs) -> AsyncGenerator[bytes, None]:
        try:
            async for _, output in outputs:
                yield (json.dumps(_texts(prompt, output)) + "\n").encode("utf-8")
        finally:
            await outputs.aclose()


def _texts(prompt: str, output: RequestOutput) -> dict:
    return {"text": [prompt + completion.text for completion in output.outputs]}
