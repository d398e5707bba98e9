"""`jllm run-batch` (vLLM's run_batch): run a file of requests in OpenAI's batch format (chat
completions, completions, embeddings, score, rerank) through the server's own handlers and
write one result line per request, in input order.

    python -m jllm.entrypoints.openai.run_batch -i requests.jsonl -o results.jsonl --model MODEL

Input and output are local paths or http(s) URLs (read with GET, written with PUT).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import tempfile
import time
import types
import urllib.request
from collections.abc import Callable
from http import HTTPStatus
from operator import attrgetter
from typing import Any, NamedTuple

from pydantic import BaseModel, TypeAdapter, ValidationError, ValidationInfo, field_validator
from tqdm import tqdm

from jllm.engine.arg_utils import EngineArgs
from jllm.engine.async_llm_engine import AsyncLLMEngine
from jllm.entrypoints.openai.api_server import configure_logging, init_app_state
from jllm.entrypoints.openai.cli_args import add_frontend_args, validate_frontend_args
from jllm.entrypoints.openai.errors import (
    OpenAIServingError,
    create_error_response,
    serving_error_response,
)
from jllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIBaseModel,
    OpenAIRequestModel,
)
from jllm.entrypoints.openai.protocol_pooling import EmbeddingRequest, RerankRequest, ScoreRequest
from jllm.entrypoints.openai.serving_engine import random_uuid
from jllm.utils.argparse_utils import FlexibleArgumentParser

logger = logging.getLogger("jllm.entrypoints.openai.run_batch")

# vLLM's upload policy: a PUT is tried this often, this many seconds apart, each with this timeout.
UPLOAD_ATTEMPTS = 5
UPLOAD_RETRY_DELAY_S = 5
HTTP_TIMEOUT_S = 1000


class BatchEndpoint(NamedTuple):
    # Validates the body as the request model, or union of them (OpenAI's or the chat-style
    # embeddings body).
    request_adapter: TypeAdapter
    # The app state -> its handler, called as `await handler(request, None)` as a route calls it.
    handler: Callable[[Any], Callable]
    # The API as the server's served_apis names it, and as run-batch's refusal names it
    # (vLLM's run_batch says "Scores API" and "Rerank API" where its server says otherwise).
    served_api: str
    unserved_error: str


def _endpoint(request_type: Any, handler: str, served_api: str, refusal_api: str | None = None) -> BatchEndpoint:
    return BatchEndpoint(
        TypeAdapter(request_type),
        attrgetter(handler),
        served_api,
        f"The model does not support {refusal_api or served_api}",
    )


# vLLM's run-batch has no /v1/completions; jllm serves it.
CHAT = _endpoint(ChatCompletionRequest, "openai_serving_chat.create_chat_completion", "Chat Completions API")
COMPLETIONS = _endpoint(CompletionRequest, "openai_serving_completion.create_completion", "Completions API")
EMBEDDINGS = _endpoint(EmbeddingRequest, "openai_serving_embedding.create_embedding", "Embeddings API")
SCORE = _endpoint(ScoreRequest, "openai_serving_scores.create_score", "Score API", "Scores API")
RERANK = _endpoint(RerankRequest, "openai_serving_scores.do_rerank", "Rerank (Score) API", "Rerank API")
EXACT_URLS = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETIONS, "/v1/embeddings": EMBEDDINGS}
SUPPORTED_URLS = "/v1/chat/completions, /v1/completions, /v1/embeddings, /score, /rerank"


def batch_endpoint(url: str) -> BatchEndpoint | None:
    """The endpoint a line's url names, by vLLM's rule: chat, completions and embeddings by
    their exact url, score and rerank by the url's end (/score, /v1/score; /rerank,
    /v1/rerank, /v2/rerank)."""
    if url in EXACT_URLS:
        return EXACT_URLS[url]
    if url.endswith("/score"):
        return SCORE
    if url.endswith("/rerank"):
        return RERANK
    return None


class BatchRequestInput(OpenAIRequestModel):
    """One input line. `method` is not checked (vLLM's behaviour); `body` is validated as the
    request of its url, and kept as given for a url jllm does not serve (that line gets an error)."""

    custom_id: str
    method: str
    url: str
    body: Any

    @field_validator("body", mode="plain")
    @classmethod
    def validate_body(cls, value: Any, info: ValidationInfo) -> Any:
        endpoint = batch_endpoint(info.data.get("url", ""))
        return value if endpoint is None else endpoint.request_adapter.validate_python(value)


class BatchResponseData(OpenAIBaseModel):
    status_code: int = 200
    request_id: str
    body: dict[str, Any] | None = None


class BatchRequestOutput(OpenAIBaseModel):
    id: str
    custom_id: str
    response: BatchResponseData | None
    # A plain string for errors the runner makes itself, vLLM's ErrorResponse dict for a handler's.
    error: Any | None


def make_arg_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("batch")
    group.add_argument(
        "-i",
        "--input-file",
        required=True,
        type=str,
        help="The path or url to a single input file. Currently supports local file paths, or the "
        "http protocol (http or https). If a URL is specified, the file should be available "
        "via HTTP GET.",
    )
    group.add_argument(
        "-o",
        "--output-file",
        required=True,
        type=str,
        help="The path or url to a single output file. Currently supports local file paths, or web "
        "(http or https) urls. If a URL is specified, the file should be available via HTTP PUT.",
    )
    group.add_argument(
        "--output-tmp-dir",
        type=str,
        default=None,
        help="The directory to store the output file before uploading it to the output URL.",
    )
    group.add_argument("--enable-metrics", action="store_true", help="Enable Prometheus metrics")
    group.add_argument(
        "--host",
        type=str,
        default=None,
        help="Host name for the Prometheus metrics server (only needed if enable-metrics is set); "
        "all interfaces by default.",
    )
    group.add_argument(
        "--port",
        type=int,
        default=8000,
        help="Port number for the Prometheus metrics server (only needed if enable-metrics is set).",
    )
    add_frontend_args(parser)
    # Throughput is logged every few seconds unless told not to, as `jllm serve` does.
    parser.set_defaults(disable_log_stats=False)
    return parser


def validate_run_batch_args(args: argparse.Namespace) -> None:
    """Refuse a bad flag before the engine spends time loading the model."""
    validate_frontend_args(args)
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}.")


def is_url(path_or_url: str) -> bool:
    return path_or_url.startswith(("http://", "https://"))


def read_file(path_or_url: str) -> str:
    if is_url(path_or_url):
        with urllib.request.urlopen(path_or_url, timeout=HTTP_TIMEOUT_S) as response:
            return response.read().decode("utf-8")
    with open(path_or_url, encoding="utf-8") as f:
        return f.read()


def parse_batch(text: str, source: str) -> list[BatchRequestInput]:
    """Every line, before anything runs: one bad line fails the whole batch (vLLM's behaviour)."""
    requests = []
    # Split on "\n" alone: a JSON string may hold U+2028, at which str.splitlines() would split.
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            requests.append(BatchRequestInput.model_validate_json(line))
        except ValidationError as e:
            raise ValueError(f"Line {line_number} of {source} is not a valid batch request: {e}") from e
    return requests


def upload_data(output_url: str, data_or_file: bytes | str, from_file: bool) -> None:
    """PUT the output (bytes, or the file at that path), retrying as vLLM does."""
    for attempt in range(1, UPLOAD_ATTEMPTS + 1):
        try:
            if from_file:
                with open(data_or_file, "rb") as f:
                    put(output_url, f, os.path.getsize(data_or_file))
            else:
                put(output_url, data_or_file, len(data_or_file))
            return
        except Exception as e:
            if attempt == UPLOAD_ATTEMPTS:
                raise RuntimeError(f"Failed to upload data (attempt {attempt}). Error message: {e}.") from e
            logger.warning(
                "Failed to upload data (attempt %d): %s. Retrying in %d s.", attempt, e, UPLOAD_RETRY_DELAY_S
            )
            time.sleep(UPLOAD_RETRY_DELAY_S)


def put(url: str, data, length: int) -> None:
    # urlopen raises HTTPError on any status outside 2xx.
    request = urllib.request.Request(url, data=data, method="PUT", headers={"Content-Length": str(length)})
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S):
        pass


def write_file(path_or_url: str, outputs: list[BatchRequestOutput], output_tmp_dir: str | None) -> None:
    lines = [output.model_dump_json() + "\n" for output in outputs]
    if not is_url(path_or_url):
        logger.info("Writing outputs to local file %s", path_or_url)
        with open(path_or_url, "w", encoding="utf-8") as f:
            f.writelines(lines)
    elif output_tmp_dir is None:
        logger.info("Writing outputs to memory buffer")
        logger.info("Uploading outputs to %s", path_or_url)
        upload_data(path_or_url, "".join(lines).strip().encode(), from_file=False)
    else:
        with tempfile.NamedTemporaryFile(
            "w", encoding="utf-8", dir=output_tmp_dir, prefix="tmp_batch_output_", suffix=".jsonl"
        ) as f:
            logger.info("Writing outputs to temporary local file %s", f.name)
            f.writelines(lines)
            f.flush()
            logger.info("Uploading outputs to %s", path_or_url)
            upload_data(path_or_url, f.name, from_file=True)


def make_error_request_output(request: BatchRequestInput, error: Any, status_code: int) -> BatchRequestOutput:
    return BatchRequestOutput(
        id=f"vllm-{random_uuid()}",
        custom_id=request.custom_id,
        response=BatchResponseData(status_code=int(status_code), request_id=f"vllm-batch-{random_uuid()}"),
        error=error,
    )


async def run_request(handler: Callable, request: BatchRequestInput, progress: tqdm) -> BatchRequestOutput:
    """One request through its handler; its failure becomes its own error row, never the batch's."""
    try:
        response = await handler(request.body, None)
    except OpenAIServingError as e:
        return make_error_request_output(request, serving_error_response(e).model_dump(), e.status_code)
    except Exception as e:
        logger.exception("Request %s failed.", request.custom_id)
        error = create_error_response(
            f"{type(e).__name__}: {e}", "InternalServerError", HTTPStatus.INTERNAL_SERVER_ERROR
        )
        return make_error_request_output(request, error.model_dump(), error.error.code)
    finally:
        progress.update(1)
    # Generation handlers answer with a JSONResponse, pooling ones with the response model.
    if isinstance(response, BaseModel):
        status_code, body = HTTPStatus.OK.value, response.model_dump()
    else:
        status_code, body = response.status_code, json.loads(response.body)
    return BatchRequestOutput(
        id=f"vllm-{random_uuid()}",
        custom_id=request.custom_id,
        response=BatchResponseData(status_code=status_code, request_id=f"vllm-batch-{random_uuid()}", body=body),
        error=None,
    )


def refusal(request: BatchRequestInput, served_apis: frozenset[str]) -> str | None:
    """Why the runner answers this request itself, without a handler; None if it does not."""
    endpoint = batch_endpoint(request.url)
    if endpoint is None:
        return f"URL {request.url} was used. Supported endpoints: {SUPPORTED_URLS}."
    if endpoint.served_api not in served_apis:
        return endpoint.unserved_error
    if getattr(request.body, "stream", False):
        return "Request must not be sent in stream mode"
    return None


async def run_requests(state, requests: list[BatchRequestInput]) -> list[BatchRequestOutput]:
    """All requests at once (the engine's scheduler batches them); results in input order."""
    outputs: list[BatchRequestOutput | None] = [None] * len(requests)
    runnable = []
    for index, request in enumerate(requests):
        error = refusal(request, state.served_apis)
        if error is None:
            runnable.append(index)
        else:
            outputs[index] = make_error_request_output(request, error, HTTPStatus.BAD_REQUEST)
    # Only requests handed to a handler count towards the bar, as in vLLM.
    with tqdm(
        total=len(runnable),
        desc="Running batch",
        unit="req",
        mininterval=5,
        bar_format="{desc}: {percentage:3.0f}% Completed | {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]\n",
    ) as progress:
        results = await asyncio.gather(
            *(run_request(batch_endpoint(requests[i].url).handler(state), requests[i], progress) for i in runnable)
        )
    for index, output in zip(runnable, results):
        outputs[index] = output
    return outputs


def run_batch(args: argparse.Namespace) -> None:
    """Read and check the whole input, start the engine, run every request, write the output."""
    configure_logging()
    logger.info("Reading batch from %s...", args.input_file)
    try:
        requests = parse_batch(read_file(args.input_file), args.input_file)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    engine = AsyncLLMEngine.from_engine_args(EngineArgs.from_cli_args(args))
    state = types.SimpleNamespace()
    try:
        init_app_state(engine, state, args)
        if args.enable_metrics:
            from prometheus_client import start_http_server

            start_http_server(port=args.port, addr=args.host or "0.0.0.0", registry=state.metrics_registry)
            logger.info("Prometheus metrics enabled")
        else:
            logger.info("Prometheus metrics disabled")
        outputs = asyncio.run(run_requests(state, requests))
        write_file(args.output_file, outputs, args.output_tmp_dir)
        if engine.errored:
            raise SystemExit("The engine died during the batch; its unfinished requests have error rows.")
    finally:
        engine.shutdown()
        if getattr(state, "tokenizer_executor", None) is not None:
            state.tokenizer_executor.shutdown(wait=False)


def main(argv: list[str] | None = None) -> None:
    parser = make_arg_parser(FlexibleArgumentParser(description="jllm's OpenAI-compatible batch runner."))
    args = parser.parse_args(argv)
    try:
        validate_run_batch_args(args)
    except ValueError as e:
        parser.error(str(e))
    run_batch(args)


if __name__ == "__main__":
    main()
