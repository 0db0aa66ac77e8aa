"""The doors of the completions app that an operator sets and watches: the API key on /v1/*, the cap
on a request's body, and the Prometheus metrics (responses counted by route and status code, the
engine's queue, tokens and latencies).

Owns the ASGI middleware that refuses a request without the key and counts every response, the
body reader that refuses a runaway upload, and the app's own metrics registry. Leaves to
server.py (nanollm.inference.server) the protocol itself: the routes, turning prompts into ids and
ids into text, streaming, and the refusals that need the model (its name, its context); the error
shape is protocol.py's ApiError.
"""

from __future__ import annotations

import hmac

from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client import Counter as PromCounter
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nanollm.inference.engine import Engine
from nanollm.inference.protocol import ApiError

__all__ = ["DEFAULT_MAX_BODY_BYTES", "CountResponses", "RequireApiKey", "ServerMetrics", "read_capped_body"]

# A prompt must fit the model's context, a few hundred tokens of a few bytes each, so 1 MiB leaves room
# for any JSON escaping (up to 6 bytes a character) of a prompt that fits, while refusing a runaway
# upload before it is parsed.
DEFAULT_MAX_BODY_BYTES = 1 << 20
# Buckets of the latency histograms, in seconds: first token from a few ms (idle server, short
# prompt) to a minute (a long queue); per output token from 1 ms (small model) to 1 s.
_FIRST_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_ROUTES = ("/v1/completions", "/v1/models", "/health", "/metrics")  # label values; any other path is "other"


async def read_capped_body(request: HttpRequest, limit: int) -> bytes:
    """The request's body; 413 past `limit` bytes, found from Content-Length or while reading (then read no further)."""
    too_large = ApiError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected before the end of the body") from None  # read by nobody
    return bytes(body)


class ServerMetrics:
    """The app's Prometheus metrics, in a registry of its own (several apps in one process never collide).

    Requests by route and status code (counted by CountResponses, so refusals at the door
    count too), the engine's queue depth and running sequences (read when scraped), generated
    tokens, time to the first token (from submission, the wait in the queue included) and the
    mean time per output token after the first, one observation per request.
    """

    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = PromCounter(
            "nanollm_http_requests", "HTTP requests answered, by route and status code", ["route", "code"],
            registry=registry,
        )  # fmt: skip
        queue_depth = Gauge("nanollm_queue_depth", "Requests waiting for a batch row", registry=registry)
        queue_depth.set_function(lambda: engine.stats()["waiting"])
        running = Gauge("nanollm_running_sequences", "Sequences in the batch being decoded", registry=registry)
        running.set_function(lambda: engine.stats()["running"])
        self.tokens = PromCounter("nanollm_generation_tokens", "Completion tokens generated", registry=registry)
        self.first_token = Histogram(
            "nanollm_time_to_first_token_seconds", "Seconds from submission to the first completion token",
            buckets=_FIRST_TOKEN_BUCKETS, registry=registry,
        )  # fmt: skip
        self.per_token = Histogram(
            "nanollm_time_per_output_token_seconds", "A request's mean seconds per completion token after the first",
            buckets=_PER_TOKEN_BUCKETS, registry=registry,
        )  # fmt: skip

    def exposition(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class CountResponses:
    """ASGI middleware: counts every HTTP response by route and status code into ServerMetrics.requests."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app, self._requests = app, metrics.requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client gets if the app fails before answering

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            route = scope["path"] if scope["path"] in _ROUTES else "other"
            self._requests.labels(route, str(status)).inc()


class RequireApiKey:
    """ASGI middleware: a request to /v1/* without `Authorization: Bearer <key>` gets 401 in OpenAI's shape.

    Other paths (/health, /metrics) stay open, as in vLLM. The key is compared in constant time
    and appears in no message or log.
    """

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self._key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path == "/v1" or path.startswith("/v1/")) and not self._allowed(scope):
            refusal = ApiError(
                401,
                "missing or incorrect API key: send the header `Authorization: Bearer <key>` with the server's key",
                code="invalid_api_key",
            )
            response = JSONResponse(refusal.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        value = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = value.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)
