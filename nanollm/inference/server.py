"""The OpenAI-compatible HTTP face of the engine: POST /v1/completions (whole or streamed), GET /v1/models,
GET /health, GET /metrics.

Owns the protocol side of HTTP: reading a request (what it may say is protocol.py's), refusing a
prompt by its length before it is tokenized, turning its prompt into ids and the engine's ids back
into text (incrementally over bytes, so a character split across tokens is sent whole), stop
strings, OpenAI's response, stream and error shapes, so the official clients work unchanged. The
doors an operator sets and watches (the API key on /v1/*, the body cap, response counting and the
Prometheus metrics) are server_guards.py's. Batching, the bounded queue, deadlines and sampling
are the engine's (nanollm.inference.engine); loading the weights, the connection limit and running
uvicorn are `nanollm serve`'s.

Nothing here blocks the event loop on the engine: each request is submitted with the loop and its
tokens awaited (Request.__aiter__), so one process serves many clients while the engine's own
thread decodes them as one batch. A client that goes away has its engine request cancelled,
which frees its batch slot before the next decode step.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
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
from starlette.exceptions import HTTPException

from nanollm.inference.engine import Engine, QueueFull
from nanollm.inference.engine import Request as EngineRequest
from nanollm.inference.loading import document_prompt
from nanollm.inference.protocol import ApiError, parse_completion_request
from nanollm.inference.server_guards import (
    DEFAULT_MAX_BODY_BYTES,
    CountResponses,
    RequireApiKey,
    ServerMetrics,
    read_capped_body,
)
from nanollm.tokenizer import Tokenizer

__all__ = ["create_app", "TextStream", "DEFAULT_MAX_BODY_BYTES", "RETRY_AFTER_S"]

log = logging.getLogger(__name__)

# Prompts longer than this are tokenized in a worker thread: a prompt that fits a small context
# costs the loop less than a decode step, while a long one (a large vocabulary's longest tokens
# let the prompt cap reach tens of KB) would stall every other client's stream.
_ENCODE_INLINE_CHARS = 2048
# Seconds a client refused for a full queue is asked to wait. The queue turns over as fast as
# requests finish (a row frees with every finished request), so a short wait is right; the
# official clients back off further on their own when refused again.
RETRY_AFTER_S = 1


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


@dataclass
class _Job:
    """One completion in flight: what was asked and how it is going."""

    id: str
    created: int
    model: str
    prompt_tokens: int
    request: EngineRequest
    text: TextStream
    metrics: ServerMetrics
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
    metrics = ServerMetrics(engine)
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
        app.add_middleware(RequireApiKey, api_key=api_key)
    app.add_middleware(CountResponses, metrics=metrics)  # added last: outermost, so it counts the 401s too

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
        completion = parse_completion_request(await read_capped_body(http, max_body_bytes))
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
