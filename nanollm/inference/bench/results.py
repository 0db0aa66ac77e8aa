"""The benchmark's rows as files: a CSV table (written and read back) and flat metrics for DVC and MLflow.

Owns the file formats of reports/bench_kvcache.csv and metrics/bench_kvcache.json; the rows'
columns are timing.py's, the chart chart.py's, the markdown report.py's.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

from nanollm.atomic import atomic_path
from nanollm.errors import NanollmError
from nanollm.inference.bench.serving import BATCH_COLUMNS
from nanollm.inference.bench.timing import (
    COLUMNS,
    COMPILED_COLUMNS,
    COMPILED_COUNTERPART_COLUMN,
    COUNTERPART_COLUMN,
    PEER_COLUMNS,
    TEXT_COLUMNS,
    Row,
)

__all__ = ["read_batch_table", "read_table", "summarize", "summarize_serving", "write_batch_table", "write_table"]


def summarize(rows: Sequence[Row]) -> dict[str, float]:
    """Flat numeric metrics for DVC/MLflow: per point p{L}_n{N}_{speedup,cached_tok_s,uncached_tok_s}, plus extremes.

    With the transformers comparison, also per point the tokens/s of each cache setting
    (p{L}_n{N}_transformers_{dynamic,static}_tok_s), the peer's (transformers_tok_s, the
    faster of them), vs_transformers, and transformers_static_is_peer (1.0 where the static
    cache was the faster, 0.0 where the dynamic one was: MLflow metrics are numbers); and
    min_vs_transformers (the least favourable point: the figure to hold a target to). Where the
    peer ran on the Llama counterpart of the architecture, p{L}_n{N}_counterpart_cached_tok_s
    is ours on that counterpart, the figure vs_transformers divides.

    With the compiled step, per point its COMPILED_COLUMNS (and counterpart_compiled_tok_s), and
    over the points min_compiled_vs_cached, max_compiled_speedup, min_compiled_vs_transformers
    and compile_s_max (the longest compile of one point's step).
    """
    out: dict[str, float] = {}
    per_point = (
        "speedup",
        "cached_tok_s",
        "uncached_tok_s",
        *PEER_COLUMNS,
        COUNTERPART_COLUMN,
        *COMPILED_COLUMNS,
        COMPILED_COUNTERPART_COLUMN,
    )
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
    extremes = (
        ("min_compiled_vs_cached", min, "compiled_vs_cached"),
        ("max_compiled_speedup", max, "compiled_speedup"),
        ("min_compiled_vs_transformers", min, "compiled_vs_transformers"),
        ("compile_s_max", max, "compile_s"),
    )
    for name, pick, column in extremes:
        if all(column in r for r in rows):
            out[name] = round(pick(r[column] for r in rows), 4)
    return out


def summarize_serving(batch_rows: Sequence[Row]) -> dict[str, float]:
    """Flat metrics of serving.py's rows.

    batch{B}_{weights}_tok_s and batch{B}_{weights}_vs_batch1: the batching engine's tokens/s at
    batch B and its gain over batch 1; decode_{weights}_tok_s: batch 1 alone, and int8_vs_fp32
    their ratio; max_batch_vs_batch1: the gain at the largest batch for the first kind of weights.
    With the compiled engine's rows (weights "fp32_compiled", "int8_compiled"), also
    int8_vs_fp32_compiled and max_batch_vs_batch1_compiled, the same two figures compiled.
    """
    out: dict[str, float] = {}
    for r in batch_rows:
        out[f"batch{r['batch']}_{r['weights']}_tok_s"] = round(r["tok_s"], 4)
        if "vs_batch1" in r:
            out[f"batch{r['batch']}_{r['weights']}_vs_batch1"] = round(r["vs_batch1"], 4)
    single = {r["weights"]: r["tok_s"] for r in batch_rows if r["batch"] == 1}
    out.update({f"decode_{name}_tok_s": round(rate, 4) for name, rate in single.items()})
    if "int8" in single and "fp32" in single:
        out["int8_vs_fp32"] = round(single["int8"] / single["fp32"], 4)
    if "int8_compiled" in single and "fp32_compiled" in single:
        out["int8_vs_fp32_compiled"] = round(single["int8_compiled"] / single["fp32_compiled"], 4)
    if batch_rows and "vs_batch1" in batch_rows[0]:
        first = [r for r in batch_rows if r["weights"] == batch_rows[0]["weights"]]
        out["max_batch_vs_batch1"] = round(max(first, key=lambda r: r["batch"])["vs_batch1"], 4)
        compiled = [r for r in batch_rows if r["weights"] == "fp32_compiled"]
        if compiled:
            out["max_batch_vs_batch1_compiled"] = round(max(compiled, key=lambda r: r["batch"])["vs_batch1"], 4)
    return out


def write_batch_table(rows: Sequence[Row], path: str | Path) -> None:
    """Write serving.py's batching rows as CSV (BATCH_COLUMNS), atomically."""
    _write_csv(rows, [c for c in BATCH_COLUMNS if all(c in r for r in rows)], path)


def read_batch_table(path: str | Path) -> list[Row]:
    """The rows written by write_batch_table (batch as int, weights as text, the rest float)."""
    return _read_csv(
        path,
        lambda column, value: value if column == "weights" else (int(value) if column == "batch" else float(value)),
    )


def write_table(rows: Sequence[Row], path: str | Path) -> None:
    """Write the rows as CSV (one line per point; the COLUMNS the rows have, in that order), atomically."""
    columns = (*COLUMNS, COUNTERPART_COLUMN, COMPILED_COUNTERPART_COLUMN)
    _write_csv(rows, [c for c in columns if all(c in r for r in rows)], path)


def _write_csv(rows: Sequence[Row], columns: Sequence[str], path: str | Path) -> None:
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

    return _read_csv(path, parse)


def _read_csv(path: str | Path, parse: Callable[[str, str], int | float | str]) -> list[Row]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        return [{k: parse(k, v) for k, v in r.items()} for r in rows]
    except (OSError, ValueError, TypeError) as err:
        raise NanollmError(f"cannot read {path} ({err}); run `dvc repro bench_kvcache` first") from None
