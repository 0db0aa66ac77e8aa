"""`nanollm tokenize`: encode the corpus train/val splits into token memmaps plus meta.json.

Encoding is the tokenizer's (tiktoken, batched over threads) and the file format
nanollm.data.tokens'; this module wires paths and metrics. No MLflow run: pretrain logs the
tokenizer and corpus hashes that meta.json records.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from stages.cli import StageContext, pass_context, path_option

_MB = 10**6  # megabytes are 10^6 bytes, as in the download metrics


@click.command("tokenize")
@path_option("--corpus", "data/corpus", "Corpus folder (train/val shards + manifest.json).")
@path_option("--tokenizer", "data/tokenizer", "Tokenizer folder (tokenizer.json).")
@path_option("--out", "data/tokens", "Tokens folder to (re)write: train.bin, val.bin, meta.json.")
@path_option(
    "--metrics", "metrics/tokenize.json", "Metrics JSON: tokens per split, bytes/token, throughput.", folder=False
)
@pass_context
def command(ctx: StageContext, corpus: Path, tokenizer: Path, out: Path, metrics: Path) -> None:
    """Tokenize every corpus split; each document is followed by <|endoftext|>."""
    from nanollm.atomic import write_json
    from nanollm.data.corpus import SPLITS, iter_documents, read_manifest
    from nanollm.data.tokens import encode_documents, write_tokens
    from nanollm.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    manifest = read_manifest(corpus)
    start = time.perf_counter()
    meta = write_tokens(
        out,
        {split: encode_documents(tok, iter_documents(corpus, split), num_threads=ctx.threads) for split in SPLITS},
        vocab_size=tok.vocab_size,
        eot_id=tok.eot_id,
        tokenizer_sha256=tok.sha256,
        corpus_sha256=manifest["sha256"],
        total_bytes={split: manifest["splits"][split]["bytes"] for split in SPLITS},
    )
    seconds = time.perf_counter() - start
    stats = meta.splits.values()
    total_bytes = sum(s["bytes"] for s in stats)
    text_tokens = sum(s["tokens"] - s["documents"] for s in stats)  # the eot separators carry no bytes
    write_json(
        metrics,
        {
            "train_tokens": meta.splits["train"]["tokens"],
            "val_tokens": meta.splits["val"]["tokens"],
            "bytes_per_token": round(total_bytes / text_tokens, 4) if text_tokens else 0.0,
            "mb_per_s": round(total_bytes / _MB / seconds, 2),
            "seconds": round(seconds, 2),
        },
    )
