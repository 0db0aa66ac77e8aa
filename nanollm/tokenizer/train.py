"""Build a tokenizer folder from the `tokenizer` config (train BPE or point at GPT-2), and measure it.

The algorithm is bpe.py's and the file format tokenizer.py's; this module only wires them to
the config and computes the compression metric, so the train_tokenizer stage stays a thin command.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence, Sized
from pathlib import Path

from nanollm.config import TokenizerConfig
from nanollm.data.corpus import batched_texts
from nanollm.tokenizer.bpe import train_bpe
from nanollm.tokenizer.patterns import SPLIT_PATTERNS
from nanollm.tokenizer.tokenizer import FILENAME, Tokenizer, load_tokenizer, save_bpe, save_gpt2

log = logging.getLogger(__name__)

# Texts are measured ~4 MB at a time: a few tiktoken batches' worth, so memory stays flat on
# an OpenWebText-size val split.
_MEASURE_CHARS = 1 << 22


def create_tokenizer(
    cfg: TokenizerConfig,
    documents: Iterable[str],
    out_dir: str | os.PathLike[str],
    *,
    progress: bool = True,
    workers: int | None = None,
) -> Tokenizer:
    """Write `out_dir`/tokenizer.json for `cfg` and return it loaded (validated) through tiktoken.

    kind=bpe trains on `documents`; vocab_size counts the 256 bytes and the special tokens, and
    is a maximum: a corpus too small to fill it (no pair left that occurs twice) yields a
    smaller vocabulary, with a warning. kind=gpt2 reads no documents and needs tiktoken's GPT-2
    files in its local cache. The special tokens take the ids right after the merges.
    `workers` counting processes (default: all CPUs) split the text into chunks.
    """
    path = Path(out_dir) / FILENAME
    if cfg.kind == "gpt2":
        save_gpt2(path, cfg.special_tokens)
    else:
        num_merges = cfg.vocab_size - 256 - len(cfg.special_tokens)  # config guarantees >= 0
        pattern = SPLIT_PATTERNS[cfg.split_pattern]
        merges = train_bpe(documents, num_merges, pattern, progress=progress, workers=workers)
        save_bpe(path, merges, cfg.split_pattern, pattern, cfg.special_tokens)
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size < cfg.vocab_size and cfg.kind == "bpe":
        log.warning(
            "vocabulary has %d tokens, fewer than tokenizer.vocab_size=%d", tokenizer.vocab_size, cfg.vocab_size
        )
    return tokenizer


def bytes_per_token(texts: Iterable[str], *encoders: Callable[[list[str]], Sequence[Sized]]) -> list[float]:
    """UTF-8 bytes per token of `texts` under each encoder (a batch of texts -> ids per text), in one pass.

    Higher is better compression. Texts are streamed in batches, so any split size fits in
    memory; an empty input gives 0.0.
    """
    total_bytes = 0
    tokens = [0] * len(encoders)
    for batch in batched_texts(texts, _MEASURE_CHARS):
        total_bytes += sum(len(t.encode("utf-8")) for t in batch)
        for k, encode in enumerate(encoders):
            tokens[k] += sum(map(len, encode(batch)))
    return [total_bytes / n if n else 0.0 for n in tokens]
