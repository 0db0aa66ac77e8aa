"""The benchmark's chart: tokens/s against prompt length with and without the cache, and the speedup.

Owns reports/bench_kvcache.png; the rows are timing.py's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from nanollm.atomic import atomic_path
from nanollm.inference.bench.timing import Row

__all__ = ["plot"]


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
