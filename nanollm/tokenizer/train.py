"""Build a tokenizer folder from the `tokenizer` config: train BPE or point at GPT-2, save, reload.

The algorithm is bpe.py's and the file format tokenizer.py's; this module only wires them to
the config, so the train_tokenizer stage stays a thin command.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from nanollm.config import TokenizerConfig
from nanollm.tokenizer.bpe import train_bpe
from nanollm.tokenizer.patterns import SPLIT_PATTERNS
from nanollm.tokenizer.tokenizer import FILENAME, Tokenizer, load_tokenizer, save_bpe, save_gpt2

log = logging.getLogger(__name__)


def create_tokenizer(
    cfg: TokenizerConfig, documents: Iterable[str], out_dir: str | os.PathLike[str], *, progress: bool = True
) -> Tokenizer:
    """Write `out_dir`/tokenizer.json for `cfg` and return it loaded (validated) through tiktoken.

    kind=bpe trains on `documents`; vocab_size counts the 256 bytes and the special tokens, and
    is a maximum: a corpus too small to fill it yields a smaller vocabulary (with a warning).
    kind=gpt2 reads no documents and needs tiktoken's GPT-2 files in its local cache.
    """
    path = Path(out_dir) / FILENAME
    if cfg.kind == "gpt2":
        save_gpt2(path, cfg.special_tokens)
    else:
        num_merges = cfg.vocab_size - 256 - len(cfg.special_tokens)
        pattern = SPLIT_PATTERNS[cfg.split_pattern]
        merges = train_bpe(documents, num_merges, pattern, progress=progress)
        save_bpe(path, merges, cfg.split_pattern, pattern, cfg.special_tokens)
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size < cfg.vocab_size and cfg.kind == "bpe":
        log.warning(
            "vocabulary has %d tokens, fewer than tokenizer.vocab_size=%d", tokenizer.vocab_size, cfg.vocab_size
        )
    return tokenizer
