"""ASGI middleware: request id, optional API key, request body cap, metrics, and the generic 500.

The body cap runs before the application reads anything: a declared ``Content-Length`` over the cap
is refused at once, and a chunked body is counted as it arrives and refused as soon as it passes the
cap (the rest is never buffered). A body that is not complete within ``body_timeout_s`` (a stalled
or trickled upload) is refused with 408. Both refusals close the connection (``Connection: close``),
so the client's unread bytes never hold it. The application then reads the already-buffered body.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from serving.error_response import error_response
from serving.metrics import ServiceMetrics
from tokenizers_svc.errors import (
    AuthenticationError,
    BodyTimeoutError,
    InternalError,
    LimitExceededError,
    TokenizerError,
)

Scope = dict
Message = dict
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUEST_ID_HEADER = "x-request-id"
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # open without the API key (probes, scrapes)
logger = logging.getLogger(__name__)


@dataclass
class MiddlewareSettings:
    max_body_bytes: int
    body_timeout_s: float = 30.0
    api_key: str | None = None
    metrics: ServiceMetrics | None = None


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value
    return None


def _too_large(cap: int, size: int, *, streaming: bool = False) -> LimitExceededError:
    got = f"at least {size} (chunked body, stopped reading)" if streaming else str(size)
    return LimitExceededError(f"request body must be at most {cap} bytes, got {got}", param="body")


class ServiceMiddleware:
    """Wraps the FastAPI app. Settings come from ``app.state.middleware`` (set by the ingress at
    start), because a Serve ingress app is built before the service config is known."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings: MiddlewareSettings = scope["app"].state.middleware
        started = time.perf_counter()
        status = 500
        # Ray Serve's proxy puts its request id in the scope and echoes it on the response; outside
        # Serve (the bare app) we make one and add the header ourselves.
        given = _header(scope, REQUEST_ID_HEADER.encode())
        request_id = given.decode("latin-1") if given else uuid.uuid4().hex
        echo_id = None if given else request_id
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # the ingress's share of the request's time (the routes add the replica's parts)
                extra = [
                    (b"server-timing", f"ingress;dur={(time.perf_counter() - started) * 1e3:.1f}".encode())
                ]
                if echo_id is not None:
                    extra.append((REQUEST_ID_HEADER.encode(), echo_id.encode()))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        async def refuse(error: TokenizerError, *, close: bool = False) -> None:
            response = error_response(error)
            if close:
                response.headers["connection"] = "close"
            await response(scope, receive, send_with_id)

        response_started = False

        async def tracked_send(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send_with_id(message)

        try:
            error = self._check_auth(scope, settings)
            if error is not None:
                await refuse(error)
                return
            body, error = await self._read_body(scope, receive, settings)
            if error is not None:
                await refuse(error, close=True)
                return
            if body is None:  # client went away
                return
            await self.app(scope, _replay(body, receive), tracked_send)
        except Exception:  # the one boundary that turns unknown failures into a generic 500
            logger.exception("unhandled error in request %s", request_id)
            if not response_started:
                await refuse(InternalError(f"internal server error (request id {request_id})"))
        finally:
            if settings.metrics is not None:
                route = getattr(scope.get("route"), "path", "unmatched")
                model = scope.get("path_params", {}).get("model")
                settings.metrics.observe_request(route, model, status, time.perf_counter() - started)

    @staticmethod
    def _check_auth(scope: Scope, settings: MiddlewareSettings) -> TokenizerError | None:
        if not settings.api_key or scope["path"] in OPEN_PATHS:
            return None
        auth = _header(scope, b"authorization") or b""
        token = auth[7:] if auth[:7].lower() == b"bearer " else b""
        if hmac.compare_digest(token, settings.api_key.encode()):
            return None
        return AuthenticationError(
            "missing or wrong API key; expected header 'Authorization: Bearer <key>'", param="authorization"
        )

    @staticmethod
    async def _read_body(
        scope: Scope, receive: Receive, settings: MiddlewareSettings
    ) -> tuple[bytes | None, TokenizerError | None]:
        """(body, None), (None, the refusal) or (None, None) when the client went away."""
        cap, deadline = settings.max_body_bytes, settings.body_timeout_s
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            return None, _too_large(cap, int(declared))
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(deadline):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None, None
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > cap:
                        return None, _too_large(cap, size, streaming=True)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks), None
        except TimeoutError:
            return None, BodyTimeoutError(
                f"the request body did not arrive within {deadline:g} s ({size:,} bytes received); "
                "send it at once, or raise body_timeout_s",
                param="body",
            )


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that hands the buffered body to the app once, then defers to the server."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
