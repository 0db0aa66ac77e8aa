"""The KV-cache benchmark: greedy decoding with and without the cache, timed honestly, plus its CSV, chart,
achieved memory bandwidth and the markdown report of docs/kv_cache.md.

Owns the timing protocol, the equality check between the two paths and the result files.
Generation itself is nanollm.generate's; the cache is the model's.
Regenerate the report from the stage's outputs: `python -m nanollm.bench docs/kv_cache.md`.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from nanollm.atomic import atomic_path
from nanollm.errors import NanollmError
from nanollm.generate import generate

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
    "speedup",
    "summarize",
    "update_report",
    "weight_bytes_per_token",
    "write_table",
]

log = logging.getLogger(__name__)

PEER_COLUMNS = ("transformers_tok_s", "vs_transformers")  # only when compared with transformers
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
    """Cached and uncached greedy decoding produced different tokens: the cache path is wrong."""


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
    peer: Callable[[torch.Tensor, int], list[int]], prompt: torch.Tensor, new_tokens: int, device: torch.device
) -> tuple[list[int], float]:
    """(tokens, seconds) of one greedy decode by the peer, clocked like ours (prompt in, ids on the host)."""
    _sync(device)
    t0 = time.perf_counter()
    out = peer(prompt, new_tokens)
    _sync(device)
    return out, time.perf_counter() - t0


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((j for j, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def _check_same(cached: list[int], uncached: list[int], prompt_len: int, new_tokens: int) -> None:
    """Raise KVCacheMismatchError at the first new token where the two greedy runs (equal lengths) part."""
    i = _first_difference(cached, uncached)
    if i is None:
        return
    raise KVCacheMismatchError(
        f"KV cache mismatch at prompt_len={prompt_len}, new_tokens={new_tokens}: greedy decoding first differs "
        f"at new token {i} (cached {cached[i]}, uncached {uncached[i]}); the model's cached attention path "
        "disagrees with its plain forward, fix nanollm/model before trusting any speedup"
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
    transformers: Callable[[torch.Tensor, int], list[int]] | None = None,
) -> list[dict[str, float]]:
    """Time greedy decoding with and without the KV cache for every (prompt_len, new_tokens) pair.

    Prompts are random token ids from a generator seeded with `seed`, nested (each prompt
    is a prefix of the longest), so every run of the benchmark sees the same ones. Each
    point runs `warmup` untimed then `repeats` timed rounds, each round one cached and one
    uncached decode (interleaved, so clock drift hits both alike); reported figures are
    medians. tokens/s is end to end: new_tokens over the whole wall time, prefill included,
    so a long prompt lowers it for both modes; ttft is prefill plus the first token. Every
    run's tokens must equal those of the other mode, else KVCacheMismatchError names the
    point. cache_mb is the cache preallocated for prompt + new tokens, in MB (1e6 bytes).
    `device` defaults to the model's; it must be where the model lives.

    `transformers` (nanollm.peers.transformers_greedy) adds the peer to every round, after
    our two runs and on the same prompt: transformers_tok_s is its cached greedy decoding,
    clocked the same way, and vs_transformers our cached tokens/s over it. Its tokens are
    compared with ours and a difference is logged (float rounding can flip a near-tie on
    a trained model), not raised: the peer is measured, not trusted.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    longest = torch.randint(0, model.vocab_size, (max(prompt_lengths),), generator=gen)
    points = [(p, n) for p in prompt_lengths for n in new_tokens]
    rows = []
    for prompt_len, n_new in tqdm(points, desc="bench_kvcache", unit="point", disable=None):
        row = _measure_point(model, longest[:prompt_len].to(device), n_new, repeats, warmup, device, transformers)
        log.info(
            "prompt %d + %d new: %.1f tok/s cached, %.1f uncached (x%.2f)%s",
            prompt_len,
            n_new,
            row["cached_tok_s"],
            row["uncached_tok_s"],
            row["speedup"],
            f"; transformers {row['transformers_tok_s']:.1f} cached (ours x{row['vs_transformers']:.2f})"
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
    transformers: Callable[[torch.Tensor, int], list[int]] | None,
) -> dict[str, float]:
    """One row of bench_kvcache: warmup + repeats interleaved rounds at one (prompt, new tokens) point."""
    prompt_len = prompt.numel()
    timings: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    peer_rates: list[float] = []
    for round_ in range(warmup + repeats):
        outs = {}
        for use_cache in (True, False):
            outs[use_cache], ttft, total = _timed_greedy(model, prompt, n_new, use_cache=use_cache, device=device)
            if round_ >= warmup:
                timings[use_cache].append((ttft, n_new / total))
        _check_same(outs[True], outs[False], prompt_len, n_new)
        if transformers is not None:
            theirs, seconds = _timed_peer(transformers, prompt, n_new, device)
            if round_ >= warmup:
                peer_rates.append(n_new / seconds)
            if (i := _first_difference(outs[True], theirs)) is not None:
                log.warning("prompt %d + %d: transformers' greedy tokens part from ours at %d", prompt_len, n_new, i)
    cached = statistics.median(r for _, r in timings[True])
    uncached = statistics.median(r for _, r in timings[False])
    row = {
        "prompt_len": prompt_len,
        "new_tokens": n_new,
        "cached_tok_s": cached,
        "uncached_tok_s": uncached,
        "speedup": speedup(cached, uncached),
        "cached_ttft_ms": 1e3 * statistics.median(t for t, _ in timings[True]),
        "uncached_ttft_ms": 1e3 * statistics.median(t for t, _ in timings[False]),
        "cache_mb": _cache_bytes(model, prompt_len + n_new) / 1e6,
    }
    if peer_rates:
        row["transformers_tok_s"] = statistics.median(peer_rates)
        row["vs_transformers"] = cached / row["transformers_tok_s"]
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


def bandwidth(rows: Sequence[dict[str, float]], weight_bytes: int, copy_bytes_s: float) -> dict[str, float]:
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


def summarize(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Flat metrics for DVC/MLflow: per point p{L}_n{N}_{speedup,cached_tok_s,uncached_tok_s}, plus extremes.

    With the transformers comparison, also p{L}_n{N}_{transformers_tok_s,vs_transformers}
    and min_vs_transformers (the least favourable point: the figure to hold a target to).
    """
    out: dict[str, float] = {}
    for r in rows:
        key = f"p{r['prompt_len']}_n{r['new_tokens']}"
        for name in ("speedup", "cached_tok_s", "uncached_tok_s", "transformers_tok_s", "vs_transformers"):
            if name in r:
                out[f"{key}_{name}"] = round(r[name], 4)
    out["max_speedup"] = round(max(r["speedup"] for r in rows), 4)
    out["cache_mb_max"] = round(max(r["cache_mb"] for r in rows), 4)
    if all("vs_transformers" in r for r in rows):
        out["min_vs_transformers"] = round(min(r["vs_transformers"] for r in rows), 4)
    return out


def write_table(rows: Sequence[dict[str, float]], path: str | Path) -> None:
    """Write the rows as CSV (one line per point; the COLUMNS the rows have, in that order), atomically."""
    columns = [c for c in COLUMNS if all(c in r for r in rows)]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()})


def read_table(path: str | Path) -> list[dict[str, float]]:
    """The rows written by write_table, numbers parsed back (int columns as int)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return [{k: int(v) if k in ("prompt_len", "new_tokens") else float(v) for k, v in r.items()} for r in rows]
    except (OSError, ValueError, TypeError) as err:
        raise NanollmError(f"cannot read {path} ({err}); run `dvc repro bench_kvcache` first") from None


def plot(rows: Sequence[dict[str, float]], path: str | Path, title: str | None = None) -> None:
    """PNG: tokens/s vs prompt length (cached solid, uncached dashed, one colour per new_tokens) and speedup.

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
            rate.plot(x, peer, "^:", color=color, label=f"transformers cached, {n_new} new")
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

REPORT_BEGIN = "<!-- bench_kvcache report: regenerate with `python -m nanollm.bench docs/kv_cache.md` -->"
REPORT_END = "<!-- end of bench_kvcache report -->"


def render_report(summary: dict[str, Any], rows: Sequence[dict[str, float]]) -> str:
    """Markdown for the bench stage's outputs: the per-point table, the speedup range and the bandwidth line."""
    peer = all("vs_transformers" in r for r in rows)
    out = [
        "| prompt | new tokens | cached tok/s | uncached tok/s | speedup | TTFT cached (ms) | TTFT uncached (ms) "
        "| KV cache (MB) |" + (" transformers cached tok/s | ours / transformers |" if peer else ""),
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if peer else ""),
    ]
    for r in rows:
        out.append(
            f"| {r['prompt_len']} | {r['new_tokens']} | {r['cached_tok_s']:.0f} | {r['uncached_tok_s']:.1f} "
            f"| x{r['speedup']:.1f} | {r['cached_ttft_ms']:.1f} | {r['uncached_ttft_ms']:.1f} | {r['cache_mb']:.2f} |"
            + (f" {r['transformers_tok_s']:.0f} | x{r['vs_transformers']:.2f} |" if peer else "")
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
        out += [
            "",
            f"Against transformers' generate on the same weights (LlamaForCausalLM, cached, greedy, same prompts), "
            f"our cached decoding is x{min(ratios):.2f} to x{max(ratios):.2f} as fast.",
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
        prog="python -m nanollm.bench", description="Rewrite the KV-cache report section of a markdown file."
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
