"""`nanollm download`: stream documents from data.source into the corpus folder, then write metrics.

Reading, splitting and hashing live in nanollm.data; this module only wires config, paths and metrics.
No MLflow run here: pretrain logs the corpus sha256 with the model it trains.
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
    "Metrics JSON: documents and MB per split, replaced bytes, seconds.",
    folder=False,
)
@pass_context
def command(ctx: StageContext, out: Path, metrics: Path) -> None:
    """Build the raw text corpus from data.source (stdlib, files or hf), split by a seeded hash."""
    from nanollm.atomic import write_json
    from nanollm.data.corpus import write_corpus
    from nanollm.data.sources import open_source

    data = ctx.config.data
    start = time.perf_counter()
    source = open_source(data)
    manifest = write_corpus(
        source,
        out,
        seed=ctx.config.seed,
        val_fraction=data.val_fraction,
        shard_bytes=data.shard_mb * _MB,
        source_description=source.description,
    )
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    write_json(
        metrics,
        {
            "train_documents": train["documents"],
            "train_mb": round(train["bytes"] / _MB, 3),
            "val_documents": val["documents"],
            "val_mb": round(val["bytes"] / _MB, 3),
            "replaced_bytes": manifest["replaced_bytes"],
            "empty_documents": source.stats.empty_documents,
            "seconds": round(time.perf_counter() - start, 2),
        },
    )
