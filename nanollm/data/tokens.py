"""Token memmaps: `<split>.bin` flat arrays of token ids plus a `meta.json` sidecar; write, read, check.

Owns the on-disk format only. Reading text is corpus.py's job and turning it into ids the
tokenizer's; batching tokens for training is the training loop's.

Format: `train.bin`, `val.bin` hold every document's tokens followed by the eot id, as raw
little-endian uint16 when the vocabulary fits (<= 65536 ids: half the disk and page cache of
uint32), else uint32. `meta.json`: {"dtype", "vocab_size", "eot_id", "tokenizer_sha256",
"corpus_sha256", "splits": {"train": {"tokens", "bytes", "documents"}, "val": {...}}}, where
tokens counts the eot separators too. Readers open the files read-only (DVC may hard-link them
into its cache) and check them against the sidecar first.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from nanollm.atomic import atomic_path, write_json
from nanollm.data.corpus import batched_texts
from nanollm.errors import NanollmError

__all__ = [
    "META",
    "TokensMeta",
    "check_compatible",
    "encode_documents",
    "open_split",
    "read_meta",
    "token_dtype",
    "write_tokens",
]

META = "meta.json"
_FIX = "re-run `dvc repro tokenize`"
# Documents are encoded ~1 MB of text per batch: the unit of writing, and of memory (the text
# and its ids for at most _LOOKAHEAD + 1 batches are held at a time).
_BATCH_CHARS = 1 << 20
# Batches handed to the encoder threads before the oldest is written: the threads start on the
# next batch while the main thread writes this one, so no thread waits at a batch boundary.
_LOOKAHEAD = 2
# Short documents are grouped into encoder tasks of at least this many characters, so the
# ~10 us cost of a thread-pool task stays small next to encoding (~0.1 ms per KB).
_TASK_CHARS = 1 << 14

# A batch of documents as token-id sequences (uint32 arrays from encode_documents), with the UTF-8 bytes of their text.
Batch = tuple[Sequence[Sequence[int]], int]


class _Encoder(Protocol):
    def encode_to_numpy(self, text: str) -> np.ndarray: ...


@dataclass(frozen=True)
class TokensMeta:
    """The contents of meta.json (`path` is where it was read from, for error messages)."""

    dtype: str
    vocab_size: int
    eot_id: int
    tokenizer_sha256: str
    corpus_sha256: str
    splits: dict[str, dict[str, int]]  # split -> {"tokens", "bytes", "documents"}
    path: Path | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "path"}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# ---------------------------------------------------------------------------- writing


def encode_documents(
    tokenizer: _Encoder, texts: Iterable[str], *, batch_chars: int = _BATCH_CHARS, num_threads: int | None = None
) -> Iterator[Batch]:
    """Encode `texts` in batches of about `batch_chars` characters; yield (ids per document, UTF-8 bytes).

    `num_threads` threads (default: all CPUs) encode with tiktoken, whose Rust core releases the
    GIL, up to `_LOOKAHEAD` batches ahead of the caller: writing a batch overlaps with encoding
    the next ones. Measured at ~1.0x raw `encode_ordinary_batch` throughput (benchmarks/tokenize_throughput.py).
    """
    threads = num_threads or os.cpu_count() or 1
    window: deque[tuple[list[Future[list[np.ndarray]]], int]] = deque()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="tokenize")
    try:
        for batch in batched_texts(texts, batch_chars):
            tasks = [pool.submit(_encode_all, tokenizer, group) for group in batched_texts(batch, _TASK_CHARS)]
            window.append((tasks, sum(len(t.encode("utf-8")) for t in batch)))
            if len(window) > _LOOKAHEAD:
                yield _collect(*window.popleft())
        while window:
            yield _collect(*window.popleft())
    finally:  # also when the caller stops early: drop the queued work
        pool.shutdown(wait=True, cancel_futures=True)


def _encode_all(tokenizer: _Encoder, texts: list[str]) -> list[np.ndarray]:
    return [tokenizer.encode_to_numpy(text) for text in texts]


def _collect(tasks: list[Future[list[np.ndarray]]], nbytes: int) -> Batch:
    return [ids for task in tasks for ids in task.result()], nbytes


def write_tokens(
    out_dir: str | os.PathLike[str],
    splits: Mapping[str, Iterable[Batch]],
    *,
    vocab_size: int,
    eot_id: int,
    tokenizer_sha256: str,
    corpus_sha256: str,
    total_bytes: Mapping[str, int] | None = None,
    progress: bool = True,
) -> TokensMeta:
    """Stream each split's batches into `<split>.bin` (each document followed by `eot_id`), then meta.json.

    The whole folder is built next to `out_dir` and renamed into place at the end, so a failure
    leaves `out_dir` as it was. `total_bytes` (per split) only sizes the progress bars.
    """
    if not 0 <= eot_id < vocab_size:
        raise ValueError(f"eot_id {eot_id} is outside the vocabulary (0..{vocab_size - 1})")
    dtype = token_dtype(vocab_size)
    stats: dict[str, dict[str, int]] = {}
    with atomic_path(out_dir, directory=True) as tmp:
        for split, batches in splits.items():
            total = (total_bytes or {}).get(split)
            bar = tqdm(
                total=total / 1e6 if total else None,
                desc=f"tokenize {split}",
                unit="MB",
                bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} MB [{elapsed}<{remaining}]" if total else None,
                disable=None if progress else True,
            )
            with bar, open(tmp / f"{split}.bin", "wb") as f:
                stats[split] = {"tokens": 0, "bytes": 0, "documents": 0}
                for docs, nbytes in batches:
                    flat = _flatten(docs, eot_id, vocab_size)
                    # native order (little-endian on x86-64 and arm64); f.write, unlike ndarray.tofile,
                    # reports a full disk as OSError(ENOSPC/EFBIG) rather than a bare short-write message
                    f.write(memoryview(np.ascontiguousarray(flat, dtype=dtype)))
                    stats[split]["tokens"] += flat.size
                    stats[split]["bytes"] += nbytes
                    stats[split]["documents"] += len(docs)
                    bar.update(nbytes / 1e6)
        meta = TokensMeta(dtype.name, vocab_size, eot_id, tokenizer_sha256, corpus_sha256, stats)
        write_json(tmp / META, meta.to_dict())
    return dataclasses.replace(meta, path=Path(out_dir) / META)


def _flatten(docs: Sequence[Sequence[int]], eot_id: int, vocab_size: int) -> np.ndarray:
    """The documents' ids in one array, each document followed by `eot_id`; ValueError on an id outside the vocab."""
    eot = np.array([eot_id], dtype=np.uint32)
    parts: list[np.ndarray] = []
    for ids in docs:
        parts += (ids if isinstance(ids, np.ndarray) else np.array(ids, dtype=np.int64), eot)
    if not parts:
        return eot[:0]
    flat = np.concatenate(parts)  # uint32 for tiktoken's arrays; int64 if a list came in
    low, high = flat.min(), flat.max()
    if low < 0 or high >= vocab_size:
        raise ValueError(f"token id {low if low < 0 else high} is outside the vocabulary (0..{vocab_size - 1})")
    return flat


# ---------------------------------------------------------------------------- reading


def read_meta(tokens_dir: str | os.PathLike[str]) -> TokensMeta:
    """The validated meta.json of a tokens folder; NanollmError naming the file if missing or invalid."""
    path = Path(tokens_dir) / META
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise NanollmError(f"cannot read {path} ({err.strerror or err}); {_FIX}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise NanollmError(f"{path} is not valid JSON ({err}); {_FIX}") from None
    problem = _meta_problem(raw)
    if problem:
        raise NanollmError(f"{path} is invalid: {problem}; {_FIX}")
    fields = {f.name for f in dataclasses.fields(TokensMeta)} - {"path"}
    return TokensMeta(**{k: raw[k] for k in fields}, path=path)


def _meta_problem(raw: Any) -> str | None:
    if not isinstance(raw, dict):
        return "not a JSON object"
    for key, kind in [("dtype", str), ("vocab_size", int), ("eot_id", int), ("tokenizer_sha256", str),
                      ("corpus_sha256", str), ("splits", dict)]:  # fmt: skip
        if not isinstance(raw.get(key), kind) or isinstance(raw.get(key), bool):
            return f"{key} is missing or not a {kind.__name__}"
    if raw["vocab_size"] < 1 or not 0 <= raw["eot_id"] < raw["vocab_size"]:
        return f"eot_id {raw['eot_id']} is not an id of a {raw['vocab_size']}-token vocabulary"
    expected = token_dtype(raw["vocab_size"]).name
    if raw["dtype"] != expected:
        return f"dtype {raw['dtype']} does not match vocab_size {raw['vocab_size']} (expected {expected})"
    for split, info in raw["splits"].items():
        if not isinstance(info, dict) or not all(
            isinstance(info.get(k), int) and info[k] >= 0 for k in ("tokens", "bytes", "documents")
        ):
            return f"splits.{split} needs non-negative integers tokens, bytes and documents"
    return None


def open_split(tokens_dir: str | os.PathLike[str], split: str, meta: TokensMeta | None = None) -> np.ndarray:
    """The split's tokens as a read-only memmap, after checking the file against meta.json.

    An empty split comes back as a read-only empty array (a zero-byte file cannot be mapped).
    """
    tokens_dir = Path(tokens_dir)
    meta = meta or read_meta(tokens_dir)
    if split not in meta.splits:
        raise NanollmError(f"{tokens_dir / META} has no split {split!r} (has: {', '.join(meta.splits)}); {_FIX}")
    path = tokens_dir / f"{split}.bin"
    dtype = np.dtype(meta.dtype)
    count = meta.splits[split]["tokens"]
    try:
        size = path.stat().st_size
    except OSError:
        raise NanollmError(f"{path} is missing; {_FIX}") from None
    if size != count * dtype.itemsize:
        raise NanollmError(
            f"{path} has {size} bytes but meta.json says {count} {dtype.name} tokens ({count * dtype.itemsize} bytes); "
            f"{_FIX}"
        )
    if count == 0:
        empty = np.zeros(0, dtype=dtype)
        empty.flags.writeable = False
        return empty
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def check_compatible(
    meta: TokensMeta,
    tokenizer_sha256: str | None = None,
    vocab_size: int | None = None,
    corpus_sha256: str | None = None,
) -> None:
    """Raise NanollmError unless the token files were made with this tokenizer / vocabulary / corpus."""
    where = meta.path or META
    if tokenizer_sha256 is not None and tokenizer_sha256 != meta.tokenizer_sha256:
        raise NanollmError(
            f"{where}: the tokens were made with tokenizer sha256 {meta.tokenizer_sha256[:12]}, but this tokenizer "
            f"is {tokenizer_sha256[:12]}; {_FIX}"
        )
    if vocab_size is not None and vocab_size != meta.vocab_size:
        raise NanollmError(
            f"{where}: the tokens are for a {meta.vocab_size}-token vocabulary, not {vocab_size}; {_FIX}"
        )
    if corpus_sha256 is not None and corpus_sha256 != meta.corpus_sha256:
        raise NanollmError(
            f"{where}: the tokens were made from corpus sha256 {meta.corpus_sha256[:12]}, not {corpus_sha256[:12]}; "
            f"{_FIX}"
        )
