"""The OpenAI-compatible HTTP face of the engine: POST /v1/completions (whole or streamed), GET /v1/models, GET /health.

Owns the HTTP side only: reading a request (what it may say is protocol.py's), turning its
prompt into ids and the engine's ids back into text (incrementally over bytes, so a character
split across tokens is sent whole), stop strings, and OpenAI's response and stream shapes, so
the official clients work unchanged. Batching, scheduling and sampling are the engine's
(nanollm.inference.engine); loading the weights and running uvicorn are `nanollm serve`'s.

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
from starlette.requests import ClientDisconnect

from nanollm.inference.engine import Engine
from nanollm.inference.engine import Request as EngineRequest
from nanollm.inference.loading import document_prompt
from nanollm.inference.protocol import ApiError, parse_completion_request
from nanollm.tokenizer import Tokenizer

__all__ = ["create_app", "TextStream", "DEFAULT_MAX_BODY_BYTES"]

log = logging.getLogger(__name__)

# A prompt must fit the model's context (256 tokens by default, ~1 KB of code), so 1 MiB leaves
# room for any JSON escaping of a prompt that fits while refusing a runaway upload before it is parsed.
DEFAULT_MAX_BODY_BYTES = 1 << 20
# Prompts longer than this are tokenized in a worker thread. Encoding takes ~0.2 ms per KB (2-core
# EPYC, vocab 4096): a prompt that fits the default context (~1 KB) costs the loop less than a decode
# step, while a megabyte (~0.2 s) would stall every other client's stream.
_ENCODE_INLINE_CHARS = 2048


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


class _Ledger:
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
            "finished": {k: self.finished[k] for k in ("stop", "length", "cancelled", "error")},
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
    completion_tokens: int = 0

    def chunk(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [choice]}  # fmt: skip

    def usage(self) -> dict[str, int]:
        total = self.prompt_tokens + self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": total}

    async def pieces(self) -> AsyncIterator[str]:
        """The completion's text as it becomes safe to send; cancels the engine request at a stop string."""
        try:
            async for tokens in self.request.batches():  # more than one when this loop lags behind the engine
                pieces = []
                for token in tokens:
                    self.completion_tokens += 1
                    pieces.append(self.text.push(token))
                    if self.text.stopped:
                        break
                if text := "".join(pieces):
                    yield text
                if self.text.stopped:
                    self.request.cancel()  # frees the slot now rather than after max_tokens
                    return
        except RuntimeError as err:
            if self.request.finish_reason != "error":
                raise
            raise ApiError(500, f"generation failed: {err}", kind="server_error") from None
        piece = self.text.finish()
        if piece:
            yield piece

    def finish_reason(self) -> str:
        """OpenAI's finish_reason once pieces() is exhausted: "stop" (end of text or a stop string) or "length"."""
        if self.text.stopped:
            return "stop"
        reason = self.request.finish_reason
        if reason in ("stop", "length"):
            return reason
        raise ApiError(503, "the engine cancelled the request (the server is shutting down)", kind="server_error")


def create_app(
    engine: Engine,
    tokenizer: Tokenizer,
    *,
    model_name: str,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The ASGI app serving `engine` under the name `model_name`; run it with uvicorn.

    The app starts the engine when the server starts and closes it at shutdown, once the requests
    in flight have ended. A prompt's ids start with <|endoftext|> (loading.document_prompt): the
    completion begins a fresh document, as in `nanollm generate`; the engine's stop_id must be that token.
    """
    ledger = _Ledger()
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.close()

    app = FastAPI(title="nanollm", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request: HttpRequest, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: HttpRequest, err: HTTPException) -> JSONResponse:
        return await api_error(request, ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        limits = {"max_batch": engine.max_batch, "max_seq_len": engine.max_seq_len}
        return {"status": "ok", "model": model_name, **ledger.snapshot(), **limits, "engine": engine.stats()}

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
        ask = parse_completion_request(await _read_body(http, max_body_bytes))
        _check_model(ask.model, model_name)
        prompt, stops, params = ask.prompt_text(), ask.stop_strings(), ask.sampling()
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
            request = engine.submit(ids, params, loop=asyncio.get_running_loop())
        except ValueError as err:
            raise ApiError(400, str(err)) from None
        except RuntimeError as err:  # closed: the server is shutting down
            raise ApiError(503, f"not accepting requests ({err})", kind="server_error") from None
        ledger.add(request)
        job = _Job(
            f"cmpl-{uuid.uuid4().hex}", int(time.time()), model_name, len(ids), request, TextStream(tokenizer, stops)
        )
        if ask.stream:
            usage = bool(ask.stream_options and ask.stream_options.include_usage)
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may hold the tokens back
            return StreamingResponse(_events(job, usage), media_type="text/event-stream", headers=headers)
        return await _whole(job, http)

    return app


def _check_model(name: str, served: str) -> None:
    if name != served:
        raise ApiError(
            404,
            f"The model {name!r} does not exist; this server serves {served!r}",
            param="model",
            code="model_not_found",
        )


async def _whole(job: _Job, http: HttpRequest) -> Response:
    """The completion as one JSON object; the engine request is cancelled if the client leaves first."""

    async def collect() -> str:
        return "".join([piece async for piece in job.pieces()])

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
    engine request, which frees its slot before the next decode step.
    """

    def event(data: dict[str, Any]) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    try:
        async for piece in job.pieces():
            yield event(job.chunk(piece, None))
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
