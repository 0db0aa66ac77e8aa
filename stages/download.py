"""`nanollm download`: stream documents from data.source into the corpus folder, then write metrics.

Reading, grouping near-duplicates, splitting and hashing live in nanollm.data; this module only wires
config, paths and metrics. No MLflow run here: pretrain logs the corpus sha256 with the model it trains.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from stages.cli import StageContext, pass_context, path_option

# Megabytes in the metrics and in data.shard_mb are 10^6 bytes, like `du --si`.
_MB = 10**6


@click.command("download")
@path_option("--out", "data/corpus", "Corpus folder to (re)write: train/val shards and manifest.json.")
@path_option(
    "--metrics",
    "metrics/download.json",
    "Metrics JSON: documents and MB per split, near-duplicate families, skipped files, seconds.",
    folder=False,
)
@pass_context
def command(ctx: StageContext, out: Path, metrics: Path) -> None:
    """Build the raw text corpus from data.source (stdlib, files or hf), near-duplicate families on one side."""
    from nanollm.atomic import write_json
    from nanollm.data.corpus import write_corpus
    from nanollm.data.near_duplicates import NearDuplicateFamilies
    from nanollm.data.sources import open_source

    data = ctx.config.data
    start = time.perf_counter()
    source = open_source(data)
    families = None
    if data.near_dup_threshold is not None:
        families = NearDuplicateFamilies(
            data.near_dup_threshold, num_perm=data.near_dup_num_perm, shingle=data.near_dup_shingle
        )
    manifest = write_corpus(
        source,
        out,
        seed=ctx.config.seed,
        val_fraction=data.val_fraction,
        shard_bytes=data.shard_mb * _MB,
        source_description=source.description,
        families=families,
    )
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    near = manifest["near_duplicates"] or {}  # null when data.near_dup_threshold is null
    write_json(
        metrics,
        {
            "train_documents": train["documents"],
            "train_mb": round(train["bytes"] / _MB, 3),
            "val_documents": val["documents"],
            "val_mb": round(val["bytes"] / _MB, 3),
            "near_duplicate_families": near.get("families"),
            "near_duplicate_documents": near.get("grouped_documents"),
            "replaced_bytes": manifest["replaced_bytes"],
            "empty_documents": source.stats.empty_documents,
            "binary_files": dict(sorted(source.stats.binary_files.items())),
            "seconds": round(time.perf_counter() - start, 2),
        },
    )
