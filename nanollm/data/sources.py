"""Document sources for the corpus: the Python standard library, local files, Hugging Face datasets.

Each source streams `Document`s lazily (never the whole corpus in memory), skips empty documents and
binary files (counting both) and applies the document/byte limits. Grouping near-duplicates is
near_duplicates.py's job; splitting and writing the corpus is corpus.py's.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import socket
import sysconfig
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from nanollm.config import NO_VALUE, ConfigError, DataConfig
from nanollm.errors import NanollmError, first_line

log = logging.getLogger(__name__)

# Folders never read by the stdlib source: test suites (a third of the stdlib's bytes, and mostly
# fixtures rather than idiomatic code), third-party packages installed next to it, and
# pydoc_data (0.76 MB of generated English help text in one file: a corpus of code would
# otherwise have 6% of prose in one document, and whichever split drew it would be skewed).
_SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "pydoc_data"})
# Files of data.paths read as records (a document per line or row); any other file is one document.
_RECORD_SUFFIXES = (".jsonl", ".parquet")
# How much of a file decides whether it is text: git, grep and diff look for a NUL in about as much
# (git: the first 8000 bytes), and 8 KB is one read.
_SNIFF_BYTES = 8192
# Legacy-encoded Western text (Latin-1, cp1252) has a few bytes in a hundred that are not UTF-8 (its
# accented letters): it is read, with them replaced and counted. Past a quarter the file is binary, or
# text in an encoding whose letters would all become U+FFFD (Greek or Cyrillic code pages).
_NOT_UTF8_SHARE = 0.25
# Why a file of data.paths was skipped (keys of the download metrics' binary_files). UTF-16/32 text
# has NULs and Greek or Cyrillic code pages are mostly not UTF-8: such text must be converted first.
BINARY_REASONS = {
    "nul_byte": "a NUL byte in the first 8 KB",
    "not_utf8": "over a quarter of the first 8 KB not UTF-8",
}
# Rows per Arrow batch: bounds memory to ~1k documents while keeping per-batch overhead negligible.
_BATCH_ROWS = 1024
_SURROGATE = re.compile("[\ud800-\udfff]")
_TRUTHY = frozenset({"1", "ON", "YES", "TRUE"})
# A TCP connect to the hub takes ~0.1-0.3 s when online; 2 s leaves room for slow links and still
# fails far sooner than `datasets`' own retries (~23 s) when there is no network at all.
_HUB_PROBE_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class Document:
    """One document: an id that is stable across runs (it decides the split) and its text.

    `replaced_bytes` counts input that could not be decoded and became U+FFFD: invalid UTF-8
    bytes, plus one per lone surrogate in text that arrived as `str`.
    """

    id: str
    text: str
    replaced_bytes: int = 0


@dataclass(frozen=True, slots=True)
class SkippedFile:
    """A file of data.paths that is not text: a source's reader yields it in place of a Document."""

    path: str
    reason: str  # a key of BINARY_REASONS


@dataclass
class SourceStats:
    """What one pass over a Source read; filled in while iterating."""

    documents: int = 0
    bytes: int = 0  # UTF-8 bytes of the documents yielded
    empty_documents: int = 0  # skipped: no non-whitespace text
    replaced_bytes: int = 0
    truncated: bool = False  # stopped early by max_documents or max_bytes
    binary_files: Counter[str] = field(default_factory=lambda: Counter(dict.fromkeys(BINARY_REASONS, 0)))


class Source:
    """An iterable of non-empty Documents from one origin, with the limits applied.

    Each iteration re-reads the origin from the start and resets `stats`. `max_bytes` stops after
    the document that reaches it: documents stay whole, so the total overshoots by less than one.
    """

    def __init__(
        self,
        description: dict[str, Any],
        read: Callable[[], Iterator[Document | SkippedFile]],
        *,
        max_documents: int | None = None,
        max_bytes: int | None = None,
    ):
        self.description = {**description, "max_documents": max_documents, "max_bytes": max_bytes}
        self._read = read
        self.max_documents, self.max_bytes = max_documents, max_bytes
        self.stats = SourceStats()

    def __iter__(self) -> Iterator[Document]:
        stats = self.stats = SourceStats()
        docs = self._read()
        examples: dict[str, str] = {}  # per reason, the first file skipped for it
        try:
            for doc in docs:
                if isinstance(doc, SkippedFile):
                    stats.binary_files[doc.reason] += 1
                    examples.setdefault(doc.reason, doc.path)
                    log.debug("skipped %s: %s", doc.path, BINARY_REASONS[doc.reason])
                    continue
                doc, size = _with_valid_unicode(doc)
                if not doc.text.strip():
                    stats.empty_documents += 1
                    continue
                stats.documents += 1
                stats.bytes += size
                stats.replaced_bytes += doc.replaced_bytes
                yield doc
                if self._limit_reached(stats):
                    stats.truncated = True
                    break
        finally:
            docs.close()
        log.info(
            "read %d documents (%.2f MB) from %s%s; skipped %d empty; %d bytes replaced (invalid UTF-8)",
            stats.documents,
            stats.bytes / 1e6,
            self.description["kind"],
            " (stopped at the limit)" if stats.truncated else "",
            stats.empty_documents,
            stats.replaced_bytes,
        )
        for reason, path in examples.items():
            log.info(
                "skipped %d binary file(s) with %s, e.g. %s", stats.binary_files[reason], BINARY_REASONS[reason], path
            )

    def _limit_reached(self, stats: SourceStats) -> bool:
        if self.max_documents is not None and stats.documents >= self.max_documents:
            return True
        return self.max_bytes is not None and stats.bytes >= self.max_bytes


def open_source(cfg: DataConfig) -> Source:
    """The Source that `cfg.source` names. Problems visible up front (no files, no hub) raise here."""
    limits = {"max_documents": cfg.max_documents, "max_bytes": cfg.max_bytes}
    if cfg.source == "stdlib":
        return stdlib_source(**limits)
    if cfg.source == "files":
        return files_source(cfg.paths, cfg.text_field, **limits)
    if cfg.source == "hf":
        return hf_source(cfg.hf_name, cfg.hf_config, cfg.hf_split, cfg.text_field, **limits)
    raise ConfigError("data.source", cfg.source, "is not a known source; use stdlib, files or hf")


# ---------------------------------------------------------------------------- decoding


def decode_utf8(data: bytes) -> tuple[str, int]:
    """Decode UTF-8 with errors="replace"; return the text and how many input bytes were replaced.

    Counting without a custom codec error handler: every byte is either part of a valid sequence
    (and re-encodes to itself) or replaced, and each U+FFFD in the output that was not a genuine
    EF BF BD in the input stands for replaced bytes. So replaced = len(data) - valid bytes.
    """
    text = data.decode("utf-8", errors="replace")
    if "\ufffd" not in text:
        return text, 0
    inserted = text.count("\ufffd") - data.count(b"\xef\xbf\xbd")
    valid_bytes = len(text.encode("utf-8")) - 3 * inserted  # U+FFFD is 3 bytes in UTF-8
    return text, len(data) - valid_bytes


def binary_reason(head: bytes) -> str | None:
    """Why a file that starts with `head` (its first 8 KB) is not text (a key of BINARY_REASONS), or None.

    A NUL byte: never part of text in an ASCII-compatible encoding, and in the first few KB of
    nearly every binary format (PNG, JPEG, zip, gzip, .pyc, executables). Then the share of bytes
    that are not UTF-8 (a multi-byte character cut at 8 KB adds at most 3 of 8192).
    """
    if b"\0" in head:
        return "nul_byte"
    if head and decode_utf8(head)[1] > _NOT_UTF8_SHARE * len(head):
        return "not_utf8"
    return None


def _with_valid_unicode(doc: Document) -> tuple[Document, int]:
    """The document with lone surrogates (from JSON escapes or Arrow) replaced, and its UTF-8 size."""
    try:
        return doc, len(doc.text.encode("utf-8"))
    except UnicodeEncodeError:
        text, n = _SURROGATE.subn("\ufffd", doc.text)
        return Document(doc.id, text, doc.replaced_bytes + n), len(text.encode("utf-8"))


# ---------------------------------------------------------------------------- stdlib


def stdlib_files(root: str | os.PathLike[str]) -> list[str]:
    """Sorted posix paths, relative to `root`, of its .py files outside test folders and site-packages.

    Symlinks that lead outside `root` are skipped, so the corpus is the stdlib and nothing else.
    """
    root = Path(root).resolve()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_DIRS]
        for name in filenames:
            path = Path(dirpath, name)
            if name.endswith(".py") and path.is_file() and path.resolve().is_relative_to(root):
                found.append(path.relative_to(root).as_posix())
    return sorted(found)


def stdlib_source(*, max_documents: int | None = None, max_bytes: int | None = None) -> Source:
    """The running interpreter's standard library, one document per .py file (~11 MB on 3.11).

    Always available offline and code-shaped, so it is the default corpus; the trade-off is that
    it is small (a few million tokens), so models trained on it overfit within minutes.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    if not files:
        raise NanollmError(f"data.source='stdlib': no .py files under {root}; use data.source=files instead")

    def read() -> Iterator[Document]:
        for rel in files:
            text, replaced = decode_utf8((root / rel).read_bytes())
            yield Document(rel, text, replaced)

    description = {"kind": "stdlib", "python": platform.python_version(), "files": len(files)}
    return Source(description, read, max_documents=max_documents, max_bytes=max_bytes)


# ---------------------------------------------------------------------------- local files


def expand_paths(patterns: Iterable[str]) -> list[Path]:
    """Expand paths and globs (`**` recursive, relative to the cwd) into files, in order, without repeats.

    Raises ConfigError (a params mistake) for an empty list, a folder, or a pattern that matches no
    file or only binary files (each file is checked by its first 8 KB until one is text). Binary
    files among text ones are returned: reading skips and counts them.
    """
    import glob

    patterns = list(patterns)
    if not patterns:
        raise ConfigError("data.paths", [], "must list at least one file or glob (e.g. 'my-project/**/*.py')")
    files: dict[str, None] = {}  # an ordered set
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if any(c in expanded for c in "*?["):
            matches = [m for m in sorted(glob.glob(expanded, recursive=True)) if os.path.isfile(m)]
        elif os.path.isdir(expanded):
            raise ConfigError("data.paths", NO_VALUE, f"{pattern!r} is a folder; use a glob such as '{pattern}/**/*'")
        else:
            matches = [expanded] if os.path.isfile(expanded) else []
        if not matches:
            raise ConfigError(
                "data.paths", NO_VALUE, f"{pattern!r} matches no files (relative to {os.getcwd()}); fix the path"
            )
        _check_some_text(pattern, matches)
        files.update(dict.fromkeys(matches))
    return [Path(f) for f in files]


def _check_some_text(pattern: str, matches: list[str]) -> None:
    """ConfigError unless a match is a record file or starts like text."""
    reasons = {}
    for match in matches:
        if Path(match).suffix.lower() in _RECORD_SUFFIXES:
            return
        with open(match, "rb") as f:
            reason = binary_reason(f.read(_SNIFF_BYTES))
        if reason is None:
            return
        reasons.setdefault(reason, match)
    reason, example = next(iter(reasons.items()))
    raise ConfigError(
        "data.paths",
        NO_VALUE,
        f"{pattern!r} matches only binary files ({len(matches)}, e.g. {example!r}: {BINARY_REASONS[reason]}); "
        "narrow the pattern to text files, or convert them to UTF-8",
    )


def files_source(
    paths: Iterable[str], text_field: str = "text", *, max_documents: int | None = None, max_bytes: int | None = None
) -> Source:
    """Local files: .jsonl (one document per line), .parquet (one per row), any other file one document.

    Files that are not .jsonl or .parquet are read as UTF-8 text (code, prose, .txt, .md, .csv...);
    binary ones (see `binary_reason`) are skipped and counted in `stats.binary_files`, so a glob
    over a whole repository (`my-project/**/*`) works. Document ids are the path as matched
    (relative paths stay relative), plus `:line` for .jsonl (1-based, as editors count) and `:row`
    for .parquet (0-based), so they survive moving the project.
    """
    paths = list(paths)
    files = expand_paths(paths)

    def read() -> Iterator[Document | SkippedFile]:
        for path in files:
            suffix = path.suffix.lower()
            if suffix == ".jsonl":
                yield from _read_jsonl(path, text_field)
            elif suffix == ".parquet":
                yield from _read_parquet(path, text_field)
            else:
                yield _read_text_file(path)

    description = {"kind": "files", "paths": paths, "files": len(files), "text_field": text_field}
    return Source(description, read, max_documents=max_documents, max_bytes=max_bytes)


def _read_text_file(path: Path) -> Document | SkippedFile:
    """The file as one document, or SkippedFile if its first 8 KB say it is binary (the rest is then not read)."""
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
        reason = binary_reason(head)
        if reason is not None:
            return SkippedFile(path.as_posix(), reason)
        data = head + f.read()
    text, replaced = decode_utf8(data)
    return Document(path.as_posix(), text, replaced)


def _read_jsonl(path: Path, field: str) -> Iterator[Document]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line, replaced = decode_utf8(raw)
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark that some editors write
            if not line.strip():
                continue
            where = f"{path.as_posix()}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise NanollmError(
                    f"{where}: not valid JSON ({err.msg}); each line must be a JSON object with a {field!r} field"
                ) from None
            if not isinstance(obj, dict) or field not in obj:
                raise NanollmError(f"{where}: no {field!r} field; fix the line or set data.text_field")
            yield Document(where, _as_text(obj[field], where, field), replaced)


def _read_parquet(path: Path, field: str) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise NanollmError(f"{path.as_posix()}: not a readable parquet file ({first_line(err)})") from None
    schema = parquet.schema_arrow
    if field not in schema.names:
        raise NanollmError(
            f"{path.as_posix()}: no column {field!r} (columns: {', '.join(schema.names)}); set data.text_field"
        )
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise NanollmError(f"{path.as_posix()}: column {field!r} holds {kind}, not strings; set data.text_field")
    row = 0
    with parquet:
        for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=[field]):
            for text in batch.column(0).to_pylist():
                yield Document(f"{path.as_posix()}:{row}", text or "")
                row += 1


def _as_text(value: Any, where: str, field: str) -> str:
    if value is None:
        return ""  # a null text is an empty document: skipped and counted
    if not isinstance(value, str):
        raise NanollmError(f"{where}: field {field!r} is a {type(value).__name__}, not a string; set data.text_field")
    return value


# ---------------------------------------------------------------------------- Hugging Face datasets

# Local data files that `datasets` reads with a packaged builder, and the builder's options.
_HF_BUILDERS: dict[str, tuple[str, dict[str, Any]]] = {
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
    ".csv": ("csv", {}),
    ".txt": ("text", {"sample_by": "document"}),  # one document per file, as with source=files
}


def hf_source(
    name: str,
    config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    *,
    max_documents: int | None = None,
    max_bytes: int | None = None,
) -> Source:
    """A Hugging Face dataset, streamed: a hub name, or a local data file, data folder or saved dataset.

    OpenWebText is `Skylion007/openwebtext` on the hub (~38 GB of text); the original project used a
    ~300 MB prefix of it, i.e. `data.max_bytes: 300000000`. Hub names need network access: offline
    (HF_HUB_OFFLINE=1, or no connection within 2 s) they fail at once with a NanollmError instead of
    `datasets`' long retries. Document ids are `<split>/<row>`: stable as long as the order is.
    """
    rows = _open_hf(name, config, split, text_field)

    def read() -> Iterator[Document]:
        yield from _read_hf_rows(rows, name, split, text_field)

    description = {"kind": "hf", "name": name, "config": config, "split": split, "text_field": text_field}
    return Source(description, read, max_documents=max_documents, max_bytes=max_bytes)


def _open_hf(name: str, config: str | None, split: str, field: str) -> Any:
    local = Path(name).expanduser()
    if not local.exists():
        if local.suffix.lower() in _HF_BUILDERS or name.startswith((".", "/", "~")):
            raise ConfigError("data.hf_name", name, f"no such file or folder (relative to {os.getcwd()})")
        reason = _hub_offline_reason()
        if reason:
            raise NanollmError(
                f"data.hf_name={name!r}: the Hugging Face hub is unreachable ({reason}); "
                "set data.source to stdlib or files, or go online"
            )
    import datasets

    try:
        if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
            rows = _saved_split(datasets.load_from_disk(str(local)), local, split)
        elif local.is_file():
            if local.suffix.lower() not in _HF_BUILDERS:
                known = ", ".join(_HF_BUILDERS)
                raise ConfigError("data.hf_name", name, f"unsupported file type; use one of {known}")
            builder, options = _HF_BUILDERS[local.suffix.lower()]
            rows = datasets.load_dataset(
                builder, data_files={split: str(local)}, split=split, streaming=True, **options
            )
        else:  # a local data folder or a hub name
            rows = datasets.load_dataset(str(local) if local.exists() else name, config, split=split, streaming=True)
    except ConfigError:
        raise
    except (OSError, ValueError) as err:  # DatasetNotFoundError, ConnectionError, HTTP errors, bad split/config
        raise NanollmError(
            f"data.hf_name={name!r} (config {config!r}, split {split!r}): {type(err).__name__}: {first_line(err)}; "
            "check data.hf_name/hf_config/hf_split (OpenWebText is 'Skylion007/openwebtext')"
        ) from None
    columns = getattr(rows, "column_names", None)  # None for some streamed datasets: checked per row instead
    if columns is not None and field not in columns:
        raise _no_column(name, field, columns)
    return rows.select_columns([field]) if columns else rows


def _no_column(name: str, field: str, columns: Iterable[str]) -> NanollmError:
    return NanollmError(
        f"data.hf_name={name!r}: no column {field!r} (columns: {', '.join(columns)}); set data.text_field"
    )


def _saved_split(saved: Any, path: Path, split: str) -> Any:
    """The requested split of a `save_to_disk` folder (a Dataset has just one)."""
    if not hasattr(saved, "keys"):
        return saved
    if split not in saved:
        raise ConfigError("data.hf_split", split, f"{path} has splits {', '.join(saved)}; pick one")
    return saved[split]


def _read_hf_rows(rows: Any, name: str, split: str, field: str) -> Iterator[Document]:
    index = 0
    try:
        for batch in rows.iter(batch_size=_BATCH_ROWS):
            if field not in batch:
                raise _no_column(name, field, batch)
            for value in batch[field]:
                where = f"{split}/{index}"
                yield Document(where, _as_text(value, f"data.hf_name={name!r} row {where}", field))
                index += 1
    except (OSError, ValueError) as err:  # the connection dropped, a data file is corrupt
        raise NanollmError(
            f"data.hf_name={name!r}: reading failed after {index} rows: {type(err).__name__}: {first_line(err)}"
        ) from None


def _hub_offline_reason() -> str | None:
    """Why the hub cannot be used right now, or None if it looks reachable."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in _TRUTHY:
            return f"{var}={os.environ[var]}"
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "huggingface_hub offline mode"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # behind a proxy a direct connect proves nothing; let `datasets` try
    if not _reachable(constants.ENDPOINT, _HUB_PROBE_TIMEOUT_S):
        return f"no connection to {constants.ENDPOINT} within {_HUB_PROBE_TIMEOUT_S:g} s"
    return None


def _reachable(url: str, timeout: float) -> bool:
    """Whether a TCP connection to the URL's host opens within `timeout` seconds (DNS included)."""
    parts = urlsplit(url)
    if not parts.hostname:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    opened: list[bool] = []

    def probe() -> None:  # in a thread, because name resolution ignores socket timeouts
        try:
            with socket.create_connection((parts.hostname, port), timeout=timeout):
                opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(opened)
