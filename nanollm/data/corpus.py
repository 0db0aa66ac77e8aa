"""The corpus folder: train/val JSONL shards plus manifest.json, written atomically and read back in order.

This module owns the split and the content hashes; where documents come from is sources.py's job,
which documents are near-copies of each other is near_duplicates.py's, turning text into tokens is
tokens.py's.

Folder contract: `train-00000.jsonl`, ..., `val-00000.jsonl`, ... hold one `{"id", "text"}` object per
line; `manifest.json` holds `{"source", "seed", "val_fraction", "sha256", "replaced_bytes",
"near_duplicates", "splits": {"train": {"documents", "bytes", "sha256", "shards"}, "val": {...}}}`,
where "near_duplicates" is null or the settings and counts of the families that the split kept
together. Hashes (see `content_sha256`): a split's sha256 covers its texts in order, each as an
8-byte little-endian UTF-8 length then the bytes (unambiguous even for texts holding NUL); the
top-level sha256 is that of `"train:<train sha256>\\nval:<val sha256>\\n"`, so it changes iff any
split's content or order does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

from tqdm import tqdm

from nanollm.atomic import atomic_path, write_json
from nanollm.data.sources import Document
from nanollm.errors import NanollmError

__all__ = ["SPLITS", "MANIFEST", "content_sha256", "iter_documents", "read_manifest", "split_of", "write_corpus"]

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
MANIFEST = "manifest.json"
_REBUILD = "re-run `dvc repro download` (or `nanollm download`)"
_SPOOL = "stream.jsonl"  # the documents in stream order while families are found; deleted before the rename


class DocumentFamilies(Protocol):
    """Groups a stream of documents into families that the split keeps together
    (nanollm.data.near_duplicates.NearDuplicateFamilies is the one in use)."""

    def add(self, text: str) -> None:
        """Take the next document of the stream."""

    def labels(self) -> Sequence[int]:
        """Per document, in stream order, the number (0-based) of the first document of its family."""

    def summary(self) -> dict[str, Any]:
        """Settings and counts, stored in the manifest as "near_duplicates"."""


def split_of(doc_id: str, seed: int, val_fraction: float) -> str:
    """'val' or 'train', from a seeded hash of the document id alone.

    Depending only on (seed, id) makes the split stable when documents are added or removed, and
    independent of read order; the cost is that the val share is only approximately val_fraction
    (binomial: ±2 sqrt(n f (1-f)) documents), which matters only for tiny corpora.
    """
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def _hash_text(h: Any, data: bytes) -> None:
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def content_sha256(texts: Iterable[str]) -> str:
    """The hex sha256 of a split's texts, as stored in the manifest (see the module docstring)."""
    h = hashlib.sha256()
    for text in texts:
        _hash_text(h, text.encode("utf-8"))
    return h.hexdigest()


def _corpus_sha256(split_hashes: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{s}:{split_hashes[s]}\n" for s in SPLITS).encode()).hexdigest()


class _SplitWriter:
    """Appends one split's documents to numbered shards of about `shard_bytes`, hashing as it goes."""

    def __init__(self, folder: Path, split: str, shard_bytes: int):
        self.folder, self.split, self.shard_bytes = folder, split, shard_bytes
        self.documents = self.bytes = 0
        self.shards: list[str] = []
        self._sha = hashlib.sha256()
        self._file: IO[bytes] | None = None
        self._shard_size = 0

    def write(self, doc: Document) -> None:
        text = doc.text.encode("utf-8")
        line = (json.dumps({"id": doc.id, "text": doc.text}, ensure_ascii=False) + "\n").encode("utf-8")
        if self._file is None or (self._shard_size and self._shard_size + len(line) > self.shard_bytes):
            self._next_shard()
        assert self._file is not None
        self._file.write(line)
        self._shard_size += len(line)
        self.documents += 1
        self.bytes += len(text)
        _hash_text(self._sha, text)

    def _next_shard(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.shards):05d}.jsonl"
        self._file = open(self.folder / name, "wb")  # closed by close() or the next shard
        self.shards.append(name)
        self._shard_size = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def summary(self) -> dict[str, Any]:
        return {
            "documents": self.documents,
            "bytes": self.bytes,
            "sha256": self._sha.hexdigest(),
            "shards": self.shards,
        }


def write_corpus(
    documents: Iterable[Document],
    out_dir: str | os.PathLike[str],
    *,
    seed: int,
    val_fraction: float,
    shard_bytes: int,
    source_description: dict[str, Any],
    families: DocumentFamilies | None = None,
) -> dict[str, Any]:
    """Split `documents` into train/val shards under `out_dir` and write the manifest; return it.

    Without `families` each document is split by its own id (`split_of`); with them, by the id of
    the first document of its family, so a family lands whole on one side. Families are known only
    once the stream has ended, so then the documents are first spooled to a file in the new folder
    (the corpus's size again on disk for a moment; the source is still read once) and split from it.

    The folder is built next to `out_dir` and renamed into place only when complete, so on any
    error (including an empty corpus or split, which raise NanollmError) `out_dir` is left as it was.
    Documents are streamed: memory use is one document plus the open shard buffers (plus, with
    families, their index while they are found, see near_duplicates.py, and 9 bytes per document
    while splitting).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if shard_bytes < 1:
        raise ValueError(f"shard_bytes must be positive, got {shard_bytes}")
    start = time.perf_counter()
    with atomic_path(out_dir, directory=True) as tmp:
        writers = {split: _SplitWriter(tmp, split, shard_bytes) for split in SPLITS}
        replaced = 0
        try:
            if families is None:
                placed = ((doc, split_of(doc.id, seed, val_fraction)) for doc in documents)
            else:
                placed = _split_by_family(documents, families, tmp / _SPOOL, seed, val_fraction)
            for doc, split in tqdm(placed, desc="corpus", unit="doc", disable=None):
                writers[split].write(doc)
                replaced += doc.replaced_bytes
        finally:
            for writer in writers.values():
                writer.close()
        (tmp / _SPOOL).unlink(missing_ok=True)
        splits = {split: writer.summary() for split, writer in writers.items()}
        _check_not_empty(splits, val_fraction)
        manifest = {
            "source": source_description,
            "seed": seed,
            "val_fraction": val_fraction,
            "sha256": _corpus_sha256({s: splits[s]["sha256"] for s in SPLITS}),
            "replaced_bytes": replaced,
            "near_duplicates": families.summary() if families is not None else None,
            "splits": splits,
        }
        write_json(tmp / MANIFEST, manifest)
    log.info(
        "wrote %s: %s; %d bytes replaced; %.1f s",
        out_dir,
        ", ".join(
            f"{s} {v['documents']} documents {v['bytes'] / 1e6:.2f} MB in {len(v['shards'])} shard(s)"
            for s, v in splits.items()
        ),
        replaced,
        time.perf_counter() - start,
    )
    return manifest


def _split_by_family(
    documents: Iterable[Document], families: DocumentFamilies, spool: Path, seed: int, val_fraction: float
) -> Iterator[tuple[Document, str]]:
    """Each document with its split, the split of its family's first document: two passes over a spool."""
    with open(spool, "wb") as f:
        for doc in tqdm(documents, desc="near-duplicates", unit="doc", disable=None):
            families.add(doc.text)
            record = {"id": doc.id, "text": doc.text, "replaced_bytes": doc.replaced_bytes}
            f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    labels = families.labels()
    in_val = bytearray(len(labels))  # per document: 1 if it (as the first of a family) went to val
    with open(spool, "rb") as f:
        for number, line in enumerate(f):
            record = json.loads(line)
            first = labels[number]
            if first == number:
                in_val[number] = split_of(record["id"], seed, val_fraction) == "val"
            yield Document(record["id"], record["text"], record["replaced_bytes"]), "val" if in_val[first] else "train"


def _check_not_empty(splits: dict[str, dict[str, Any]], val_fraction: float) -> None:
    total = sum(v["documents"] for v in splits.values())
    if total == 0:
        raise NanollmError(
            "the data source yielded no documents (empty ones are skipped); check data.source, data.paths and the files"
        )
    if splits["val"]["documents"] == 0:
        raise NanollmError(
            f"the val split is empty: none of the {total} documents hashed into it at "
            f"data.val_fraction={val_fraction}; raise data.val_fraction or add documents"
        )
    if splits["train"]["documents"] == 0:
        raise NanollmError(
            f"the train split is empty: all {total} documents hashed into val at data.val_fraction={val_fraction}; "
            "lower data.val_fraction or add documents"
        )


def read_manifest(corpus_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The corpus manifest, checked for the keys readers rely on; NanollmError if missing or invalid."""
    path = Path(corpus_dir) / MANIFEST
    if not path.is_file():
        raise NanollmError(f"{path}: corpus manifest not found; {_REBUILD}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise NanollmError(f"{path}: not valid JSON ({err}); {_REBUILD}") from None
    if not _manifest_ok(manifest):
        raise NanollmError(f"{path}: not a corpus manifest (missing sha256 or train/val splits); {_REBUILD}")
    return manifest


def _manifest_ok(manifest: Any) -> bool:
    if not isinstance(manifest, dict) or not isinstance(manifest.get("sha256"), str):
        return False
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        return False
    for split in SPLITS:
        info = splits.get(split)
        if not isinstance(info, dict):
            return False
        if not all(isinstance(info.get(k), int) for k in ("documents", "bytes")):
            return False
        if not isinstance(info.get("sha256"), str) or not isinstance(info.get("shards"), list):
            return False
    return True


def iter_documents(corpus_dir: str | os.PathLike[str], split: str) -> Iterator[str]:
    """The texts of one split, in the order they were written, streamed shard by shard.

    Once the last shard is read, the document count and sha256 are checked against the manifest
    (hashing costs ~1 s per GB), so a corrupted or hand-edited corpus fails loudly downstream.
    """
    corpus_dir = Path(corpus_dir)
    manifest = read_manifest(corpus_dir)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    info = manifest["splits"][split]
    h, count = hashlib.sha256(), 0
    for name in info["shards"]:
        path = corpus_dir / name
        if not path.is_file():
            raise NanollmError(f"{path}: corpus shard listed in the manifest is missing; {_REBUILD}")
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                    raise NanollmError(f"{path}:{lineno}: corrupt corpus line; {_REBUILD}") from None
                _hash_text(h, text.encode("utf-8"))
                count += 1
                yield text
    if count != info["documents"] or h.hexdigest() != info["sha256"]:
        raise NanollmError(
            f"{corpus_dir}: the {split} shards do not match the manifest ({count} documents read, "
            f"{info['documents']} expected, or the content hash differs); {_REBUILD}"
        )


def batched_texts(texts: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    """Consecutive runs of `texts` of at least `max_chars` characters (the last may hold fewer).

    Lazy: a corpus streams through in batches of bounded size (the tokenizer trainer and the
    tokenize stage both work batch by batch).
    """
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
