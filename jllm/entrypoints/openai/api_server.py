"""jllm's OpenAI-compatible server (vLLM's api_server):

    python -m jllm.entrypoints.openai.api_server --model MODEL [--port 8000] [engine flags]

`build_app` makes the FastAPI app (routes, error handlers, middleware) and
`init_app_state` wires an AsyncLLMEngine into it; everything per server lives on
`app.state`, so several servers can share one process (the tests do).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import NamedTuple

import jax
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import TypeAdapter, ValidationError

from jllm import __version__
from jllm.distributed.initialize import initialize_distributed
from jllm.engine.arg_utils import EngineArgs
from jllm.engine.async_llm_engine import AsyncLLMEngine, EngineDeadError
from jllm.entrypoints.openai.cancellation import with_cancellation
from jllm.entrypoints.openai.chat_utils import load_chat_template
from jllm.entrypoints.openai.cli_args import make_arg_parser, resolve_api_keys, validate_parsed_serve_args
from jllm.entrypoints.openai.errors import OpenAIServingError, install_exception_handlers
from jllm.entrypoints.openai.metrics import PrometheusStatLogger
from jllm.entrypoints.openai.middleware import (
    AUTHENTICATED_PREFIXES,
    AuthenticationMiddleware,
    RequestSizeLimitMiddleware,
    ServerLoad,
    ServerLoadMiddleware,
    XRequestIdMiddleware,
)
from jllm.entrypoints.openai.orca_metrics import add_load_report
from jllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerateRequest,
    TokenizeRequest,
)
from jllm.entrypoints.openai.protocol_pooling import (
    ClassificationRequest,
    EmbeddingRequest,
    PoolingRequest,
    RerankRequest,
    ScoreRequest,
)
from jllm.entrypoints.openai.request_logger import RequestLogger
from jllm.entrypoints.openai.serving_chat import OpenAIServingChat
from jllm.entrypoints.openai.serving_classification import ServingClassification
from jllm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from jllm.entrypoints.openai.serving_embedding import OpenAIServingEmbedding
from jllm.entrypoints.openai.serving_engine import ResponseOptions
from jllm.entrypoints.openai.serving_generate import ServingGenerate
from jllm.entrypoints.openai.serving_models import OpenAIServingModels
from jllm.entrypoints.openai.serving_pooling import OpenAIServingPooling
from jllm.entrypoints.openai.serving_score import ServingScores
from jllm.entrypoints.openai.serving_tokenization import OpenAIServingTokenization
from jllm.utils.argparse_utils import FlexibleArgumentParser

logger = logging.getLogger("jllm.entrypoints.openai.api_server")

# Seconds an idle keep-alive connection stays open (vLLM's TIMEOUT_KEEP_ALIVE).
TIMEOUT_KEEP_ALIVE = 5
# Seconds open requests get to finish once the server is told to exit.
TIMEOUT_GRACEFUL_SHUTDOWN = 10
# The routes that --enable-server-load-tracking counts (vLLM's load_aware_call).
LOAD_TRACKED_PATHS = frozenset(
    {
        "/v1/completions",
        "/v1/chat/completions",
        "/generate",
        "/invocations",
        "/v1/embeddings",
        "/pooling",
        "/classify",
        "/score",
        "/v1/score",
        "/rerank",
        "/v1/rerank",
        "/v2/rerank",
    }
)


def served_apis(model_config) -> frozenset[str]:
    """The APIs the model's task can serve, by the names vLLM's refusals give them: a
    generative model completes and chats; a pooling model pools, embeds or classifies as
    its tasks say, and scores (and reranks) when it embeds or is a one-label cross-encoder."""
    if model_config.runner_type == "generate":
        return frozenset({"Completions API", "Chat Completions API"})
    tasks = model_config.supported_tasks
    apis = {"Pooling API"}
    if "embed" in tasks:
        apis.add("Embeddings API")
    if "classify" in tasks:
        apis.add("Classification API")
    if "embed" in tasks or (model_config.is_cross_encoder and model_config.num_labels == 1):
        apis |= {"Score API", "Rerank (Score) API"}
    return frozenset(apis)


def require_api(raw_request: Request, api: str) -> None:
    """vLLM's 400 for a route the model's task cannot serve."""
    if api not in raw_request.app.state.served_apis:
        raise OpenAIServingError(f"The model does not support {api}")


@functools.cache
def warn_rerank_v1() -> None:
    logger.warning(
        "To indicate that the rerank API is not part of the standard OpenAI API, we have located it at "
        "`/rerank`. Please update your client accordingly. (Note: Conforms to JinaAI rerank API)"
    )


class InvocationType(NamedTuple):
    """A body /invocations may hold: its validator (a union has no model_validate), its name
    as vLLM's refusal gives it (a class's name; str() of a union), the API the model must
    serve for it, and the route that serves it."""

    validator: TypeAdapter
    name: str
    api: str
    endpoint: Callable[..., Awaitable]

    @classmethod
    def of(cls, request_type, api: str, endpoint: Callable[..., Awaitable]) -> InvocationType:
        name = request_type.__name__ if isinstance(request_type, type) else str(request_type)
        return cls(TypeAdapter(request_type), name, api, endpoint)


async def validate_json_request(raw_request: Request) -> None:
    media_type = raw_request.headers.get("content-type", "").lower().split(";", maxsplit=1)[0].strip()
    if media_type != "application/json":
        raise RequestValidationError(errors=["Unsupported Media Type: Only 'application/json' is allowed"])


async def exit_when_engine_dies(app: FastAPI) -> None:
    """A dead engine cannot serve again, so the server exits (vLLM's behaviour) rather
    than answer 500 for ever; a supervisor restarts it. Until uvicorn has closed the
    socket, /health answers 503."""
    error = await app.state.engine_client.wait_until_dead()
    logger.error("%s The server shuts down.", error)
    server = getattr(app.state, "server", None)
    if server is not None:
        server.should_exit = True


@asynccontextmanager
async def lifespan(app: FastAPI):
    state = app.state
    watcher = None
    if getattr(state, "engine_client", None) is not None:
        watcher = asyncio.create_task(exit_when_engine_dies(app))
    try:
        yield
    finally:
        if watcher is not None:
            watcher.cancel()
        if getattr(state, "engine_client", None) is not None:
            state.engine_client.shutdown()
        if getattr(state, "tokenizer_executor", None) is not None:
            state.tokenizer_executor.shutdown(wait=False)


def build_app(args: argparse.Namespace) -> FastAPI:
    app = FastAPI(root_path=args.root_path or "", lifespan=lifespan, title="jllm", version=__version__)
    install_exception_handlers(app)
    json_body = [Depends(validate_json_request)]
    app.state.server_load = ServerLoad()

    @app.get("/health")
    async def health(raw_request: Request) -> Response:
        try:
            raw_request.app.state.engine_client.check_health()
        except EngineDeadError:
            return Response(status_code=503)
        return Response(status_code=200)

    # SageMaker's health check; a route per method, so each has its own OpenAPI operation id.
    app.add_api_route("/ping", health, methods=["GET"], response_class=Response, name="ping")
    app.add_api_route("/ping", health, methods=["POST"], response_class=Response, name="ping_post")

    @app.get("/version")
    async def show_version() -> JSONResponse:
        return JSONResponse({"version": __version__})

    @app.get("/load")
    async def show_server_load(raw_request: Request) -> JSONResponse:
        # Always 0 without --enable-server-load-tracking, as in vLLM.
        return JSONResponse({"server_load": raw_request.app.state.server_load.value})

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

    if args.enable_tokenizer_info_endpoint:

        @app.get("/tokenizer_info")
        async def tokenizer_info(raw_request: Request) -> JSONResponse:
            return JSONResponse(raw_request.app.state.openai_serving_tokenization.get_tokenizer_info())

    @app.post("/v1/completions", dependencies=json_body)
    @with_cancellation
    async def create_completion(request: CompletionRequest, raw_request: Request):
        require_api(raw_request, "Completions API")
        response = await raw_request.app.state.openai_serving_completion.create_completion(request, raw_request)
        return add_load_report(response, raw_request)

    @app.post("/v1/chat/completions", dependencies=json_body)
    @with_cancellation
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request):
        require_api(raw_request, "Chat Completions API")
        response = await raw_request.app.state.openai_serving_chat.create_chat_completion(request, raw_request)
        return add_load_report(response, raw_request)

    @app.post("/generate", dependencies=json_body)
    @with_cancellation
    async def generate(request: GenerateRequest, raw_request: Request):
        return await raw_request.app.state.serving_generate.generate(request)

    @app.post("/v1/embeddings", dependencies=json_body)
    @with_cancellation
    async def create_embedding(request: EmbeddingRequest, raw_request: Request):
        require_api(raw_request, "Embeddings API")
        response = await raw_request.app.state.openai_serving_embedding.create_embedding(request, raw_request)
        return JSONResponse(response.model_dump())

    @app.post("/pooling", dependencies=json_body)
    @with_cancellation
    async def create_pooling(request: PoolingRequest, raw_request: Request):
        require_api(raw_request, "Pooling API")
        response = await raw_request.app.state.openai_serving_pooling.create_pooling(request, raw_request)
        return JSONResponse(response.model_dump())

    @app.post("/classify", dependencies=json_body)
    @with_cancellation
    async def create_classify(request: ClassificationRequest, raw_request: Request):
        require_api(raw_request, "Classification API")
        response = await raw_request.app.state.openai_serving_classification.create_classify(request, raw_request)
        return JSONResponse(response.model_dump())

    async def score(request: ScoreRequest, raw_request: Request) -> JSONResponse:
        require_api(raw_request, "Score API")
        response = await raw_request.app.state.openai_serving_scores.create_score(request, raw_request)
        return JSONResponse(response.model_dump())

    @app.post("/score", dependencies=json_body)
    @with_cancellation
    async def create_score(request: ScoreRequest, raw_request: Request):
        return await score(request, raw_request)

    @app.post("/v1/score", dependencies=json_body)
    @with_cancellation
    async def create_score_v1(request: ScoreRequest, raw_request: Request):
        logger.warning(
            "To indicate that Score API is not part of standard OpenAI API, we have moved it to `/score`. "
            "Please update your client accordingly."
        )
        return await score(request, raw_request)

    async def rerank(request: RerankRequest, raw_request: Request) -> JSONResponse:
        require_api(raw_request, "Rerank (Score) API")
        response = await raw_request.app.state.openai_serving_scores.do_rerank(request, raw_request)
        return JSONResponse(response.model_dump())

    @app.post("/rerank", dependencies=json_body)
    @with_cancellation
    async def do_rerank(request: RerankRequest, raw_request: Request):
        return await rerank(request, raw_request)

    @app.post("/v1/rerank", dependencies=json_body)
    @with_cancellation
    async def do_rerank_v1(request: RerankRequest, raw_request: Request):
        warn_rerank_v1()
        return await rerank(request, raw_request)

    @app.post("/v2/rerank", dependencies=json_body)
    @with_cancellation
    async def do_rerank_v2(request: RerankRequest, raw_request: Request):
        return await rerank(request, raw_request)

    # SageMaker's one route: the body goes to the first request type it validates as, among
    # those the model's task serves, in vLLM's order (vLLM's INVOCATION_TYPES: generation's,
    # then pooling's).
    invocation_types = [
        InvocationType.of(ChatCompletionRequest, "Chat Completions API", create_chat_completion),
        InvocationType.of(CompletionRequest, "Completions API", create_completion),
        InvocationType.of(EmbeddingRequest, "Embeddings API", create_embedding),
        InvocationType.of(ClassificationRequest, "Classification API", create_classify),
        InvocationType.of(RerankRequest, "Rerank (Score) API", do_rerank),
        InvocationType.of(ScoreRequest, "Score API", create_score),
        InvocationType.of(PoolingRequest, "Pooling API", create_pooling),
    ]

    @app.post("/invocations", dependencies=json_body)
    async def invocations(raw_request: Request):
        try:
            body = await raw_request.json()
        except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than json can read
            raise HTTPException(HTTPStatus.BAD_REQUEST, detail=f"JSON decode error: {e}") from e
        served = [t for t in invocation_types if t.api in raw_request.app.state.served_apis]
        for invocation_type in served:
            try:
                request = invocation_type.validator.validate_python(body)
            except ValidationError:
                continue
            return await invocation_type.endpoint(request=request, raw_request=raw_request)
        names = [t.name for t in served]
        raise OpenAIServingError(f"Cannot find suitable handler for request. Expected one of: {names}")

    # Starlette runs the last added outermost. Size limit, then the key: a request without
    # it never gets its body read. X-Request-Id outside both, so a 401 or 413 has one too.
    if args.enable_server_load_tracking:
        app.add_middleware(ServerLoadMiddleware, load=app.state.server_load, paths=LOAD_TRACKED_PATHS)
    app.add_middleware(RequestSizeLimitMiddleware, max_body_bytes=args.max_request_body_bytes)
    if args.api_key:
        app.add_middleware(AuthenticationMiddleware, api_keys=args.api_key)
    if args.enable_request_id_headers:
        app.add_middleware(XRequestIdMiddleware)
    return app


def init_app_state(engine: AsyncLLMEngine, state, args: argparse.Namespace) -> None:
    """Serving objects, metrics registry and tokenizer thread of one server; the app
    owns `engine` from here on and shuts it down with itself."""
    max_model_len = engine.model_config.max_model_len
    models = OpenAIServingModels(
        [args.served_model_name or args.model], args.model, max_model_len, engine.model_config.supported_tasks
    )
    request_logger = RequestLogger(args.max_log_len) if args.enable_log_requests else None
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jllm-tokenizer")
    options = ResponseOptions(
        return_tokens_as_token_ids=args.return_tokens_as_token_ids,
        enable_force_include_usage=args.enable_force_include_usage,
        enable_prompt_tokens_details=args.enable_prompt_tokens_details,
    )
    serving_chat = OpenAIServingChat(
        engine,
        models,
        request_logger,
        executor,
        load_chat_template(args.chat_template),
        args.response_role,
        args.trust_request_chat_template,
        options,
    )
    state.engine_client = engine
    state.tokenizer_executor = executor
    state.openai_serving_models = models
    state.openai_serving_completion = OpenAIServingCompletion(engine, models, request_logger, executor, options)
    state.openai_serving_chat = serving_chat
    state.openai_serving_tokenization = OpenAIServingTokenization(serving_chat)
    state.serving_generate = ServingGenerate(engine, models, request_logger, executor, options)
    state.served_apis = served_apis(engine.model_config)
    pooling_args = (engine, models, request_logger, executor, serving_chat)
    state.openai_serving_embedding = OpenAIServingEmbedding(*pooling_args)
    state.openai_serving_pooling = OpenAIServingPooling(*pooling_args)
    state.openai_serving_classification = ServingClassification(*pooling_args)
    state.openai_serving_scores = ServingScores(*pooling_args)
    state.metrics_registry = CollectorRegistry()
    engine.add_stat_logger(
        PrometheusStatLogger(
            state.metrics_registry,
            models.model_name,
            max_model_len,
            engine.cache_config,
            engine_indexes=engine.engine_indexes,
        )
    )


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s [%(name)s] %(message)s")


def make_server(app: FastAPI, args: argparse.Namespace):
    """The uvicorn server for `app`; kept on app.state so a dead engine can stop it."""
    import uvicorn

    config = uvicorn.Config(
        app,
        log_level=args.uvicorn_log_level,
        access_log=not args.disable_uvicorn_access_log,
        timeout_keep_alive=TIMEOUT_KEEP_ALIVE,
        timeout_graceful_shutdown=TIMEOUT_GRACEFUL_SHUTDOWN,
    )
    app.state.server = uvicorn.Server(config)
    return app.state.server


def bind_socket(args: argparse.Namespace) -> tuple[socket.socket, str]:
    """The listening socket (--uds, else --host/--port) and its address for the log."""
    if args.uds:
        if os.path.exists(args.uds):
            os.unlink(args.uds)  # a stale socket file from an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(args.uds)
        return sock, f"unix:{args.uds}"
    host = args.host or "0.0.0.0"
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, args.port))
    return sock, f"http://{host}:{sock.getsockname()[1]}"


def run_server(args: argparse.Namespace) -> None:
    configure_logging()
    validate_parsed_serve_args(args)
    args.api_key = resolve_api_keys(args.api_key)
    engine_args = EngineArgs.from_cli_args(args)
    initialize_distributed(engine_args.nnodes, engine_args.node_rank, engine_args.master_addr, engine_args.master_port)
    if jax.process_index() != 0:
        # A multi-host run's other processes serve no HTTP (vLLM's headless nodes): building
        # the engine runs process 0's steps here until it shuts down, then exits.
        AsyncLLMEngine.from_engine_args(engine_args)
    # Bound before the engine loads, so a port in use fails at once, not minutes later.
    sock, address = bind_socket(args)
    engine = AsyncLLMEngine.from_engine_args(engine_args)
    app = build_app(args)
    init_app_state(engine, app.state, args)
    if args.api_key:
        logger.info(
            "API key authentication is on: routes under %s need one of %d key(s).",
            ", ".join(AUTHENTICATED_PREFIXES),
            len(args.api_key),
        )
    else:
        logger.info("API key authentication is off: set --api-key, JLLM_API_KEY or VLLM_API_KEY to turn it on.")
    logger.info("Serving %s on %s", args.served_model_name or args.model, address)
    make_server(app, args).run(sockets=[sock])
    if engine.errored:
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    parser = make_arg_parser(FlexibleArgumentParser(description="jllm's OpenAI-compatible API server."))
    args = parser.parse_args(argv)
    try:
        run_server(args)
    except ValueError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
