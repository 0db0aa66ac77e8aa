"""Continuous batching: many sequences decoded together, one batched forward per step.

Owns the scheduler (a queue of waiting requests, a fixed pool of cache rows, one step that
prefills newcomers and decodes everyone else) and the hand-off of tokens to whoever waits
for them, in a thread or on an asyncio loop. It works on token ids only: the HTTP layer
(server.py) turns text into requests and tokens back into text. The model owns the cache
and its ragged decode step (Transformer.cache_rows, RaggedStep).

Why it pays: decoding one token reads every weight once, whatever the batch, so at batch 1
a step is bound by memory bandwidth and the matrix units idle. B sequences in one step read
the weights once for B tokens; until the step turns compute-bound, throughput grows almost
linearly with B. A request that joins mid-flight does not wait for the others to finish
(static batching's flaw): it is prefilled between two steps and decodes with the rest from
the next one, and a finished sequence frees its row at once.

Admission is bounded: at most max_batch sequences run and max_queue more wait; submit()
refuses the next one at once (QueueFull) instead of letting the queue, and every waiting
client's latency, grow without end. A request may carry a deadline: past it, it leaves the
queue or the batch before the next step and finishes as "timeout".

The rows of the cache stay compact: the active sequences are rows [0, n), so a step reads
the cache as one slice. A sequence that leaves is replaced by the last row (its K/V copied
over, a few KB per layer), never by a gather each step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nanollm.inference.compiled import CompiledDecoder
from nanollm.inference.generate import sample_next
from nanollm.model.attention import RaggedStep

__all__ = ["Engine", "QueueFull", "Request", "SamplingParams", "generate_batch"]

log = logging.getLogger(__name__)

_DONE = object()  # end-of-stream marker in a request's queue


class QueueFull(Exception):
    """submit() found the engine holding max_batch + max_queue requests already: come back later."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. temperature 0 is greedy; seed None takes one from the engine's stream."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


class Request:
    """One sequence in the engine: its prompt, its parameters and the tokens it has drawn so far.

    Tokens arrive through a queue, read by iterating (a blocking thread) or by `async for`
    (when submitted with an asyncio loop; the engine thread then hands each token to that
    loop). finish_reason is "stop" (the engine's stop id was drawn; it is not yielded),
    "length" (max_tokens drawn), "cancelled", "timeout" (its deadline passed, waiting or
    running) or "error"; None while running.
    """

    def __init__(
        self,
        rid: int,
        prompt_ids: list[int],
        params: SamplingParams,
        loop: asyncio.AbstractEventLoop | None,
        outbox: list[Request],
        deadline: float | None = None,
    ):
        self.id, self.prompt_ids, self.params = rid, prompt_ids, params
        self.deadline = deadline  # time.monotonic() past which the engine drops it; None: never
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.tokens: list[int] = []  # drawn so far (the engine thread appends)
        self._cancelled = threading.Event()
        self._loop = loop
        self._queue: queue.SimpleQueue[Any] | asyncio.Queue[Any] = asyncio.Queue() if loop else queue.SimpleQueue()
        # Loop-bound requests park their items here until the engine's end of step hands every
        # request of a loop its items in one call: one wake-up of the loop per step, not per token.
        self._pending: list[Any] = []
        self._outbox = outbox
        self.generator: torch.Generator | None = None  # set by the engine on admission

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _leaving(self, now: float) -> str | None:
        """Why the engine should drop this request now ("cancelled", "timeout"), or None to keep it."""
        if self._cancelled.is_set():
            return "cancelled"
        if self.deadline is not None and now >= self.deadline:
            return "timeout"
        return None

    def cancel(self) -> None:
        """Ask the engine to drop this request; thread-safe. Its row is freed before the next decode step."""
        self._cancelled.set()

    # -- engine side (the engine thread only)

    def _put(self, item: Any) -> None:
        if self._loop is None:
            self._queue.put(item)  # type: ignore[union-attr]
            return
        if not self._pending:
            self._outbox.append(self)
        self._pending.append(item)

    def _emit(self, token: int) -> None:
        self.tokens.append(token)
        self._put(token)

    def _finish(self, reason: str, error: str | None = None) -> None:
        self.finish_reason, self.error = reason, error
        self._put(_DONE)

    # -- consumer side

    def _check(self) -> None:
        if self.finish_reason == "error":
            raise RuntimeError(f"request {self.id} failed in the engine: {self.error}")

    def __iter__(self) -> Iterator[int]:
        if self._loop is not None:
            raise TypeError("this request was submitted with an event loop: read it with `async for`")
        while (item := self._queue.get()) is not _DONE:  # type: ignore[union-attr]
            yield item
        self._check()

    async def _aiter(self) -> AsyncIterator[int]:
        while (item := await self._queue.get()) is not _DONE:  # type: ignore[misc]
            yield item
        self._check()

    async def batches(self) -> AsyncIterator[list[int]]:
        """As `async for`, but every token that has arrived by the time the reader looks, as one list.

        A reader that keeps up gets one token per engine step; one that lags (a busy event loop
        serving many streams) catches up in one wake-up instead of one per token.
        """
        if self._loop is None:
            raise TypeError("submit with loop=asyncio.get_running_loop() to read a request with `async for`")
        q: asyncio.Queue[Any] = self._queue  # type: ignore[assignment]
        while True:
            out, item = [], await q.get()
            while item is not _DONE:
                out.append(item)
                if q.empty():
                    break
                item = q.get_nowait()
            if out:
                yield out
            if item is _DONE:
                self._check()
                return

    def __aiter__(self) -> AsyncIterator[int]:
        if self._loop is None:
            raise TypeError("submit with loop=asyncio.get_running_loop() to read a request with `async for`")
        return self._aiter()


def _hand_over(by_loop: dict[asyncio.AbstractEventLoop, list[Request]]) -> None:
    """Move each request's pending items into its asyncio queue, with one call into each loop."""
    for loop, requests in by_loop.items():
        batch = []
        for request in requests:
            batch.append((request._queue, request._pending))
            request._pending = []
        if not loop.is_closed():
            loop.call_soon_threadsafe(_put_all, batch)


def _put_all(batch: list[tuple[asyncio.Queue[Any], list[Any]]]) -> None:
    for q, items in batch:
        for item in items:
            q.put_nowait(item)


@dataclass
class _Slot:
    """An admitted request: its row is its index in Engine._slots; pos is where its next token goes."""

    request: Request
    pos: int
    last: int  # the token to feed at pos
    drawn: int = 1  # tokens drawn so far, the prefill's included


class Engine:
    """Continuous batching over a model's KV cache: up to max_batch sequences, up to max_seq_len positions each.

    submit() is thread-safe; start() runs the steps in a background thread (close() stops it
    and cancels what is left), or a caller drives them with step() (generate_batch does).
    Every sequence's greedy output equals its batch-1 output up to floating-point rounding:
    a batched matmul may round differently from a single-row one, which can flip the argmax
    only where the top two logits nearly tie (tests/test_engine.py checks exactly that).
    Memory: the cache holds max_batch * max_seq_len positions (Transformer.cache_bytes).
    max_queue bounds the requests waiting for a row (None: no bound, for callers that submit
    a known list, like generate_batch); submit() raises QueueFull past max_batch + max_queue.
    compile=True decodes through a CompiledDecoder (compiled.py) over the same rows: each
    step is one call into code compiled per batch bucket, prefill stays eager; warmup()
    compiles every bucket before the first request needs one.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        max_batch: int = 16,
        max_seq_len: int | None = None,
        max_queue: int | None = None,
        stop_id: int | None = None,
        seed: int = 0,
        compile: bool = False,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue is not None and max_queue < 0:
            raise ValueError(f"max_queue must be >= 0 or None, got {max_queue}")
        self.model, self.max_batch, self.max_queue, self.stop_id = model, max_batch, max_queue, stop_id
        self.max_seq_len = max_seq_len or model.cfg.block_size
        self.device = next(model.parameters()).device
        self._waiting: deque[Request] = deque()
        self._slots: list[_Slot] = []
        self._ids = itertools.count()
        self._seeds = torch.Generator().manual_seed(seed)  # seeds for requests that bring none
        self._outbox: list[Request] = []  # loop-bound requests with items to hand over at the end of the step
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0  # decode steps taken (a prefill is not one)
        self.finished = 0
        self.cancelled = 0
        self.timed_out = 0
        self.decoder: CompiledDecoder | None = None
        if compile:
            self.decoder = CompiledDecoder(model, max_batch=max_batch, max_seq_len=self.max_seq_len)
        else:
            with torch.inference_mode():
                model.setup_cache(max_batch, self.max_seq_len)

    def warmup(self, buckets: Sequence[int] | None = None) -> float:
        """Compile the decode step for every batch bucket (or those named) now; returns the seconds (0 without
        compile)."""
        return self.decoder.warmup(buckets) if self.decoder is not None else 0.0

    # ------------------------------------------------------------------ public

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        timeout: float | None = None,
    ) -> Request:
        """Queue a request; it joins the batch between two steps. Raises ValueError when it cannot fit and
        QueueFull when max_batch requests run and max_queue wait already. After `timeout` seconds (from now,
        the wait in the queue included) it leaves the engine with finish_reason "timeout"."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt needs at least one token")
        if len(prompt) + params.max_tokens > self.max_seq_len:
            raise ValueError(
                f"prompt of {len(prompt)} tokens + max_tokens {params.max_tokens} exceeds the context of "
                f"{self.max_seq_len} tokens"
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        request = Request(next(self._ids), prompt, params, loop, self._outbox, deadline)
        with self._wake:
            if self._stopping:
                raise RuntimeError("the engine is closed")
            if self.max_queue is not None and len(self._slots) + self._queued() >= self.max_batch + self.max_queue:
                raise QueueFull(f"{self.max_batch} requests run and {self.max_queue} wait already")
            self._waiting.append(request)
            self._wake.notify()
        return request

    def stats(self) -> dict[str, int | None]:
        """Counts for a health route: running, waiting, free rows, limits, steps, how requests ended."""
        return {
            "running": len(self._slots),
            "waiting": self._queued(),
            "free_slots": self.max_batch - len(self._slots),
            "max_batch": self.max_batch,
            "max_queue": self.max_queue,
            "steps": self.steps,
            "finished": self.finished,
            "cancelled": self.cancelled,
            "timed_out": self.timed_out,
        }

    def _queued(self) -> int:
        """Waiting requests that still want a row (a cancelled one leaves at the next step)."""
        return sum(not request.cancelled for request in list(self._waiting))

    def idle(self) -> bool:
        return not self._slots and not self._waiting

    def start(self) -> Engine:
        """Run the steps in a daemon thread until close()."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="nanollm-engine", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread, cancel every request still queued or running, free the cache."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for request in [*self._waiting, *(slot.request for slot in self._slots)]:
            if not request.done:
                request._finish("cancelled")
        self._waiting.clear()
        self._slots.clear()
        self._flush()
        if self.decoder is not None:
            self.decoder.close()
        else:
            self.model.clear_cache()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ the step

    def step(self) -> None:
        """One scheduling round: drop cancelled and expired requests, prefill newcomers into free rows, decode
        every row once."""
        try:
            self._step()
        finally:
            self._flush()

    @torch.inference_mode()
    def _step(self) -> None:
        if self.decoder is not None:
            self.decoder.attach()  # another user of the model (eager decoding, another engine) may have replaced it
        self._drop_leavers()
        self._admit()
        if not self._slots:
            return
        tokens = torch.tensor([[slot.last] for slot in self._slots], dtype=torch.long, device=self.device)  # (B, 1)
        positions = [slot.pos for slot in self._slots]
        if self.decoder is not None:
            logits = self.decoder(tokens, positions)  # (B, V)
        elif len(set(positions)) == 1:
            # every row at one position (always so at batch 1): the plain cached step, no mask to build or apply
            logits = self.model(tokens, positions[0])[:, -1, :]  # (B, V)
        else:
            logits = self.model(tokens, RaggedStep.at(positions, self.device))[:, -1, :]  # (B, V)
        drawn = self._draw(logits, [slot.request for slot in self._slots])
        self.steps += 1
        for slot, token in zip(self._slots, drawn, strict=True):
            slot.pos += 1
            slot.drawn += 1
            self._deliver(slot, token)
        self._release_finished()

    def _flush(self) -> None:
        """Hand the step's tokens to the asyncio loops waiting for them: one call into each loop."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[Request]] = {}
        for request in self._outbox:
            by_loop.setdefault(request._loop, []).append(request)  # type: ignore[arg-type]
        self._outbox.clear()
        _hand_over(by_loop)

    def _drop_leavers(self) -> None:
        """Finish the cancelled and expired requests, running or waiting, and free their rows and places."""
        now = time.monotonic()
        for slot in self._slots:
            if not slot.request.done and (reason := slot.request._leaving(now)):
                self._leave(slot.request, reason)
        with self._wake:
            leaving = [(request, reason) for request in self._waiting if (reason := request._leaving(now))]
            if leaving:
                gone = {id(request) for request, _ in leaving}
                self._waiting = deque(request for request in self._waiting if id(request) not in gone)
        for request, reason in leaving:
            self._leave(request, reason)
        self._release_finished()

    def _leave(self, request: Request, reason: str) -> None:
        if reason == "timeout":
            self.timed_out += 1
        else:
            self.cancelled += 1
        request._finish(reason)

    def _admit(self) -> None:
        """Prefill waiting requests, one at a time, into the rows after the last active one."""
        while len(self._slots) < self.max_batch:
            with self._wake:
                if not self._waiting:
                    return
                request = self._waiting.popleft()
            if reason := request._leaving(time.monotonic()):
                self._leave(request, reason)
                continue
            seed = request.params.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,), generator=self._seeds))
            request.generator = torch.Generator().manual_seed(seed)
            row = len(self._slots)
            prompt = torch.tensor([request.prompt_ids], dtype=torch.long, device=self.device)  # (1, T)
            try:
                with self.model.cache_rows(row, row + 1):
                    logits = self.model(prompt, 0, last_only=True)[:, -1, :]  # (1, V)
                token = self._draw(logits, [request])[0]
            except Exception as err:  # e.g. an id outside the vocabulary: this request fails, the others go on
                log.exception("prefill of request %d failed", request.id)
                request._finish("error", f"{type(err).__name__}: {err}")
                continue
            slot = _Slot(request, pos=len(request.prompt_ids), last=token)
            self._slots.append(slot)
            self._deliver(slot, token)
            if request.done:
                self._release_finished()

    def _draw(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        """One token per row: greedy rows share one argmax; sampled rows each draw from their own generator."""
        greedy = logits.argmax(dim=-1).tolist()  # (B,) as ints: the one host sync of the step
        out = []
        for i, request in enumerate(requests):
            p = request.params
            if p.temperature == 0:
                out.append(greedy[i])
            else:
                token = sample_next(
                    logits[i : i + 1],
                    temperature=p.temperature,
                    top_k=p.top_k,
                    top_p=p.top_p,
                    generator=request.generator,
                )
                out.append(int(token))
        return out

    def _deliver(self, slot: _Slot, token: int) -> None:
        request = slot.request
        if token == self.stop_id:
            request._finish("stop")
            return
        request._emit(token)
        slot.last = token
        if slot.drawn >= request.params.max_tokens:
            request._finish("length")

    def _release_finished(self) -> None:
        """Free the rows of finished sequences, moving the last active row into each hole."""
        row = 0
        while row < len(self._slots):
            if not self._slots[row].request.done:
                row += 1
                continue
            if self._slots[row].request.finish_reason not in ("cancelled", "timeout"):
                self.finished += 1
            last = len(self._slots) - 1
            if row != last:
                moved = self._slots[last]
                self.model.move_cache_row(last, row, moved.pos)  # positions [0, pos) hold its K/V
                self._slots[row] = moved
            self._slots.pop()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and self.idle():
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as err:  # a bug or an out-of-memory: fail the requests in flight, keep serving
                log.exception("engine step failed")
                for slot in self._slots:
                    if not slot.request.done:
                        slot.request._finish("error", f"{type(err).__name__}: {err}")
                self._slots.clear()
                self._flush()


def generate_batch(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams],
    *,
    max_batch: int | None = None,
    max_seq_len: int | None = None,
    stop_id: int | None = None,
    compile: bool = False,
) -> list[list[int]]:
    """Decode several prompts together in the caller's thread; returns each one's new token ids, in order.

    params is one SamplingParams for all or one per prompt. The cache is sized for the
    longest prompt plus its max_tokens unless max_seq_len says otherwise; max_batch defaults
    to all the prompts at once. compile: decode through the compiled step (Engine's compile).
    """
    per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(per_prompt) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(per_prompt)} SamplingParams")
    if not prompts:
        return []
    need = max(len(p) + sp.max_tokens for p, sp in zip(prompts, per_prompt, strict=True))
    engine = Engine(
        model, max_batch=max_batch or len(prompts), max_seq_len=max_seq_len or need, stop_id=stop_id, compile=compile
    )
    try:
        requests = [engine.submit(p, sp) for p, sp in zip(prompts, per_prompt, strict=True)]
        while not engine.idle():
            engine.step()
    finally:
        engine.close()
    for request in requests:
        request._check()
    return [request.tokens for request in requests]
