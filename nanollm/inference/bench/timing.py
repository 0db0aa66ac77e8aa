"""The timing protocol of the KV-cache benchmark, and the rows it produces.

Owns how a point is measured: seeded nested prompts, warm-up rounds, timed rounds whose order
alternates between ours and the peer's, medians, and a clock that waits for the device. Each
round's tokens go to equality.py; the rows (COLUMNS) go to results.py, chart.py and report.py.
"""

from __future__ import annotations

import functools
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import nn
from tqdm import tqdm

from nanollm.inference.bench.equality import check_same, first_difference
from nanollm.inference.compiled import CompiledDecoder
from nanollm.inference.generate import generate
from nanollm.inference.peers import PEER_CACHES

__all__ = [
    "COLUMNS",
    "COMPILED_COLUMNS",
    "COMPILED_COUNTERPART_COLUMN",
    "COUNTERPART_COLUMN",
    "PEER_COLUMNS",
    "TEXT_COLUMNS",
    "Peer",
    "Row",
    "bench_kvcache",
    "round_orders",
    "speedup",
    "sync",
    "timed_greedy",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
Row = dict[str, Any]  # COLUMNS -> int (prompt_len, new_tokens), str (transformers_peer) or float
Peer = Callable[[torch.Tensor, int], list[int]]  # (prompt ids (T,), n) -> n greedy ids

# Only when compared with transformers: its tokens/s with each cache, which cache was the
# faster (the peer), the peer's tokens/s and ours over it.
PEER_COLUMNS = (
    *(f"transformers_{cache}_tok_s" for cache in PEER_CACHES),
    "transformers_peer",
    "transformers_tok_s",
    "vs_transformers",
)
TEXT_COLUMNS = ("transformers_peer",)
# Added by the bench stage where the peer ran on the model's Llama counterpart (an architecture
# transformers cannot express): our cached tokens/s on that counterpart, which vs_transformers divides.
COUNTERPART_COLUMN = "counterpart_cached_tok_s"
# ...and, with the compiled step, our compiled tokens/s on that counterpart (compiled_vs_transformers' numerator)
COMPILED_COUNTERPART_COLUMN = "counterpart_compiled_tok_s"
# Only with the compiled decode step (compiled.py): its tokens/s and time to first token, the
# seconds its first call at the point took (the compile), its gain over the eager cached path and,
# with the peer, over the peer.
COMPILED_COLUMNS = (
    "compiled_tok_s",
    "compiled_ttft_ms",
    "compile_s",
    "compiled_vs_cached",
    "compiled_speedup",
    "compiled_vs_transformers",
)
COLUMNS = (
    "prompt_len",
    "new_tokens",
    "cached_tok_s",
    "uncached_tok_s",
    "speedup",
    "cached_ttft_ms",
    "uncached_ttft_ms",
    "cache_mb",
    *PEER_COLUMNS,
    *COMPILED_COLUMNS,
)


def round_orders(names: Sequence[T], warmup: int, repeats: int) -> Iterator[tuple[bool, Sequence[T]]]:
    """(timed, order) for each of `warmup` + `repeats` rounds: the order a round runs `names` in.

    The first timed round runs them as given, the next in reverse, and so on: with an even
    `repeats` each leads equally often, so ordering effects (a neighbour evicting the weights
    from cache, the clock speed ramping, a busy host settling) fall on every side alike.
    """
    for round_ in range(warmup + repeats):
        yield round_ >= warmup, names if (round_ - warmup) % 2 == 0 else names[::-1]


def sync(device: torch.device) -> None:
    """Wait for the device's queued kernels: read the clock only once they are done (CUDA is async)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_greedy(
    model: nn.Module,
    prompt: torch.Tensor,
    new_tokens: int,
    *,
    use_cache: bool,
    device: torch.device,
    decoder: CompiledDecoder | None = None,
) -> tuple[list[int], float, float]:
    """Greedy-decode once (through `decoder`'s compiled step when given); returns (tokens, seconds to first
    token, seconds in total).

    The clock covers what a user waits for: cache allocation (the decoder's is allocated
    once, up front), prefill, every decode step and the host read-back of each token.
    """
    out: list[int] = []
    first = 0.0
    sync(device)
    t0 = time.perf_counter()
    for token in generate(model, prompt, new_tokens, temperature=0.0, use_cache=use_cache, decoder=decoder):
        if not out:
            sync(device)
            first = time.perf_counter() - t0
        out.append(token)
    sync(device)
    return out, first, time.perf_counter() - t0


def _timed_peer(
    peer: Peer, prompt: torch.Tensor, new_tokens: int, device: torch.device
) -> tuple[list[int], float, float]:
    """(tokens, nan, seconds) of one greedy decode by the peer, clocked like ours (prompt in, ids on the host).

    generate returns every token at once, so there is no time to first token (nan).
    """
    sync(device)
    t0 = time.perf_counter()
    out = peer(prompt, new_tokens)
    sync(device)
    return out, math.nan, time.perf_counter() - t0


def speedup(cached_tok_s: float, uncached_tok_s: float) -> float:
    """How many times faster decoding is with the cache than without (cached / uncached tokens/s)."""
    return cached_tok_s / uncached_tok_s if uncached_tok_s > 0 else float("inf")


def _cache_bytes(model: nn.Module, seq_len: int) -> int:
    model.setup_cache(1, seq_len)
    try:
        return int(model.cache_bytes())
    finally:
        model.clear_cache()


def bench_kvcache(
    model: nn.Module,
    *,
    prompt_lengths: Sequence[int],
    new_tokens: Sequence[int],
    repeats: int,
    warmup: int,
    seed: int,
    device: str | torch.device | None = None,
    transformers: Mapping[str, Peer] | None = None,
    uncached: bool = True,
    compiled: bool = False,
    min_seconds: float = 0.0,
) -> list[Row]:
    """Time greedy decoding with and without the KV cache for every (prompt_len, new_tokens) pair.

    Prompts are random token ids from a generator seeded with `seed`, nested (each prompt
    is a prefix of the longest), so every run of the benchmark sees the same ones. Each
    point runs `warmup` untimed then `repeats` timed rounds, each round one cached and one
    uncached decode (the untimed rounds skip the uncached one: it warms nothing, and at a long
    prompt it is the slowest run of the point); reported figures are medians. With
    `min_seconds`, a timed round runs each setting again until its runs in that round add
    up to min_seconds, each run one sample: a compiled decode of 256 tokens takes a tenth of
    a second, the uncached one at a long prompt many seconds, and the fast settings' medians
    need more than `repeats` samples to be steady on a shared host. tokens/s is end to end: new_tokens over
    the whole wall time, prefill included, so a long prompt lowers it for both modes; ttft
    is prefill plus the first token. Every run's tokens must equal those of the other mode
    up to a near-tie (see equality.check_same), else KVCacheMismatchError names the point.
    cache_mb is the cache preallocated for prompt + new tokens, in MB (1e6 bytes).
    `device` defaults to the model's; it must be where the model lives. The model's weights
    are first moved to their decode layout (Transformer.pack_for_decode), as the stages do
    before decoding, so the cached and the uncached path both read that layout.

    `transformers` ({cache setting: greedy function}, nanollm.inference.peers.transformers_settings)
    adds each setting to every round, on the same prompt, clocked the same way:
    transformers_{setting}_tok_s is its median; the faster setting at the point is the peer
    (transformers_peer names it, transformers_tok_s is its rate) and vs_transformers is our
    cached tokens/s over the peer's. Within a round the order alternates: ours first on the
    first timed round, the peer's settings first (in reverse order) on the next, and so on,
    so with an even `repeats` each side leads equally often and ordering effects (a
    neighbour evicting the weights from cache, the clock speed ramping) cancel in the
    medians. The peer's tokens are compared with ours and a difference is logged (float
    rounding can flip a near-tie on a trained model), not raised: the peer is measured,
    not trusted.

    uncached=False times only the cached path (and the peer): the rows lack the uncached and
    speedup columns. The bench stage uses it for the engines' comparison alone.

    compiled=True adds the compiled decode step (nanollm.inference.compiled) to every round:
    a CompiledDecoder per point, its cache sized to the point as generate sizes its own, so
    the two cached paths attend over the same positions. It compiles before the rounds, on
    no clock; compile_s records what that cost. Its tokens must equal the plain path's up to
    a near-tie, as the cached path's do.
    """
    if transformers is not None and not set(transformers) <= set(PEER_CACHES):
        raise ValueError(f"transformers settings must be among {PEER_CACHES}, got {sorted(transformers)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.pack_for_decode()  # decode in the layout every decoding stage uses; both paths read it
    gen = torch.Generator().manual_seed(seed)
    longest = torch.randint(0, model.vocab_size, (max(prompt_lengths),), generator=gen)
    points = [(p, n) for p in prompt_lengths for n in new_tokens]
    rows = []
    for prompt_len, n_new in tqdm(points, desc="bench_kvcache", unit="point", disable=None):
        prompt = longest[:prompt_len].to(device)
        row = _measure_point(
            model, prompt, n_new, repeats, warmup, device, transformers or {}, uncached, compiled, min_seconds
        )
        log.info(
            "prompt %d + %d new: %.1f tok/s cached%s%s",
            prompt_len,
            n_new,
            row["cached_tok_s"],
            f", {row['uncached_tok_s']:.1f} uncached (x{row['speedup']:.2f})" if uncached else "",
            "; transformers "
            + ", ".join(f"{c} cache {row[f'transformers_{c}_tok_s']:.1f}" for c in PEER_CACHES if c in transformers)
            + f" tok/s (ours x{row['vs_transformers']:.2f} the faster, {row['transformers_peer']})"
            if "vs_transformers" in row
            else "",
        )
        rows.append(row)
    return rows


def _measure_point(
    model: nn.Module,
    prompt: torch.Tensor,
    n_new: int,
    repeats: int,
    warmup: int,
    device: torch.device,
    peers: Mapping[str, Peer],
    uncached: bool = True,
    compiled: bool = False,
    min_seconds: float = 0.0,
) -> Row:
    """One row of bench_kvcache: warmup + repeats rounds at one (prompt, new tokens) point, order alternating."""
    prompt_len = prompt.numel()
    runs: dict[str, Callable[[], tuple[list[int], float, float]]] = {
        "cached": functools.partial(timed_greedy, model, prompt, n_new, use_cache=True, device=device),
    }
    if uncached:
        runs["uncached"] = functools.partial(timed_greedy, model, prompt, n_new, use_cache=False, device=device)
    decoder = None
    if compiled:
        decoder = CompiledDecoder(model, max_seq_len=prompt_len + n_new)
        decoder.warmup()  # compile now, before any round: no clock ever covers it, whatever `warmup` says
        runs["compiled"] = functools.partial(timed_greedy, model, prompt, n_new, use_cache=True, device=device,
                                             decoder=decoder)  # fmt: skip
    for cache, peer in peers.items():
        runs[f"transformers_{cache}"] = functools.partial(_timed_peer, peer, prompt, n_new, device)
    order = list(runs)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}  # (ttft s, tokens/s) per round
    logged: set[str] = set()  # one note per point and kind: every round decodes the same tokens
    for timed, names in round_orders(order, warmup, repeats):
        outs = {}
        for name in names:
            if name == "uncached" and not timed:
                continue  # nothing to warm up (no cache, no compile): the slowest run of a point, skipped
            spent = 0.0
            while True:  # untimed: once; timed: once, then again until min_seconds are spent
                outs[name], ttft, seconds = runs[name]()
                spent += seconds
                if timed:
                    samples[name].append((ttft, n_new / seconds))
                if not timed or spent >= min_seconds:
                    break
        reference = outs["uncached" if uncached and timed else "cached"]
        for ours in ("cached", "compiled") if compiled else ("cached",):
            note = check_same(model, prompt, outs[ours], reference) if ours != "cached" or uncached else None
            if note is not None and ours not in logged:
                logged.add(ours)
                log.warning("%s: %s", ours, note)
        for cache in peers:
            i = first_difference(outs["cached"], outs[f"transformers_{cache}"])
            if i is not None and cache not in logged:
                logged.add(cache)
                log.warning(
                    "prompt %d + %d: transformers' greedy tokens (%s cache) part from ours at %d",
                    prompt_len,
                    n_new,
                    cache,
                    i,
                )

    def median(name: str, column: int) -> float:
        return statistics.median(sample[column] for sample in samples[name])

    cached = median("cached", 1)
    row: Row = {
        "prompt_len": prompt_len,
        "new_tokens": n_new,
        "cached_tok_s": cached,
        "cached_ttft_ms": 1e3 * median("cached", 0),
        "cache_mb": _cache_bytes(model, prompt_len + n_new) / 1e6,
    }  # the table's column order is COLUMNS', not this dict's
    if uncached:
        rate = median("uncached", 1)
        row.update(uncached_tok_s=rate, speedup=speedup(cached, rate), uncached_ttft_ms=1e3 * median("uncached", 0))
    if peers:
        rates = {cache: median(f"transformers_{cache}", 1) for cache in peers}
        best = max(rates, key=rates.__getitem__)
        row.update({f"transformers_{cache}_tok_s": rate for cache, rate in rates.items()})
        row.update(transformers_peer=best, transformers_tok_s=rates[best], vs_transformers=cached / rates[best])
    if decoder is not None:
        rate = median("compiled", 1)
        row.update(
            compiled_tok_s=rate,
            compiled_ttft_ms=1e3 * median("compiled", 0),
            compile_s=decoder.compile_seconds[1],
            compiled_vs_cached=rate / cached,
        )
        if uncached:
            row["compiled_speedup"] = speedup(rate, row["uncached_tok_s"])
        if peers:
            row["compiled_vs_transformers"] = rate / row["transformers_tok_s"]
        decoder.close()
    return row
