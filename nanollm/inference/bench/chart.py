"""The benchmark's chart: tokens/s against prompt length with and without the cache, the speedup, and batching.

Owns reports/bench_kvcache.png; the rows are timing.py's and serving.py's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from nanollm.atomic import atomic_path
from nanollm.inference.bench.timing import Row

__all__ = ["plot"]


def plot(rows: Sequence[Row], path: str | Path, title: str | None = None, batch_rows: Sequence[Row] = ()) -> None:
    """PNG: tokens/s vs prompt length (cached solid, uncached dashed, one colour per new_tokens) and speedup.

    With the transformers comparison, the peer (the faster of its cache settings at each
    point) is dotted. With batch_rows (serving.py), a third panel: the batching engine's
    tokens/s against the batch size, one line per kind of weights.

    Uses matplotlib's object API with the Agg canvas, so no global backend is switched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16.5 if batch_rows else 11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3 if batch_rows else 2)
    rate, gain = axes[0], axes[1]
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
    if batch_rows:
        _plot_batching(axes[2], batch_rows)
    if title:
        fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def _plot_batching(ax, rows: Sequence[Row]) -> None:
    for i, weights in enumerate(dict.fromkeys(r["weights"] for r in rows)):
        sub = sorted((r for r in rows if r["weights"] == weights), key=lambda r: r["batch"])
        ax.plot(
            [r["batch"] for r in sub], [r["tok_s"] for r in sub], "o-", color=f"C{i + 2}", label=f"{weights} weights"
        )
    sizes = sorted({r["batch"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel("sequences decoded at once")
    ax.set_ylabel("tokens/s, all sequences together")
    ax.set_title("Continuous batching")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
