"""`nanollm train_tokenizer`: train the byte-level BPE tokenizer on the corpus train split.

Training and the file format live in nanollm.tokenizer; this module wires paths, metrics and an
MLflow run of its own (one per tokenizer: every model trained on it shares it), logged to the
experiment `<tracking.experiment>-tokenizers` so that the models' runs table lists models only.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from stages.cli import StageContext, pass_context, path_option

_MB = 10**6  # megabytes are 10^6 bytes, as in the download metrics


@click.command("train_tokenizer")
@path_option("--corpus", "data/corpus", "Corpus folder (train/val shards + manifest.json).")
@path_option("--out", "data/tokenizer", "Tokenizer folder to (re)write: tokenizer.json.")
@path_option(
    "--metrics", "metrics/tokenizer.json", "Metrics JSON: vocab size, val bytes/token, training time.", folder=False
)
@pass_context
def command(ctx: StageContext, corpus: Path, out: Path, metrics: Path) -> None:
    """Train the tokenizer from params `tokenizer` (or point at tiktoken's cached GPT-2) and measure it."""
    from nanollm.atomic import atomic_path, write_json
    from nanollm.config import flatten
    from nanollm.data.corpus import iter_documents, read_manifest
    from nanollm.tokenizer import FILENAME, bytes_per_token, create_tokenizer, gpt2, load_tokenizer
    from nanollm.tracking.runs import make_tracker, run_tags
    from nanollm.tracking.store import TOKENIZER_RUNS

    cfg = ctx.config.tokenizer
    train_bytes = read_manifest(corpus)["splits"]["train"]["bytes"]
    run_name = "tokenizer-gpt2" if cfg.kind == "gpt2" else f"tokenizer-bpe-{cfg.vocab_size}"
    tracker = make_tracker(ctx.config.tracking, ctx.root, runs=TOKENIZER_RUNS)
    with tracker:
        tracker.start(run_name=run_name, tags=run_tags(ctx.root, stage="train_tokenizer"))
        tracker.log_params({**flatten({"tokenizer": ctx.config.to_dict()["tokenizer"]}), "seed": ctx.config.seed})
        start = time.perf_counter()
        with atomic_path(out, directory=True) as tmp:
            create_tokenizer(cfg, iter_documents(corpus, "train"), tmp, workers=ctx.threads)
        seconds = time.perf_counter() - start
        tok = load_tokenizer(out)  # what every later stage will load

        # GPT-2 is the reference point, measured when tiktoken's files are already cached (never downloaded).
        encoders = [tok.encode_batch]
        if gpt2.is_cached():
            encoders.append(gpt2.load_encoding().encode_ordinary_batch)
        ratios = bytes_per_token(iter_documents(corpus, "val"), *encoders)
        summary: dict[str, float] = {"vocab_size": tok.vocab_size, "val_bytes_per_token": round(ratios[0], 4)}
        if len(ratios) > 1:
            summary["gpt2_val_bytes_per_token"] = round(ratios[1], 4)
        if cfg.kind == "bpe":
            summary |= {"train_seconds": round(seconds, 3), "train_mb_per_s": round(train_bytes / _MB / seconds, 2)}
        write_json(metrics, summary)
        tracker.set_tags({"tokenizer.sha256": tok.sha256})
        tracker.log_metrics(summary)
        tracker.log_artifact(out / FILENAME)
