"""Pure ASGI middleware (no BaseHTTPMiddleware, which would break streaming and
disconnect detection): API-key checks, the request body size limit, X-Request-Id
headers and the count of generation requests in flight."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from http import HTTPStatus

from starlette.datastructures import URL, Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jllm.entrypoints.openai.errors import create_error_response

# Route prefixes that need the key (vLLM's); /health, /metrics, /tokenize, /invocations ... stay open.
AUTHENTICATED_PREFIXES = ("/v1", "/v2", "/inference")


def route_path(scope: Scope) -> str:
    """The path the app routes on: under --root-path a proxy may or may not have
    stripped the prefix, and both must be checked the same way."""
    return URL(scope=scope).path.removeprefix(scope.get("root_path", ""))


class AuthenticationMiddleware:
    """`Authorization: Bearer <key>` on /v1 routes; otherwise 401 `{"error": "Unauthorized"}`
    as vLLM answers. Keys are compared as SHA-256 digests in constant time."""

    def __init__(self, app: ASGIApp, api_keys: list[str]) -> None:
        self.app = app
        self.key_digests = [hashlib.sha256(key.encode("utf-8")).digest() for key in api_keys]

    def verify_token(self, headers: Headers) -> bool:
        scheme, _, token = (headers.get("authorization") or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        match = False
        for key_digest in self.key_digests:  # no early exit: timing says nothing of which key
            match |= secrets.compare_digest(digest, key_digest)
        return match

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        if route_path(scope).startswith(AUTHENTICATED_PREFIXES) and not self.verify_token(Headers(scope=scope)):
            await JSONResponse({"error": "Unauthorized"}, status_code=HTTPStatus.UNAUTHORIZED)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class RequestSizeLimitMiddleware:
    """Refuses bodies over `max_body_bytes` with 413 before the app parses anything.

    The body is read here in full (it would be anyway, to parse the JSON) and replayed
    to the app; later receive() calls go to the client, so disconnects still arrive.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replay: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replaying_receive() -> Message:
            return replay.pop() if replay else await receive()

        await self.app(scope, replaying_receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = create_error_response(
            f"Request body too large: the limit is {self.max_body_bytes} bytes.",
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE.phrase,
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        )
        response = JSONResponse(error.model_dump(), status_code=HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        await response(scope, receive, send)


class XRequestIdMiddleware:
    """--enable-request-id-headers: every response carries X-Request-Id, the client's
    own or a new uuid4 hex (vLLM's)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = Headers(scope=scope).get("X-Request-Id") or uuid.uuid4().hex

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("X-Request-Id", request_id)
            await send(message)

        await self.app(scope, receive, send_with_id)


class ServerLoad:
    """The number of generation requests in flight, for GET /load."""

    def __init__(self) -> None:
        self.value = 0


class ServerLoadMiddleware:
    """--enable-server-load-tracking: counts a request to a generation route from its
    arrival until its response's last byte is sent (a stream until [DONE]) or its
    client goes; a finally, so no way out can leave the count high."""

    def __init__(self, app: ASGIApp, load: ServerLoad, paths: frozenset[str]) -> None:
        self.app = app
        self.load = load
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(scope) not in self.paths:
            await self.app(scope, receive, send)
            return
        self.load.value += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.load.value -= 1
