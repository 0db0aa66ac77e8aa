"""The KV-cache benchmark: greedy decoding with and without the cache, timed honestly, plus its CSV, chart,
achieved memory bandwidth and the markdown report of docs/kv_cache.md.

Owns the timing protocol, the equality check between the two paths and the result files.
Generation itself is nanollm.inference.generate's; the cache is the model's; the transformers peer is
built by nanollm.inference.peers. Regenerate the report from the stage's outputs:
`python -m nanollm.inference.bench.timing docs/kv_cache.md`.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from nanollm.atomic import atomic_path
from nanollm.errors import NanollmError
from nanollm.inference.generate import decode_step, generate, prefill
from nanollm.inference.peers import PEER_CACHES

__all__ = [
    "COLUMNS",
    "PEER_COLUMNS",
    "KVCacheMismatchError",
    "bandwidth",
    "bench_kvcache",
    "memory_bandwidth",
    "plot",
    "read_table",
    "render_report",
    "rounding_tolerance",
    "speedup",
    "summarize",
    "update_report",
    "weight_bytes_per_token",
    "write_table",
]

log = logging.getLogger(__name__)

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
)


class KVCacheMismatchError(NanollmError):
    """Cached and uncached greedy decoding produced different tokens, and no near-tie explains it."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels are async: read the clock only once they are done


def _timed_greedy(
    model: nn.Module, prompt: torch.Tensor, new_tokens: int, *, use_cache: bool, device: torch.device
) -> tuple[list[int], float, float]:
    """Greedy-decode once; returns (tokens, seconds to first token, seconds in total).

    The clock covers what a user waits for: cache allocation, prefill, every decode step
    and the host read-back of each token.
    """
    out: list[int] = []
    first = 0.0
    _sync(device)
    t0 = time.perf_counter()
    for token in generate(model, prompt, new_tokens, temperature=0.0, use_cache=use_cache):
        if not out:
            _sync(device)
            first = time.perf_counter() - t0
        out.append(token)
    _sync(device)
    return out, first, time.perf_counter() - t0


def _timed_peer(
    peer: Peer, prompt: torch.Tensor, new_tokens: int, device: torch.device
) -> tuple[list[int], float, float]:
    """(tokens, nan, seconds) of one greedy decode by the peer, clocked like ours (prompt in, ids on the host).

    generate returns every token at once, so there is no time to first token (nan).
    """
    _sync(device)
    t0 = time.perf_counter()
    out = peer(prompt, new_tokens)
    _sync(device)
    return out, math.nan, time.perf_counter() - t0


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((j for j, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def rounding_tolerance(logits: torch.Tensor, dtype: torch.dtype) -> float:
    """How far two float evaluations of the same logits may drift apart: sqrt(eps) of `dtype` x their scale.

    The cached and the plain path compute the same function with differently shaped
    kernels (one query row against the cache, or the whole sequence), so their sums are
    added in other orders; that drift is a few eps per layer, far below sqrt(eps)
    (3.5e-4 relative in fp32, 0.031 in fp16, 0.088 in bf16): a 4-layer, 256-wide fp32 model
    after a 512-token prompt drifts by 2e-6 of its logits' scale, 170x inside the band. A
    bug moves logits by a sizeable share of their scale (a cache nudged at one position, a
    rope offset: more than 10x the band in tests/test_bench.py).
    The scale is the largest |logit| (at least 1), so a trained model's sharper logits
    (~10-20) get a proportionally wider band.
    """
    scale = max(1.0, logits.abs().max().item())
    return math.sqrt(torch.finfo(dtype).eps) * scale


@torch.inference_mode()
def _logits_of_both_paths(
    model: nn.Module, prompt: torch.Tensor, shared: list[int], new_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits (V,) each path computes for the new token after prompt + shared: (plain forward, cached).

    Replays what generate runs: the uncached path's forward over the whole sequence, and
    the cached path's prefill of the prompt then one decode step per shared token, against
    a cache of the size generate allocates (prompt + new_tokens).
    """
    seq = torch.cat([prompt, prompt.new_tensor(shared)]).view(1, -1)  # (1, T + i)
    plain = model(seq, last_only=True)[0, -1]  # (V,)
    model.setup_cache(1, prompt.numel() + new_tokens)
    try:
        logits = prefill(model, prompt.view(1, -1))  # (1, V)
        for pos, token in enumerate(shared, start=prompt.numel()):
            logits = decode_step(model, prompt.new_tensor([[token]]), pos)  # (1, V)
    finally:
        model.clear_cache()
    return plain, logits[0]


def _check_same(model: nn.Module, prompt: torch.Tensor, cached: list[int], uncached: list[int]) -> str | None:
    """None when the two greedy runs (equal lengths) agree; a note when they part on a near-tie; else raise.

    Tokens alone cannot tell a broken cache from float rounding: on a trained model two
    candidates can have logits equal to 1e-6, and the cached path (one query against the
    cache) and the plain one (the whole sequence) add their sums in other orders, so either
    may win. Comparing every step's logits would need generate to expose them (it yields
    ids only) and would cost a logits copy per step inside the timed loop. So the check
    stays on tokens, and only at the first new token i where the runs part does it replay
    both paths over their shared prefix (one plain forward and one cached decode, untimed)
    and compare their logits there. The difference is a near-tie, logged and accepted, when
    (a) the two logit vectors agree within rounding_tolerance: the paths compute the same
    function at that step, so the cache is not corrupt; and (b) each run's token is within
    2x that tolerance of the best logit of the other path's vector: the two candidates tie
    to rounding. Anything else (logits apart by more than rounding: a stale or corrupted
    cache, a wrong rope offset) raises KVCacheMismatchError naming the point. After a
    near-tie the sequences differ, so the rest of the run is not compared.
    """
    i = _first_difference(cached, uncached)
    if i is None:
        return None
    plain, stepped = _logits_of_both_paths(model, prompt, cached[:i], len(cached))
    tolerance = rounding_tolerance(plain, next(model.parameters()).dtype)
    drift = (stepped - plain).abs().max().item()
    gap = max(plain.max().item() - plain[cached[i]].item(), stepped.max().item() - stepped[uncached[i]].item())
    where = (
        f"at prompt_len={prompt.numel()}, new_tokens={len(cached)}: greedy decoding first differs at new token {i} "
        f"(cached {cached[i]}, uncached {uncached[i]})"
    )
    if drift <= tolerance and gap <= 2 * tolerance:
        return (
            f"near-tie {where}: logits {plain[uncached[i]].item():.6g} and {plain[cached[i]].item():.6g}, "
            f"the two paths' logits within {drift:.2g} of each other (rounding allows {tolerance:.2g}); "
            "the rest of the run is not compared"
        )
    raise KVCacheMismatchError(
        f"KV cache mismatch {where}, where the two paths' logits differ by up to {drift:.3g} "
        f"(rounding allows {tolerance:.2g}); the model's cached attention path disagrees with its plain forward, "
        "fix nanollm/model before trusting any speedup"
    )


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
) -> list[Row]:
    """Time greedy decoding with and without the KV cache for every (prompt_len, new_tokens) pair.

    Prompts are random token ids from a generator seeded with `seed`, nested (each prompt
    is a prefix of the longest), so every run of the benchmark sees the same ones. Each
    point runs `warmup` untimed then `repeats` timed rounds, each round one cached and one
    uncached decode; reported figures are medians. tokens/s is end to end: new_tokens over
    the whole wall time, prefill included, so a long prompt lowers it for both modes; ttft
    is prefill plus the first token. Every run's tokens must equal those of the other mode
    up to a near-tie (see _check_same), else KVCacheMismatchError names the point.
    cache_mb is the cache preallocated for prompt + new tokens, in MB (1e6 bytes).
    `device` defaults to the model's; it must be where the model lives.

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
    """
    if transformers is not None and not set(transformers) <= set(PEER_CACHES):
        raise ValueError(f"transformers settings must be among {PEER_CACHES}, got {sorted(transformers)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    longest = torch.randint(0, model.vocab_size, (max(prompt_lengths),), generator=gen)
    points = [(p, n) for p in prompt_lengths for n in new_tokens]
    rows = []
    for prompt_len, n_new in tqdm(points, desc="bench_kvcache", unit="point", disable=None):
        row = _measure_point(model, longest[:prompt_len].to(device), n_new, repeats, warmup, device, transformers or {})
        log.info(
            "prompt %d + %d new: %.1f tok/s cached, %.1f uncached (x%.2f)%s",
            prompt_len,
            n_new,
            row["cached_tok_s"],
            row["uncached_tok_s"],
            row["speedup"],
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
) -> Row:
    """One row of bench_kvcache: warmup + repeats rounds at one (prompt, new tokens) point, order alternating."""
    prompt_len = prompt.numel()
    runs: dict[str, Callable[[], tuple[list[int], float, float]]] = {
        "cached": functools.partial(_timed_greedy, model, prompt, n_new, use_cache=True, device=device),
        "uncached": functools.partial(_timed_greedy, model, prompt, n_new, use_cache=False, device=device),
    }
    for cache, peer in peers.items():
        runs[f"transformers_{cache}"] = functools.partial(_timed_peer, peer, prompt, n_new, device)
    order = list(runs)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}  # (ttft s, tokens/s) per round
    logged: set[str] = set()  # one note per point and kind: every round decodes the same tokens
    for round_ in range(warmup + repeats):
        outs = {}
        for name in order if (round_ - warmup) % 2 == 0 else order[::-1]:
            outs[name], ttft, seconds = runs[name]()
            if round_ >= warmup:
                samples[name].append((ttft, n_new / seconds))
        note = _check_same(model, prompt, outs["cached"], outs["uncached"])
        if note is not None and "ours" not in logged:
            logged.add("ours")
            log.warning("%s", note)
        for cache in peers:
            i = _first_difference(outs["cached"], outs[f"transformers_{cache}"])
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
        "uncached_tok_s": median("uncached", 1),
        "speedup": speedup(cached, median("uncached", 1)),
        "cached_ttft_ms": 1e3 * median("cached", 0),
        "uncached_ttft_ms": 1e3 * median("uncached", 0),
        "cache_mb": _cache_bytes(model, prompt_len + n_new) / 1e6,
    }
    if peers:
        rates = {cache: median(f"transformers_{cache}", 1) for cache in peers}
        best = max(rates, key=rates.__getitem__)
        row.update({f"transformers_{cache}_tok_s": rate for cache, rate in rates.items()})
        row.update(transformers_peer=best, transformers_tok_s=rates[best], vs_transformers=cached / rates[best])
    return row


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter once, bar an untied embedding table.

    The input embedding is a lookup that reads one row per token; tied to the LM head, the
    same table is read whole by the output matmul, so it counts. The KV cache read (which
    grows with the context) is not included, as in gpt-fast's figure.
    """
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # a tied tensor is yielded once
    if not model.cfg.tie_embeddings:
        table = model.tok_embeddings.weight
        total -= table.numel() * table.element_size()
    return total


def memory_bandwidth(size_mb: int = 256, repeats: int = 5, device: str | torch.device = "cpu") -> float:
    """Bytes/s of a large tensor copy (each byte read once and written once), best of `repeats`.

    256 MB is far past every cache level, so this is what DRAM delivers to torch's copy
    kernel with the current thread count: the ceiling a memory-bound decode step can reach.
    The best run is reported, not the median: it is the machine's capacity, and other
    processes only ever lower it.
    """
    device = torch.device(device)
    src = torch.rand(size_mb * 2**20 // 4, device=device)  # fp32; rand touches every page
    dst = torch.empty_like(src)
    dst.copy_(src)  # untimed: faults in dst's pages
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / best


def bandwidth(rows: Sequence[Row], weight_bytes: int, copy_bytes_s: float) -> dict[str, float]:
    """gpt-fast's figure: weight bytes per token x cached tokens/s, next to the measured copy bandwidth.

    Uses the fastest cached point (the shortest prompt, where prefill and KV reads matter
    least). tokens/s there is end to end, so the figure slightly understates the decode
    loop's own bandwidth. A share near 1 means decoding is as fast as memory allows.
    """
    tok_s = max(r["cached_tok_s"] for r in rows)
    achieved = weight_bytes * tok_s
    return {
        "weight_mb": round(weight_bytes / 1e6, 4),
        "weight_read_gb_s": round(achieved / 1e9, 4),
        "memory_copy_gb_s": round(copy_bytes_s / 1e9, 4),
        "bandwidth_utilisation": round(achieved / copy_bytes_s, 4),
    }


def summarize(rows: Sequence[Row]) -> dict[str, float]:
    """Flat numeric metrics for DVC/MLflow: per point p{L}_n{N}_{speedup,cached_tok_s,uncached_tok_s}, plus extremes.

    With the transformers comparison, also per point the tokens/s of each cache setting
    (p{L}_n{N}_transformers_{dynamic,static}_tok_s), the peer's (transformers_tok_s, the
    faster of them), vs_transformers, and transformers_static_is_peer (1.0 where the static
    cache was the faster, 0.0 where the dynamic one was: MLflow metrics are numbers); and
    min_vs_transformers (the least favourable point: the figure to hold a target to).
    """
    out: dict[str, float] = {}
    per_point = ("speedup", "cached_tok_s", "uncached_tok_s", *PEER_COLUMNS)
    for r in rows:
        key = f"p{r['prompt_len']}_n{r['new_tokens']}"
        for name in (n for n in per_point if n in r and n not in TEXT_COLUMNS):
            out[f"{key}_{name}"] = round(r[name], 4)
        if "transformers_peer" in r:
            out[f"{key}_transformers_static_is_peer"] = float(r["transformers_peer"] == "static")
    out["max_speedup"] = round(max(r["speedup"] for r in rows), 4)
    out["cache_mb_max"] = round(max(r["cache_mb"] for r in rows), 4)
    if all("vs_transformers" in r for r in rows):
        out["min_vs_transformers"] = round(min(r["vs_transformers"] for r in rows), 4)
    return out


def write_table(rows: Sequence[Row], path: str | Path) -> None:
    """Write the rows as CSV (one line per point; the COLUMNS the rows have, in that order), atomically."""
    columns = [c for c in COLUMNS if all(c in r for r in rows)]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()})


def read_table(path: str | Path) -> list[Row]:
    """The rows written by write_table, numbers parsed back (int columns as int, TEXT_COLUMNS as they are)."""

    def parse(column: str, value: str) -> int | float | str:
        if column in TEXT_COLUMNS:
            return value
        return int(value) if column in ("prompt_len", "new_tokens") else float(value)

    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return [{k: parse(k, v) for k, v in r.items()} for r in rows]
    except (OSError, ValueError, TypeError) as err:
        raise NanollmError(f"cannot read {path} ({err}); run `dvc repro bench_kvcache` first") from None


def plot(rows: Sequence[Row], path: str | Path, title: str | None = None) -> None:
    """PNG: tokens/s vs prompt length (cached solid, uncached dashed, one colour per new_tokens) and speedup.

    With the transformers comparison, the peer (the faster of its cache settings at each
    point) is dotted.

    Uses matplotlib's object API with the Agg canvas, so no global backend is switched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    rate, gain = fig.subplots(1, 2)
    for i, n_new in enumerate(sorted({r["new_tokens"] for r in rows})):
        sub = sorted((r for r in rows if r["new_tokens"] == n_new), key=lambda r: r["prompt_len"])
        x = [r["prompt_len"] for r in sub]
        color = f"C{i}"
        rate.plot(x, [r["cached_tok_s"] for r in sub], "o-", color=color, label=f"cached, {n_new} new")
        rate.plot(x, [r["uncached_tok_s"] for r in sub], "s--", color=color, label=f"uncached, {n_new} new")
        if all("transformers_tok_s" in r for r in sub):
            peer = [r["transformers_tok_s"] for r in sub]
            rate.plot(x, peer, "^:", color=color, label=f"transformers, faster cache, {n_new} new")
        gain.plot(x, [r["speedup"] for r in sub], "o-", color=color, label=f"{n_new} new tokens")
    lengths = sorted({r["prompt_len"] for r in rows})
    for ax in (rate, gain):
        ax.set_xscale("log", base=2)  # prompt lengths are usually powers of two apart
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        ax.set_xlabel("prompt length (tokens)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    rate.set_ylabel("greedy decoding, tokens/s (end to end)")
    rate.set_ylim(bottom=0)
    rate.set_title("Throughput with and without the KV cache")
    gain.axhline(1.0, color="grey", lw=0.8)
    gain.set_ylabel("speedup (cached / uncached)")
    gain.set_title("KV-cache speedup")
    if title:
        fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


# ---------------------------------------------------------------------------- report

REPORT_BEGIN = (
    "<!-- bench_kvcache report: regenerate with `python -m nanollm.inference.bench.timing docs/kv_cache.md` -->"
)
REPORT_END = "<!-- end of bench_kvcache report -->"


def render_report(summary: dict[str, Any], rows: Sequence[Row]) -> str:
    """Markdown for the bench stage's outputs: the per-point table, the speedup range and the bandwidth line.

    With the transformers comparison the table adds its tokens/s with each cache, which
    one was the faster (the peer) and ours over the peer.
    """
    peer = all(c in r for r in rows for c in PEER_COLUMNS)
    caches = " | ".join(f"transformers {cache} cache tok/s" for cache in PEER_CACHES)
    out = [
        "| prompt | new tokens | cached tok/s | uncached tok/s | speedup | TTFT cached (ms) | TTFT uncached (ms) "
        "| KV cache (MB) |" + (f" {caches} | peer | ours / peer |" if peer else ""),
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        + (" ---: |" * len(PEER_CACHES) + " --- | ---: |" if peer else ""),
    ]
    for r in rows:
        theirs = "".join(f" {r[f'transformers_{cache}_tok_s']:.0f} |" for cache in PEER_CACHES) if peer else ""
        out.append(
            f"| {r['prompt_len']} | {r['new_tokens']} | {r['cached_tok_s']:.0f} | {r['uncached_tok_s']:.1f} "
            f"| x{r['speedup']:.1f} | {r['cached_ttft_ms']:.1f} | {r['uncached_ttft_ms']:.1f} | {r['cache_mb']:.2f} |"
            + (f"{theirs} {r['transformers_peer']} | x{r['vs_transformers']:.2f} |" if peer else "")
        )
    low, high = min(rows, key=lambda r: r["speedup"]), max(rows, key=lambda r: r["speedup"])
    out += [
        "",
        f"The cache gains x{low['speedup']:.1f} at prompt {low['prompt_len']} + {low['new_tokens']} new tokens and "
        f"x{high['speedup']:.1f} at prompt {high['prompt_len']} + {high['new_tokens']}: without it every step "
        "runs the model over the whole sequence again, so the gap grows with the length.",
    ]
    if peer:
        ratios = [r["vs_transformers"] for r in rows]
        static = sum(r["transformers_peer"] == "static" for r in rows)
        out += [
            "",
            "Against transformers' generate on the same weights (LlamaForCausalLM, greedy, same prompts, same "
            "rounds), run with its default dynamic cache and with a static cache sized to the call, the faster of "
            f"the two at each point (the static one at {static} of {len(rows)}), our cached decoding is "
            f"x{min(ratios):.2f} to x{max(ratios):.2f} as fast.",
        ]
    if "weight_read_gb_s" in summary:
        out += [
            "",
            f"Bandwidth (gpt-fast's measure): a decode step reads {summary['weight_mb']:.1f} MB of weights, so the "
            f"fastest cached point moves {summary['weight_read_gb_s']:.1f} GB/s, "
            f"{100 * summary['bandwidth_utilisation']:.0f}% of the {summary['memory_copy_gb_s']:.1f} GB/s that a "
            f"256 MB tensor copy reaches on the same machine"
            + (f" ({_threads(summary['threads'])})." if "threads" in summary else "."),
        ]
    return "\n".join(out) + "\n"


def _threads(n: float) -> str:
    return "1 thread" if n == 1 else f"{n:.0f} threads"


def update_report(doc: str | Path, metrics: str | Path, table: str | Path) -> None:
    """Replace the generated section of `doc` (between REPORT_BEGIN and REPORT_END) with render_report."""
    from nanollm.atomic import write_text

    doc = Path(doc)
    try:
        text = doc.read_text(encoding="utf-8")
        summary = json.loads(Path(metrics).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise NanollmError(f"cannot read the report inputs ({err}); run `dvc repro bench_kvcache` first") from None
    head, sep, rest = text.partition(REPORT_BEGIN)
    _, end, tail = rest.partition(REPORT_END)
    if not sep or not end:
        raise NanollmError(f"{doc} lacks the report markers {REPORT_BEGIN!r} ... {REPORT_END!r}; add them back")
    body = render_report(summary, read_table(table))
    write_text(doc, f"{head}{REPORT_BEGIN}\n{body}{REPORT_END}{tail}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nanollm.inference.bench.timing",
        description="Rewrite the KV-cache report section of a markdown file.",
    )
    parser.add_argument("doc", nargs="?", default="docs/kv_cache.md", help="markdown file with the report markers")
    parser.add_argument("--metrics", default="metrics/bench_kvcache.json", help="the bench stage's summary JSON")
    parser.add_argument("--table", default="reports/bench_kvcache.csv", help="the bench stage's CSV")
    args = parser.parse_args(argv)
    try:
        update_report(args.doc, args.metrics, args.table)
    except NanollmError as err:
        parser.exit(1, f"Error: {err}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
