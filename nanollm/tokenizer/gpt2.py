"""tiktoken's GPT-2 encoding, strictly from its local cache: this module never downloads.

tiktoken fetches `vocab.bpe` and `encoder.json` on first use and caches each under
sha1(url) in TIKTOKEN_CACHE_DIR, else DATA_GYM_CACHE_DIR, else <tmp>/data-gym-cache
(tiktoken/load.py). We check both files are there with the right sha256 before asking
tiktoken for the encoding, so an offline machine gets a clear error at once instead of a
network timeout. URLs and hashes are those of tiktoken_ext/openai_public.py (tiktoken 0.8-0.14).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"
# url -> sha256 of its content
FILES = {
    f"{_BASE_URL}/vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    f"{_BASE_URL}/encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
N_RANKS = 50256  # byte-level tokens plus merges; ids 0..50255
SPECIAL_TOKENS = {"<|endoftext|>": 50256}


class NotCached(Exception):
    """The GPT-2 files are not in tiktoken's cache; str() says where they were looked for."""


def cache_dir() -> Path | None:
    """tiktoken's cache folder, or None when caching is disabled (TIKTOKEN_CACHE_DIR="")."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return Path(os.environ[var]) if os.environ[var] else None
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def missing_files() -> list[str]:
    """The GPT-2 files tiktoken would have to download (empty when everything is cached)."""
    folder = cache_dir()
    if folder is None:
        return list(FILES)
    missing = []
    for url, sha256 in FILES.items():
        path = folder / hashlib.sha1(url.encode()).hexdigest()
        try:
            ok = hashlib.sha256(path.read_bytes()).hexdigest() == sha256
        except OSError:
            ok = False
        if not ok:  # tiktoken would delete a file with the wrong hash and download it again
            missing.append(url)
    return missing


def is_cached() -> bool:
    return not missing_files()


def encoding_kwargs() -> dict[str, Any]:
    """tiktoken.Encoding(**kwargs) arguments for GPT-2, read from the cache; raises NotCached."""
    missing = missing_files()
    if missing:
        names = ", ".join(url.rsplit("/", 1)[1] for url in missing)
        raise NotCached(
            f"{names} not in tiktoken's cache ({cache_dir() or 'caching disabled'}) and the pipeline never downloads; "
            "fill the cache once with network access (python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\", "
            "same TIKTOKEN_CACHE_DIR) or set tokenizer.kind: bpe"
        )
    from tiktoken_ext.openai_public import gpt2

    return gpt2()


def load_encoding() -> Any:
    """tiktoken's GPT-2 `Encoding`, from the cache only; raises NotCached."""
    import tiktoken

    return tiktoken.Encoding(**encoding_kwargs())
