"""Decoding speed where serving needs it: the batching engine at several batch sizes, per kind of weights.

Owns the measurement the bench stage adds to the KV-cache table: the tokens/s of the
continuous-batching engine (nanollm.inference.engine) at each batch size, with the model's
weights and with int8 weights (nanollm.inference.quantize). Batch 1 is also the batch-1
comparison of the two kinds of weights: at batch 1 the engine runs generate's own cached step.
Every round runs every (weights, batch) pair, the kinds of weights side by side at each batch
size, in an order that flips every round (timing.round_orders, as the KV-cache table's rounds):
so int8 and fp32 are timed under the same conditions, each leading equally often. Figures are
medians. The rows go to results.py (CSV, metrics), chart.py and report.py.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import torch
from torch import nn

from nanollm.inference.bench.timing import Row, round_orders, sync
from nanollm.inference.engine import Engine, SamplingParams, generate_batch

__all__ = ["BATCH_COLUMNS", "bench_batching"]

log = logging.getLogger(__name__)

# One row per (weights, batch): total new tokens/s, each sequence's share, and the gain over batch 1.
BATCH_COLUMNS = ("weights", "batch", "tok_s", "per_sequence_tok_s", "vs_batch1")
T = TypeVar("T")


def _alternating(runs: Mapping[T, Callable[[], float]], warmup: int, repeats: int) -> dict[T, float]:
    """Median of each run's figure over `repeats` timed rounds after `warmup`, in round_orders' order."""
    samples: dict[T, list[float]] = {name: [] for name in runs}
    for timed, names in round_orders(list(runs), warmup, repeats):
        for name in names:
            value = runs[name]()
            if timed:
                samples[name].append(value)
    return {name: statistics.median(values) for name, values in samples.items()}


def bench_batching(
    models: Mapping[str, nn.Module],
    *,
    batch_sizes: Sequence[int],
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    warmup: int,
    seed: int,
    device: torch.device,
    compiled: bool = False,
) -> list[Row]:
    """Tokens/s of the batching engine decoding `batch` sequences at once, for every model and batch size.

    Each sequence has its own seeded random prompt of prompt_len tokens and decodes
    new_tokens greedy tokens; the clock covers what a server does for them: the prefills
    (one per sequence, as they join) and every batched decode step. tok_s counts every
    sequence's tokens; vs_batch1 divides it by the same weights' rate at batch 1 (when 1
    is among the batch sizes).

    compiled=True adds, for every kind of weights, "<weights>_compiled": the engine decoding
    through its compiled step. That engine is made once per batch size and compiled in full
    before the rounds (its compile time is not a server's steady state; compiled.py reports
    it), and each round submits the batch's requests to it and steps until they are done.
    """
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, 2**31 - 1, (max(batch_sizes), prompt_len), generator=gen)
    params = SamplingParams(max_tokens=new_tokens, temperature=0)

    def run(model: nn.Module, batch: int) -> Callable[[], float]:
        ids = (prompts[:batch] % model.vocab_size).tolist()

        def once() -> float:
            sync(device)
            t0 = time.perf_counter()
            out = generate_batch(model, ids, params, max_batch=batch)
            sync(device)
            return sum(map(len, out)) / (time.perf_counter() - t0)

        return once

    engines: list[Engine] = []

    def run_compiled(model: nn.Module, batch: int) -> Callable[[], float]:
        ids = (prompts[:batch] % model.vocab_size).tolist()
        engine = Engine(model, max_batch=batch, max_seq_len=prompt_len + new_tokens, compile=True)
        engine.warmup([batch])  # a full batch decodes in the largest bucket: the one to compile up front
        engines.append(engine)

        def once() -> float:
            sync(device)
            t0 = time.perf_counter()
            requests = [engine.submit(p, params) for p in ids]
            while not engine.idle():
                engine.step()
            sync(device)
            return sum(len(r.tokens) for r in requests) / (time.perf_counter() - t0)

        return once

    kinds = {w: (m, run) for w, m in models.items()}
    if compiled:
        kinds.update({f"{w}_compiled": (m, run_compiled) for w, m in models.items()})
    # (weights, batch) -> its timed call; at each batch size the kinds of weights are neighbours
    runs = {(weights, b): make(model, b) for b in batch_sizes for weights, (model, make) in kinds.items()}
    try:
        rates = _alternating(runs, warmup, repeats)
    finally:
        for engine in engines:
            engine.close()
    rows = []
    for weights in kinds:
        for b in batch_sizes:
            rate = rates[weights, b]
            row: Row = {"weights": weights, "batch": b, "tok_s": rate, "per_sequence_tok_s": rate / b}
            if 1 in batch_sizes:
                row["vs_batch1"] = rate / rates[weights, 1]
            log.info("%s weights, batch %d: %.0f tok/s (%.0f per sequence)", weights, b, rate, rate / b)
            rows.append(row)
    return rows
