"""jllm's OpenAI-compatible server (vLLM's api_server):

    python -m jllm.entrypoints.openai.api_server --model MODEL [--port 8000] [engine flags]

`build_app` makes the FastAPI app (routes, error handlers, middleware) and
`init_app_state` wires an AsyncLLMEngine into it; everything per server lives on
`app.state`, so several servers can share one process (the tests do).
"""
from __future__ import annotations

import argparse
import logging
import socket
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from jllm import __version__
from jllm.engine.arg_utils import EngineArgs
from jllm.engine.async_llm_engine import AsyncLLMEngine, EngineDeadError
from jllm.entrypoints.openai.cancellation import with_cancellation
from jllm.entrypoints.openai.chat_utils import load_chat_template
from jllm.entrypoints.openai.cli_args import make_arg_parser, validate_parsed_serve_args
from jllm.entrypoints.openai.errors import install_exception_handlers
from jllm.entrypoints.openai.metrics import PrometheusStatLogger
from jllm.entrypoints.openai.middleware import AuthenticationMiddleware, RequestSizeLimitMiddleware
from jllm.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                              GenerateRequest, TokenizeRequest)
from jllm.entrypoints.openai.request_logger import RequestLogger
from jllm.entrypoints.openai.serving_chat import OpenAIServingChat
from jllm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from jllm.entrypoints.openai.serving_generate import ServingGenerate
from jllm.entrypoints.openai.serving_models import OpenAIServingModels
from jllm.entrypoints.openai.serving_tokenization import OpenAIServingTokenization

logger = logging.getLogger("jllm.entrypoints.openai.api_server")

# Seconds an idle keep-alive connection stays open (vLLM's TIMEOUT_KEEP_ALIVE).
TIMEOUT_KEEP_ALIVE = 5


async def validate_json_request(raw_request: Request) -> None:
    media_type = raw_request.headers.get("content-type", "").lower().split(";", maxsplit=1)[0].strip()
    if media_type != "application/json":
        raise RequestValidationError(errors=["Unsupported Media Type: Only 'application/json' is allowed"])


@asynccontextmanager
async def lifespan(app: FastAPI):
    try:
        yield
    finally:
        state = app.state
        if getattr(state, "engine_client", None) is not None:
            state.engine_client.shutdown()
        if getattr(state, "tokenizer_executor", None) is not None:
            state.tokenizer_executor.shutdown(wait=False)


def build_app(args: argparse.Namespace) -> FastAPI:
    app = FastAPI(root_path=args.root_path or "", lifespan=lifespan, title="jllm", version=__version__)
    install_exception_handlers(app)
    json_body = [Depends(validate_json_request)]

    @app.get("/health")
    async def health(raw_request: Request) -> Response:
        try:
            raw_request.app.state.engine_client.check_health()
        except EngineDeadError:
            return Response(status_code=503)
        return Response(status_code=200)

    @app.get("/version")
    async def show_version() -> JSONResponse:
        return JSONResponse({"version": __version__})

    @app.get("/v1/models")
    async def show_available_models(raw_request: Request) -> JSONResponse:
        models = raw_request.app.state.openai_serving_models.show_available_models()
        return JSONResponse(models.model_dump())

    @app.get("/metrics")
    async def metrics(raw_request: Request) -> Response:
        return Response(generate_latest(raw_request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize", dependencies=json_body)
    async def tokenize(request: TokenizeRequest, raw_request: Request) -> JSONResponse:
        response = await raw_request.app.state.openai_serving_tokenization.create_tokenize(request)
        return JSONResponse(response.model_dump())

    @app.post("/detokenize", dependencies=json_body)
    async def detokenize(request: DetokenizeRequest, raw_request: Request) -> JSONResponse:
        response = await raw_request.app.state.openai_serving_tokenization.create_detokenize(request)
        return JSONResponse(response.model_dump())

    @app.post("/v1/completions", dependencies=json_body)
    @with_cancellation
    async def create_completion(request: CompletionRequest, raw_request: Request):
        return await raw_request.app.state.openai_serving_completion.create_completion(request, raw_request)

    @app.post("/v1/chat/completions", dependencies=json_body)
    @with_cancellation
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request):
        return await raw_request.app.state.openai_serving_chat.create_chat_completion(request, raw_request)

    @app.post("/generate", dependencies=json_body)
    @with_cancellation
    async def generate(request: GenerateRequest, raw_request: Request):
        return await raw_request.app.state.serving_generate.generate(request)

    # Added last, so outermost: a request without the key never gets its body read.
    app.add_middleware(RequestSizeLimitMiddleware, max_body_bytes=args.max_request_body_bytes)
    if args.api_key:
        app.add_middleware(AuthenticationMiddleware, api_keys=args.api_key)
    return app


def init_app_state(engine: AsyncLLMEngine, state, args: argparse.Namespace) -> None:
    """Serving objects, metrics registry and tokenizer thread of one server; the app
    owns `engine` from here on and shuts it down with itself."""
    max_model_len = engine.model_config.max_model_len
    models = OpenAIServingModels([args.served_model_name or args.model], args.model, max_model_len)
    request_logger = RequestLogger(args.max_log_len) if args.enable_log_requests else None
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jllm-tokenizer")
    serving_chat = OpenAIServingChat(engine, models, request_logger, executor, load_chat_template(args.chat_template),
                                     args.response_role, args.trust_request_chat_template)
    state.engine_client = engine
    state.tokenizer_executor = executor
    state.openai_serving_models = models
    state.openai_serving_completion = OpenAIServingCompletion(engine, models, request_logger, executor)
    state.openai_serving_chat = serving_chat
    state.openai_serving_tokenization = OpenAIServingTokenization(serving_chat)
    state.serving_generate = ServingGenerate(engine, models, request_logger, executor)
    state.metrics_registry = CollectorRegistry()
    engine.add_stat_logger(PrometheusStatLogger(state.metrics_registry, models.model_name, max_model_len))


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s [%(name)s] %(message)s")


def run_server(args: argparse.Namespace) -> None:
    import uvicorn

    configure_logging()
    validate_parsed_serve_args(args)
    # Bound before the engine loads, so a port in use fails at once, not minutes later.
    host = args.host or "0.0.0.0"
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, args.port))
    engine = AsyncLLMEngine.from_engine_args(EngineArgs.from_cli_args(args))
    app = build_app(args)
    init_app_state(engine, app.state, args)
    logger.info("Serving %s on http://%s:%d", args.served_model_name or args.model, host, sock.getsockname()[1])
    config = uvicorn.Config(app, log_level=args.uvicorn_log_level, access_log=not args.disable_uvicorn_access_log,
                            timeout_keep_alive=TIMEOUT_KEEP_ALIVE)
    uvicorn.Server(config).run(sockets=[sock])


def main(argv: list[str] | None = None) -> None:
    parser = make_arg_parser(argparse.ArgumentParser(description="jllm's OpenAI-compatible API server."))
    args = parser.parse_args(argv)
    try:
        run_server(args)
    except ValueError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
