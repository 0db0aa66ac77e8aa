"""The tokenizer file (`tokenizer.json`), its validation, and the tiktoken-backed `Tokenizer`.

Training lives in bpe.py; finding tiktoken's cached GPT-2 files lives in gpt2.py.

`tokenizer.json` is pickle-free JSON in one of two formats:
- trained BPE: {"format": "nanollm-bpe/1", "pattern_name": "gpt4", "pattern": <split regex>,
  "vocab_size": int, "special_tokens": {"<|endoftext|>": id, ...}, "merges": [[id_a, id_b], ...]}.
  Ids 0..255 are the bytes; merge i (in rank order) joins two earlier ids into id 256 + i;
  the special tokens take the ids right after the merges, in order. Merges (rather than a
  bytes -> rank table) keep the file small and readable and every token's bytes derivable.
- GPT-2: {"format": "tiktoken", "name": "gpt2", "vocab_size": int, "special_tokens": {...}}:
  a pointer to tiktoken's own files, which must already be in tiktoken's local cache.
The first special token separates documents (`eot_id`). `Tokenizer.sha256` is computed from
the file's bytes when it is loaded, so it can never go stale.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanollm.atomic import write_text
from nanollm.errors import NanollmError
from nanollm.tokenizer import gpt2
from nanollm.tokenizer.patterns import without_surrogates

if TYPE_CHECKING:
    import numpy as np
    import tiktoken

FILENAME = "tokenizer.json"
BPE_FORMAT = "nanollm-bpe/1"
TIKTOKEN_FORMAT = "tiktoken"
_FIX = "re-run `dvc repro train_tokenizer`"
_ESCAPED_BYTES = re.compile("[\udc80-\udcff]+")  # invalid UTF-8 bytes after decode(errors="surrogateescape")


class Tokenizer:
    """A `tiktoken.Encoding` plus what the pipeline needs around it: eot id, sha256, byte lengths.

    `encode` never produces special tokens, even for text containing "<|endoftext|>":
    callers separate documents by appending `eot_id` themselves.

    Round trips: `decode(encode(s)) == s` for every str that is valid Unicode. A str holding
    surrogate code points (no UTF-8 form) is encoded as `patterns.without_surrogates(s)`: a
    lone surrogate becomes U+FFFD, a high+low pair its character (tiktoken's own rule).
    Arbitrary bytes, invalid UTF-8 included, round-trip through `encode_bytes`/`decode_bytes`.
    """

    def __init__(self, encoding: tiktoken.Encoding, special_tokens: Mapping[str, int], *, path: Path, sha256: str):
        self.encoding = encoding
        self.special_tokens = dict(special_tokens)  # in file order; the first separates documents
        self.eot_id: int = next(iter(self.special_tokens.values()))
        self.path = path
        self.sha256 = sha256

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """Encode many texts on tiktoken's thread pool (the Rust core releases the GIL); default: all CPUs."""
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=num_threads or os.cpu_count() or 1)

    def encode_to_numpy(self, text: str) -> np.ndarray:
        """`encode` as a uint32 array, built without a Python list: ~10% faster; the tokenize stage's path."""
        try:
            return self.encoding.encode_to_numpy(text, disallowed_special=())
        except UnicodeEncodeError:  # unlike encode_ordinary, tiktoken's encode_to_numpy has no surrogate fallback
            return self.encoding.encode_to_numpy(without_surrogates(text), disallowed_special=())

    def encode_bytes(self, data: bytes) -> list[int]:
        """Encode raw bytes: the valid UTF-8 runs as `encode` would, each invalid byte as its byte token.

        So `decode_bytes(encode_bytes(b)) == b` for any bytes, and `encode_bytes(s.encode()) == encode(s)`.
        An invalid byte never joins a merge: the split regex works on characters, and it is none.
        (tiktoken's private `_encode_bytes` instead runs BPE over everything from the first
        invalid byte on as one piece, bypassing the split regex.)
        """
        # surrogateescape turns each undecodable byte b into U+DC00 + b, and nothing else into U+DC80..U+DCFF
        text = data.decode("utf-8", errors="surrogateescape")
        ids: list[int] = []
        start = 0
        for bad in _ESCAPED_BYTES.finditer(text):
            ids += self.encode(text[start : bad.start()])
            ids += [self._byte_ids[ord(c) - 0xDC00] for c in bad.group()]
            start = bad.end()
        ids += self.encode(text[start:])
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; bytes that are not valid UTF-8 (a character cut between tokens) become U+FFFD."""
        return self.encoding.decode(_as_list(ids), errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes of `ids` (special tokens as their UTF-8 text); the inverse of `encode_bytes`."""
        return self.encoding.decode_bytes(_as_list(ids))

    def token_byte_lengths(self) -> np.ndarray:
        """Bytes each token id stands for (0 for special tokens), for bits-per-byte metrics."""
        return self._byte_lengths.copy()

    @cached_property
    def _byte_ids(self) -> list[int]:
        # our BPE: byte b is id b; GPT-2 ranks its 256 byte tokens in another order
        return [self.encoding.encode_single_token(bytes([b])) for b in range(256)]

    @cached_property
    def _byte_lengths(self) -> np.ndarray:
        import numpy as np

        special = set(self.special_tokens.values())
        decode = self.encoding.decode_single_token_bytes
        return np.array([0 if i in special else len(decode(i)) for i in range(self.vocab_size)], dtype=np.int64)

    def __repr__(self) -> str:
        return f"Tokenizer({self.encoding.name!r}, vocab_size={self.vocab_size}, path='{self.path}')"


def _as_list(ids: Iterable[int]) -> list[int]:
    tolist = getattr(ids, "tolist", None)  # numpy arrays and torch tensors hold non-Python ints
    return tolist() if tolist is not None else list(ids)


# ---------------------------------------------------------------------------- saving


def save_bpe(
    path: str | os.PathLike[str],
    merges: Sequence[tuple[int, int]],
    pattern_name: str,
    pattern: str,
    special_tokens: Sequence[str],
) -> None:
    """Write a trained BPE tokenizer to `path` (a tokenizer.json), atomically."""
    n = 256 + len(merges)
    header = {
        "format": BPE_FORMAT,
        "pattern_name": pattern_name,
        "pattern": pattern,
        "vocab_size": n + len(special_tokens),
        "special_tokens": {name: n + k for k, name in enumerate(special_tokens)},
    }
    # One merge per line: a 4096 vocab is ~60 KB and diffs line by line.
    fields = [f"  {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}" for key, value in header.items()]
    rows = ",\n".join(f"    [{a}, {b}]" for a, b in merges)
    fields.append('  "merges": [' + (f"\n{rows}\n  " if merges else "") + "]")
    write_text(path, "{\n" + ",\n".join(fields) + "\n}\n")


def save_gpt2(path: str | os.PathLike[str], special_tokens: Sequence[str]) -> None:
    """Write a tokenizer.json that points at tiktoken's GPT-2 encoding (plus any extra special tokens)."""
    ids = dict(gpt2.SPECIAL_TOKENS)
    for name in special_tokens:
        ids.setdefault(name, gpt2.N_RANKS + len(ids))  # extra specials follow <|endoftext|>
    ordered = {name: ids[name] for name in special_tokens}
    doc = {"format": TIKTOKEN_FORMAT, "name": "gpt2", "vocab_size": max(ids.values()) + 1, "special_tokens": ordered}
    write_text(path, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------- loading


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load a tokenizer folder (or its tokenizer.json) into a validated, tiktoken-backed `Tokenizer`.

    Every inconsistency tiktoken would panic on (a missing byte, a duplicate rank) is caught
    first and raised as a one-line NanollmError naming the file.
    """
    path = Path(path)
    file = path if path.suffix == ".json" and not path.is_dir() else path / FILENAME
    try:
        raw = file.read_bytes()
    except OSError as err:
        raise NanollmError(f"cannot read tokenizer {file} ({err.strerror or err}); {_FIX}") from None
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise NanollmError(f"tokenizer {file} is not valid JSON ({err}); {_FIX}") from None
    try:
        if not isinstance(doc, dict):
            raise ValueError("the top level must be a JSON object")
        kind = doc.get("format")
        if kind == BPE_FORMAT:
            encoding, specials = _bpe_encoding(doc)
        elif kind == TIKTOKEN_FORMAT:
            encoding, specials = _tiktoken_encoding(doc)
        else:
            raise ValueError(f"unknown format {kind!r} (expected {BPE_FORMAT!r} or {TIKTOKEN_FORMAT!r})")
    except (ValueError, TypeError, KeyError) as err:
        raise NanollmError(f"tokenizer {file} is invalid: {_reason(err)}; {_FIX}") from None
    except gpt2.NotCached as err:
        raise NanollmError(f"tokenizer {file} needs tiktoken's GPT-2 files: {err}") from None
    return Tokenizer(encoding, specials, path=file, sha256=hashlib.sha256(raw).hexdigest())


def _reason(err: Exception) -> str:
    return f"missing key {err}" if isinstance(err, KeyError) else str(err)


def _bpe_encoding(doc: dict[str, Any]) -> tuple[tiktoken.Encoding, dict[str, int]]:
    import regex
    import tiktoken

    pattern = _typed(doc, "pattern", str)
    try:
        regex.compile(pattern)
    except regex.error as err:
        raise ValueError(f"pattern does not compile ({err})") from None
    ranks = _mergeable_ranks(_typed(doc, "merges", list))
    specials = _special_tokens(doc, first_free=len(ranks))
    return tiktoken.Encoding(
        f"nanollm-bpe-{doc['vocab_size']}", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials
    ), specials


def _mergeable_ranks(merges: list[Any]) -> dict[bytes, int]:
    """bytes -> rank for the 256 bytes and every merge; ranks are 0..n-1 by construction."""
    tokens = [bytes([b]) for b in range(256)]
    ranks = {token: i for i, token in enumerate(tokens)}
    for i, merge in enumerate(merges):
        new_id = 256 + i
        if not (isinstance(merge, list) and len(merge) == 2 and all(_is_int(x) for x in merge)):
            raise ValueError(f"merges[{i}] is {merge!r}, not a pair of token ids")
        a, b = merge
        if not (0 <= a < new_id and 0 <= b < new_id):
            raise ValueError(f"merges[{i}] = {merge} refers to a token that does not exist before id {new_id}")
        token = tokens[a] + tokens[b]
        if token in ranks:
            raise ValueError(f"merges[{i}] = {merge} repeats the bytes of token {ranks[token]} ({token!r})")
        ranks[token] = new_id
        tokens.append(token)
    return ranks


def _special_tokens(doc: dict[str, Any], first_free: int, fixed: Mapping[str, int] | None = None) -> dict[str, int]:
    """Validate {name: id}: ids distinct and right after the ranks (or one of `fixed`'s), vocab_size consistent."""
    specials = _typed(doc, "special_tokens", dict)
    if not specials:
        raise ValueError("special_tokens is empty; it needs at least <|endoftext|>")
    fixed = fixed or {}
    extra = []
    for name, token_id in specials.items():
        if not name or not _is_int(token_id):
            raise ValueError(f"special token {name!r}: {token_id!r} is not a token id")
        if name in fixed:
            if token_id != fixed[name]:
                raise ValueError(f"special token {name!r} must have id {fixed[name]}, not {token_id}")
        else:
            extra.append(token_id)
    if sorted(extra) != list(range(first_free, first_free + len(extra))):
        raise ValueError(
            f"special token ids {sorted(extra)} must be distinct and follow the merges ({first_free}, ...)"
        )
    vocab_size = max([first_free - 1, *specials.values()]) + 1
    if doc.get("vocab_size") != vocab_size:
        raise ValueError(f"vocab_size is {doc.get('vocab_size')!r} but the merges and special tokens make {vocab_size}")
    return dict(specials)


def _tiktoken_encoding(doc: dict[str, Any]) -> tuple[tiktoken.Encoding, dict[str, int]]:
    import tiktoken

    if doc.get("name") != "gpt2":
        raise ValueError(f"tiktoken encoding {doc.get('name')!r} is not supported (only gpt2)")
    specials = _special_tokens(doc, first_free=gpt2.N_RANKS + len(gpt2.SPECIAL_TOKENS), fixed=gpt2.SPECIAL_TOKENS)
    kwargs = gpt2.encoding_kwargs()  # raises gpt2.NotCached before anything is downloaded
    if specials.keys() != gpt2.SPECIAL_TOKENS.keys():
        kwargs["special_tokens"] = {**gpt2.SPECIAL_TOKENS, **specials}
        kwargs.pop("explicit_n_vocab", None)  # tiktoken checks it against ranks + specials
    return tiktoken.Encoding(**kwargs), specials


def _typed(doc: dict[str, Any], key: str, kind: type) -> Any:
    value = doc[key]
    if not isinstance(value, kind):
        raise ValueError(f"{key} must be a JSON {kind.__name__}, got {type(value).__name__}")
    return value


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
