"""The benchmark's markdown: the section of docs/kv_cache.md between REPORT_BEGIN and REPORT_END.

Owns how the stage's outputs (metrics/bench_kvcache.json, reports/bench_kvcache.csv) read as
prose and a table. docs/results.py renders it with the README's figures; to rewrite this
section alone: `python -m nanollm.inference.bench.report docs/kv_cache.md`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nanollm.atomic import write_text
from nanollm.errors import NanollmError
from nanollm.inference.bench.results import read_batch_table, read_table
from nanollm.inference.bench.timing import PEER_COLUMNS, Row
from nanollm.inference.peers import PEER_CACHES

__all__ = ["REPORT_BEGIN", "REPORT_END", "main", "render_report", "update_report"]

REPORT_BEGIN = (
    "<!-- bench_kvcache report: regenerate with `python -m nanollm.inference.bench.report docs/kv_cache.md` -->"
)
REPORT_END = "<!-- end of bench_kvcache report -->"


# metrics' int8_kernel (nanollm.inference.native.int8_kernel_name) in words
KERNEL_WORDS = {"nanollm": "nanollm's own kernel (int8_gemm.c)", "aten": "torch's aten._weight_int8pack_mm"}


def render_report(summary: dict[str, Any], rows: Sequence[Row], batch_rows: Sequence[Row] = ()) -> str:
    """Markdown for the bench stage's outputs: the per-point table, the speedup range and the bandwidth line.

    With the transformers comparison the table adds its tokens/s with each cache, which
    one was the faster (the peer) and ours over the peer. With int8 and batching figures
    (serving.py), a line for int8 at batch 1 and a table of the batching engine's tokens/s.
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
        *(["", f"Weights timed: {summary['timed_weights']}."] if "timed_weights" in summary else []),
        "",
        f"The cache gains x{low['speedup']:.1f} at prompt {low['prompt_len']} + {low['new_tokens']} new tokens and "
        f"x{high['speedup']:.1f} at prompt {high['prompt_len']} + {high['new_tokens']}: without it every step "
        "runs the model over the whole sequence again, so the gap grows with the length.",
    ]
    if peer:
        ratios = [r["vs_transformers"] for r in rows]
        static = sum(r["transformers_peer"] == "static" for r in rows)
        counterpart = summary.get("peer_on_llama_counterpart") == 1.0
        out += [
            "",
            (
                "transformers' Llama cannot run this architecture (it has options Llama lacks: qk_norm, "
                "value_residual, value_embeddings, unet_skips or logit_softcap), "
                "so the two engines are compared on its Llama counterpart, the same shape without those options: "
                "the ours / peer column divides our cached decoding of that counterpart, not the figures beside it. "
                if counterpart
                else ""
            )
            + "Against transformers' generate on the same weights (LlamaForCausalLM, greedy, same prompts, same "
            "rounds), run with its default dynamic cache, with a static cache sized to the call"
            + (" and with that static cache and its forward compiled" if "compiled" in PEER_CACHES else "")
            + f", the fastest at each point (the static one at {static} of {len(rows)}"
            + (
                f", the compiled one at {sum(r['transformers_peer'] == 'compiled' for r in rows)}"
                if "compiled" in PEER_CACHES
                else ""
            )  # fmt: skip
            + f"), our eager cached decoding is x{min(ratios):.2f} to x{max(ratios):.2f} as fast.",
        ]
    out += _compiled(rows, counterpart=summary.get("peer_on_llama_counterpart") == 1.0)
    if "weight_read_gb_s" in summary:
        out += [
            "",
            f"Bandwidth (gpt-fast's measure): a decode step reads {summary['weight_mb']:.1f} MB of weights, so the "
            f"fastest cached point moves {summary['weight_read_gb_s']:.1f} GB/s, "
            f"{100 * summary['bandwidth_utilisation']:.0f}% of the {summary['memory_copy_gb_s']:.1f} GB/s that a "
            f"256 MB tensor copy reaches on the same machine"
            + (f" ({_threads(summary['threads'])})." if "threads" in summary else "."),
        ]
    return "\n".join(out + _serving(summary, batch_rows)) + "\n"


def _compiled(rows: Sequence[Row], counterpart: bool) -> list[str]:
    """The compiled decode step's table (nanollm.inference.compiled), where the rows have its columns."""
    if not all("compiled_tok_s" in r for r in rows):
        return []
    peer = all("compiled_vs_transformers" in r for r in rows)
    uncached = all("compiled_speedup" in r for r in rows)
    out = [
        "",
        "The compiled decode step (nanollm.inference.compiled: torch.compile over a static cache, prefill eager), "
        "timed in the same rounds as the eager paths above; it compiles at each point before the rounds, on no "
        "clock:",
        "",
        "| prompt | new tokens | eager cached tok/s | compiled tok/s | compiled / eager |"
        + (" compiled / uncached |" if uncached else "")
        + " compile (s) |"
        + (" compiled / peer" + (" (counterpart)" if counterpart else "") + " |" if peer else ""),
        "| ---: | ---: | ---: | ---: | ---: |" + " ---: |" * (1 + uncached + peer),
    ]
    for r in rows:
        out.append(
            f"| {r['prompt_len']} | {r['new_tokens']} | {r['cached_tok_s']:.0f} | {r['compiled_tok_s']:.0f} "
            f"| x{r['compiled_vs_cached']:.2f} |"
            + (f" x{r['compiled_speedup']:.1f} |" if uncached else "")
            + f" {r['compile_s']:.1f} |"
            + (f" x{r['compiled_vs_transformers']:.2f} |" if peer else "")
        )
    if counterpart and all("counterpart_compiled_tok_s" in r for r in rows):
        ratios = [r["compiled_tok_s"] / r["counterpart_compiled_tok_s"] for r in rows]
        out += [
            "",
            f"Compiled, the model decodes at x{min(ratios):.2f} to x{max(ratios):.2f} the speed of its Llama "
            "counterpart (the same shape without its options), against "
            f"x{min(r['cached_tok_s'] / r['counterpart_cached_tok_s'] for r in rows):.2f} to "
            f"x{max(r['cached_tok_s'] / r['counterpart_cached_tok_s'] for r in rows):.2f} eager.",
        ]
    return out


def _serving(summary: dict[str, Any], batch_rows: Sequence[Row]) -> list[str]:
    out = []
    if "int8_vs_fp32" in summary:
        out += [
            "",
            f"int8 weights (per-channel, docs/serving.md) decode at batch 1 at {summary['decode_int8_tok_s']:.0f} "
            f"tokens/s against {summary['decode_fp32_tok_s']:.0f} with fp32 weights: x{summary['int8_vs_fp32']:.2f} "
            "(the engine's batch-1 rows below"
            # written by the stage since it alternates the two kinds of weights within each round
            + (
                f"; fp32 and int8 side by side in every round, each leading every other round; int8 matmuls on "
                f"{KERNEL_WORDS.get(k, k)})."
                if (k := summary.get("int8_kernel"))
                else ")."
            ),
        ]
    if batch_rows:
        kinds = list(dict.fromkeys(r["weights"] for r in batch_rows))
        sizes = sorted({r["batch"] for r in batch_rows})
        by = {(r["weights"], r["batch"]): r for r in batch_rows}
        out += [
            "",
            "The batching engine (nanollm.inference.engine), every sequence decoding the same number of tokens "
            "after its own prompt, prefills included; tokens/s of all the sequences together:",
            "",
            "| sequences at once | " + " | ".join(f"{k} tok/s | {k} / batch 1" for k in kinds) + " |",
            "| ---: |" + " ---: | ---: |" * len(kinds),
        ]
        for b in sizes:
            cells = [
                f"{by[k, b]['tok_s']:.0f} | x{by[k, b]['vs_batch1']:.1f}"
                if "vs_batch1" in by[k, b]
                else f"{by[k, b]['tok_s']:.0f} | -"
                for k in kinds
            ]
            out.append(f"| {b} | " + " | ".join(cells) + " |")
    return out


def _threads(n: float) -> str:
    return "1 thread" if n == 1 else f"{n:.0f} threads"


def update_report(
    doc: str | Path, metrics: str | Path, table: str | Path, batch_table: str | Path | None = None
) -> None:
    """Replace the generated section of `doc` (between REPORT_BEGIN and REPORT_END) with render_report."""
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
    batch_rows = read_batch_table(batch_table) if batch_table and Path(batch_table).exists() else []
    body = render_report(summary, read_table(table), batch_rows)
    write_text(doc, f"{head}{REPORT_BEGIN}\n{body}{REPORT_END}{tail}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nanollm.inference.bench.report",
        description="Rewrite the KV-cache report section of a markdown file.",
    )
    parser.add_argument("doc", nargs="?", default="docs/kv_cache.md", help="markdown file with the report markers")
    parser.add_argument("--metrics", default="metrics/bench_kvcache.json", help="the bench stage's summary JSON")
    parser.add_argument("--table", default="reports/bench_kvcache.csv", help="the bench stage's CSV")
    parser.add_argument(
        "--batch-table", default="reports/bench_kvcache_batching.csv", help="the bench stage's batching CSV"
    )
    args = parser.parse_args(argv)
    try:
        update_report(args.doc, args.metrics, args.table, args.batch_table)
    except NanollmError as err:
        parser.exit(1, f"Error: {err}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
