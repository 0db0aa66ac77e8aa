"""The OpenAI-compatible HTTP face of the engine: POST /v1/completions (whole or streamed), GET /v1/models,
GET /health, GET /metrics.

Owns the HTTP side only: the door (an API key on /v1/*, a capped body, a prompt refused by its
length before it is tokenized), reading a request (what it may say is protocol.py's), turning its
prompt into ids and the engine's ids back into text (incrementally over bytes, so a character
split across tokens is sent whole), stop strings, OpenAI's response, stream and error shapes, so
the official clients work unchanged, and the Prometheus metrics of one app. Batching, the bounded
queue, deadlines and sampling are the engine's (nanollm.inference.engine); loading the weights,
the connection limit and running uvicorn are `nanollm serve`'s.

Nothing here blocks the event loop on the engine: each request is submitted with the loop and its
tokens awaited (Request.__aiter__), so one process serves many clients while the engine's own
thread decodes them as one batch. A client that goes away has its engine request cancelled,
which frees its batch slot before the next decode step.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client import Counter as PromCounter
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nanollm.inference.engine import Engine, QueueFull
from nanollm.inference.engine import Request as EngineRequest
from nanollm.inference.loading import document_prompt
from nanollm.inference.protocol import ApiError, parse_completion_request
from nanollm.tokenizer import Tokenizer

__all__ = ["create_app", "TextStream", "DEFAULT_MAX_BODY_BYTES", "RETRY_AFTER_S"]

log = logging.getLogger(__name__)

# A prompt must fit the model's context, a few hundred tokens of a few bytes each, so 1 MiB leaves room
# for any JSON escaping (up to 6 bytes a character) of a prompt that fits, while refusing a runaway
# upload before it is parsed.
DEFAULT_MAX_BODY_BYTES = 1 << 20
# Prompts longer than this are tokenized in a worker thread: a prompt that fits a small context
# costs the loop less than a decode step, while a long one (a large vocabulary's longest tokens
# let the prompt cap reach tens of KB) would stall every other client's stream.
_ENCODE_INLINE_CHARS = 2048
# Seconds a client refused for a full queue is asked to wait. The queue turns over as fast as
# requests finish (a row frees with every finished request), so a short wait is right; the
# official clients back off further on their own when refused again.
RETRY_AFTER_S = 1
# Buckets of the latency histograms, in seconds: first token from a few ms (idle server, short
# prompt) to a minute (a long queue); per output token from 1 ms (small model) to 1 s.
_FIRST_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_ROUTES = ("/v1/completions", "/v1/models", "/health", "/metrics")  # label values; any other path is "other"


async def _read_body(request: HttpRequest, limit: int) -> bytes:
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


# ---------------------------------------------------------------------------- ids to text


class TextStream:
    """Token ids in, text out: incremental UTF-8 over the tokens' bytes, cut before the first stop string.

    push() returns the text that is safe to send now: a character whose bytes are split across
    tokens is held until it is whole (invalid bytes become U+FFFD, as Tokenizer.decode does), and
    so is any tail of the text that could still grow into a stop string. Once a stop string
    appears, `stopped` is set and the text ends before it. finish() flushes what was held.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self._bytes_of = tokenizer.decode_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(stop)
        self.text = ""  # everything decoded so far, up to the stop string once one appeared
        self._sent = 0  # characters of `text` handed out
        self.stopped = False

    def push(self, token: int) -> str:
        return self._advance(self._decoder.decode(self._bytes_of([token])), final=False)

    def finish(self) -> str:
        return self._advance(self._decoder.decode(b"", final=True), final=True)

    def _advance(self, piece: str, *, final: bool) -> str:
        if self.stopped:
            return ""
        self.text += piece
        # No stop string can start before _sent: the text there was sent because no stop string
        # could begin in it, so searching from _sent finds the first one.
        hits = [i for s in self._stop if (i := self.text.find(s, self._sent)) >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            end = len(self.text)
        else:
            end = len(self.text) if final else len(self.text) - self._could_become_stop()
        out, self._sent = self.text[self._sent : end], end
        return out

    def _could_become_stop(self) -> int:
        """Length of the longest unsent tail of the text that is the start of a stop string."""
        longest = min(max((len(s) for s in self._stop), default=1) - 1, len(self.text) - self._sent)
        for size in range(longest, 0, -1):
            tail = self.text[-size:]
            if any(s.startswith(tail) for s in self._stop):
                return size
        return 0


# ---------------------------------------------------------------------------- the app


class _SubmittedRequests:
    """The engine requests this app submitted: how many still run, and how the others finished.

    Touched only from the event loop. "active" counts requests the engine has not finished, so
    after a cancellation it drops only once the engine has freed the slot.
    """

    def __init__(self) -> None:
        self._live: dict[int, EngineRequest] = {}
        self.finished: Counter[str] = Counter()

    def add(self, request: EngineRequest) -> None:
        self._prune()
        self._live[request.id] = request

    def snapshot(self) -> dict[str, Any]:
        self._prune()
        return {
            "active": len(self._live),
            "finished": {k: self.finished[k] for k in ("stop", "length", "cancelled", "timeout", "error")},
        }

    def _prune(self) -> None:
        for key, request in list(self._live.items()):
            if request.finish_reason is not None:
                self.finished[request.finish_reason] += 1
                del self._live[key]


class _Metrics:
    """The app's Prometheus metrics, in a registry of its own (several apps in one process never collide).

    Requests by route and status code (counted by _CountResponses, so refusals at the door
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


class _CountResponses:
    """ASGI middleware: counts every HTTP response by route and status code into _Metrics.requests."""

    def __init__(self, app: ASGIApp, metrics: _Metrics):
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


class _RequireApiKey:
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


@dataclass
class _Job:
    """One completion in flight: what was asked and how it is going."""

    id: str
    created: int
    model: str
    prompt_tokens: int
    request: EngineRequest
    text: TextStream
    metrics: _Metrics
    timeout: float | None  # the server's --request-timeout, for the message when the engine drops the request
    submitted: float  # time.perf_counter() at submission
    completion_tokens: int = 0

    def chunk(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [choice]}  # fmt: skip

    def usage(self) -> dict[str, int]:
        total = self.prompt_tokens + self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": total}

    async def text_chunks(self) -> AsyncIterator[str]:
        """The completion's text as it becomes safe to send; cancels the engine request at a stop string."""
        first = last = None
        try:
            async for tokens in self.request.batches():  # more than one when this loop lags behind the engine
                last = time.perf_counter()
                if first is None:
                    first = last
                    self.metrics.first_token.observe(first - self.submitted)
                texts = []
                for token in tokens:
                    self.completion_tokens += 1
                    self.metrics.tokens.inc()
                    texts.append(self.text.push(token))
                    if self.text.stopped:
                        break
                if text := "".join(texts):
                    yield text
                if self.text.stopped:
                    self.request.cancel()  # frees the slot now rather than after max_tokens
                    return
        except RuntimeError as err:
            if self.request.finish_reason != "error":
                raise
            raise ApiError(500, f"generation failed: {err}", kind="server_error") from None
        finally:
            if first is not None and last is not None and self.completion_tokens > 1:
                self.metrics.per_token.observe((last - first) / (self.completion_tokens - 1))
        text = self.text.finish()
        if text:
            yield text

    def finish_reason(self) -> str:
        """OpenAI's finish_reason once text_chunks() is exhausted: "stop" (end of text or a stop string) or
        "length"; ApiError 504 when the request ran out of time, 503 when the engine shut down under it."""
        if self.text.stopped:
            return "stop"
        reason = self.request.finish_reason
        if reason in ("stop", "length"):
            return reason
        if reason == "timeout":
            raise ApiError(
                504,
                f"the request did not finish within the server's limit of {self.timeout:g} s (--request-timeout), "
                "waiting in the queue included; lower max_tokens or retry when the server is less busy",
                kind="server_error",
                code="timeout",
            )
        raise ApiError(503, "the engine cancelled the request (the server is shutting down)", kind="server_error")


def create_app(
    engine: Engine,
    tokenizer: Tokenizer,
    *,
    model_name: str,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    api_key: str | None = None,
    request_timeout: float | None = None,
) -> FastAPI:
    """The ASGI app serving `engine` under the name `model_name`; run it with uvicorn.

    The app starts the engine when the server starts and closes it at shutdown, once the requests
    in flight have ended. A prompt's ids start with <|endoftext|> (loading.document_prompt): the
    completion begins a fresh document, as in `nanollm generate`; the engine's stop_id must be that token.
    With api_key, every /v1/* request must carry it as a bearer token. request_timeout (seconds)
    bounds each completion from submission, queue included: past it the engine drops the request
    (its row is freed) and the client gets 504, or an error event on a stream. A full engine queue
    (Engine(max_queue=...)) answers 503 with Retry-After at once.
    """
    submitted = _SubmittedRequests()
    metrics = _Metrics(engine)
    started = int(time.time())
    longest_token = max(1, int(tokenizer.token_byte_lengths().max()))  # bytes the longest token stands for

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.close()

    app = FastAPI(title="nanollm", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    if api_key is not None:
        app.add_middleware(_RequireApiKey, api_key=api_key)
    app.add_middleware(_CountResponses, metrics=metrics)  # added last: outermost, so it counts the 401s too

    @app.exception_handler(ApiError)
    async def api_error(request: HttpRequest, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: HttpRequest, err: HTTPException) -> JSONResponse:
        return await api_error(request, ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        limits = {"max_batch": engine.max_batch, "max_queue": engine.max_queue, "max_seq_len": engine.max_seq_len}
        return {"status": "ok", "model": model_name, **submitted.snapshot(), **limits, "engine": engine.stats()}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return metrics.exposition()

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": started, "owned_by": "nanollm"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        _check_model(name, model_name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(http: HttpRequest) -> Response:
        completion = parse_completion_request(await _read_body(http, max_body_bytes))
        _check_model(completion.model, model_name)
        prompt, stops, params = completion.prompt_text(), completion.stop_strings(), completion.sampling()
        _refuse_prompt_longer_than_context(prompt, engine.max_seq_len, longest_token)
        if len(prompt) <= _ENCODE_INLINE_CHARS:
            ids = document_prompt(tokenizer, prompt)
        else:
            ids = await asyncio.to_thread(document_prompt, tokenizer, prompt)
        if len(ids) + params.max_tokens > engine.max_seq_len:
            raise ApiError(
                400,
                f"this model's context is {engine.max_seq_len} tokens, but {len(ids)} prompt tokens + "
                f"max_tokens {params.max_tokens} = {len(ids) + params.max_tokens}; shorten the prompt or "
                "lower max_tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        try:
            request = engine.submit(ids, params, loop=asyncio.get_running_loop(), timeout=request_timeout)
        except ValueError as err:
            raise ApiError(400, str(err)) from None
        except QueueFull as err:
            raise ApiError(
                503,
                f"the server is busy ({err}); retry after {RETRY_AFTER_S} s",
                kind="server_error",
                code="server_overloaded",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None
        except RuntimeError as err:  # closed: the server is shutting down
            raise ApiError(503, f"not accepting requests ({err})", kind="server_error") from None
        submitted.add(request)
        job = _Job(
            f"cmpl-{uuid.uuid4().hex}", int(time.time()), model_name, len(ids), request, TextStream(tokenizer, stops),
            metrics, request_timeout, time.perf_counter(),
        )  # fmt: skip
        if completion.stream:
            usage = bool(completion.stream_options and completion.stream_options.include_usage)
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may hold the tokens back
            return StreamingResponse(_events(job, usage), media_type="text/event-stream", headers=headers)
        return await _json_completion(job, http)

    return app


def _check_model(name: str, served: str) -> None:
    if name != served:
        raise ApiError(
            404,
            f"The model {name!r} does not exist; this server serves {served!r}",
            param="model",
            code="model_not_found",
        )


def _refuse_prompt_longer_than_context(prompt: str, context: int, longest_token: int) -> None:
    """ApiError 400 for a prompt that cannot fit the context by its length alone, before any of it is tokenized.

    Every token stands for at most `longest_token` bytes, so a prompt of more than
    (context - 1) * longest_token bytes needs more tokens than fit beside <|endoftext|>. A prompt
    under that bound is tokenized whole (its cost bounded by the context) and then checked
    exactly, max_tokens included.
    """
    limit = (context - 1) * longest_token
    # len() counts characters, never more than the UTF-8 bytes: a prompt past it is refused without encoding
    if len(prompt) > limit or len(prompt.encode("utf-8", "surrogatepass")) > limit:
        raise ApiError(
            400,
            f"this model's context is {context} tokens, so a prompt may be at most {limit} bytes (no token covers "
            f"more than {longest_token}), and this one is longer; shorten the prompt",
            param="prompt",
            code="context_length_exceeded",
        )


async def _json_completion(job: _Job, http: HttpRequest) -> Response:
    """The completion as one JSON object; the engine request is cancelled if the client leaves first."""

    async def collect() -> str:
        return "".join([text async for text in job.text_chunks()])

    work = asyncio.ensure_future(collect())
    gone = asyncio.ensure_future(_disconnected(http))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            log.info("%s: client disconnected; request cancelled", job.id)
            return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"
        text = work.result()
        return JSONResponse({**job.chunk(text, job.finish_reason()), "usage": job.usage()})
    finally:
        for task in (work, gone):
            task.cancel()
        if job.request.finish_reason is None:
            job.request.cancel()


async def _disconnected(http: HttpRequest) -> None:
    """Return once the client has closed the connection (the body has been read, so only that message comes)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def _events(job: _Job, usage: bool) -> AsyncIterator[str]:
    """Server-sent events as OpenAI streams a completion: text chunks, a last chunk with finish_reason, [DONE].

    Starlette cancels this generator when the client disconnects; the finally then cancels the
    engine request, which frees its slot before the next decode step. A request that runs out of
    time ends with an error event (504's body) and no [DONE].
    """

    def event(data: dict[str, Any]) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    try:
        async for text in job.text_chunks():
            yield event(job.chunk(text, None))
        yield event(job.chunk("", job.finish_reason()))
        if usage:
            yield event({**job.chunk("", None), "choices": [], "usage": job.usage()})
        yield "data: [DONE]\n\n"
    except ApiError as err:
        yield event(err.body())  # the headers are gone: the error travels as an event, which the clients raise
    except Exception:
        log.exception("%s: streaming failed", job.id)
        yield event(ApiError(500, "internal error while generating", kind="server_error").body())
    finally:
        if job.request.finish_reason is None:
            job.request.cancel()
