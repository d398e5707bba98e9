"""vLLM's error body, `{"error": {"message", "type", "param", "code"}}`, and the handlers
that give every failure that shape: pydantic validation (400, not FastAPI's 422),
HTTP errors (404 route, 405 method, 413 body), serving errors and engine death."""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jllm.engine.async_llm_engine import EngineDeadError
from jllm.entrypoints.openai.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

# A validation message quotes the offending input; a huge body must not come back whole.
MAX_ERROR_MESSAGE_CHARS = 8192


class OpenAIServingError(Exception):
    """A request the server refuses, with the status and type it answers with."""

    def __init__(
        self,
        message: str,
        err_type: str = "BadRequestError",
        status_code: HTTPStatus = HTTPStatus.BAD_REQUEST,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.err_type = err_type
        self.status_code = status_code
        self.param = param


class NotFoundError(OpenAIServingError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message, "NotFoundError", HTTPStatus.NOT_FOUND, param)


def create_error_response(
    message: str,
    err_type: str = "BadRequestError",
    status_code: HTTPStatus = HTTPStatus.BAD_REQUEST,
    param: str | None = None,
) -> ErrorResponse:
    if len(message) > MAX_ERROR_MESSAGE_CHARS:
        message = message[:MAX_ERROR_MESSAGE_CHARS] + "... (truncated)"
    return ErrorResponse(error=ErrorInfo(message=message, type=err_type, param=param, code=int(status_code)))


def error_json_response(error: ErrorResponse) -> JSONResponse:
    return JSONResponse(error.model_dump(), status_code=error.error.code)


def serving_error_response(exc: OpenAIServingError) -> ErrorResponse:
    return create_error_response(exc.message, exc.err_type, exc.status_code, exc.param)


def install_exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation_exception_handler(_: Request, exc: RequestValidationError) -> JSONResponse:
        # The error list alone, as vLLM's message read before FastAPI's str() began to
        # append the endpoint's source file and line, which a client has no use for.
        errors = list(exc.errors())
        try:
            message = str(errors)
        except RecursionError:  # an input nested deeper than repr can go: the errors without it
            message = str([{k: v for k, v in e.items() if k != "input"} for e in errors])
        return error_json_response(
            create_error_response(message, HTTPStatus.BAD_REQUEST.phrase, HTTPStatus.BAD_REQUEST)
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_exception_handler(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = HTTPStatus(exc.status_code)
        return error_json_response(create_error_response(str(exc.detail), status.phrase, status))

    @app.exception_handler(OpenAIServingError)
    async def serving_exception_handler(_: Request, exc: OpenAIServingError) -> JSONResponse:
        return error_json_response(serving_error_response(exc))

    @app.exception_handler(EngineDeadError)
    async def engine_dead_handler(_: Request, exc: EngineDeadError) -> JSONResponse:
        return error_json_response(create_error_response(str(exc), "EngineDeadError", HTTPStatus.INTERNAL_SERVER_ERROR))

    @app.exception_handler(Exception)
    async def internal_error_handler(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("Unexpected error while serving a request.")
        return error_json_response(
            create_error_response(
                f"Internal server error: {type(exc).__name__}", "InternalServerError", HTTPStatus.INTERNAL_SERVER_ERROR
            )
        )
