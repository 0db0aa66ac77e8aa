"""Near-duplicate families, so that near-copies of a document land on the same side of the train/val split.

This module owns the grouping: word shingles, MinHash signatures, an LSH index (rensa) and union-find
over the documents of a stream. Splitting by family (and spooling the stream so that it is read once)
is corpus.py's job; reading documents is sources.py's.

The rule: a document's shingles are its runs of `shingle` consecutive words (`\\w+`, case kept); two
documents match when their estimated Jaccard similarity (the share of equal MinHash slots, checked
for every LSH candidate) is at least `threshold`; families are the connected components of matches,
and the first document of a family (in stream order) decides the split of all of it. Nothing is
removed: near-copies stay in the corpus, on one side.

On the stdlib at the defaults (J >= 0.5, 5-word shingles, 128 slots) there are 14 families holding
94 of 730 documents: the `encodings/` codec tables and CJK codec wrappers, plus a few copied modules
(lib2to3's fix_intern/fix_reload, the sre_* shims). Over 21 seeds the val split held 93 documents
with an exact J >= 0.5 near-copy in train under the plain id-hash split and 2 with these families
(the misses are pairs whose estimate fell just under the threshold); grouping at J >= 0.6 or 0.7
left 36 and 59 (`python benchmarks/split_leaks.py --thresholds 0.5,0.6,0.7`). Single linkage
is what a leak-free split needs (a chain a~b~c must not straddle it), at a price: families can
grow large. The stdlib's largest by size is 12 DOS code pages (0.41 MB,
3.6% of the corpus), so a seed that draws it into val makes val about 40% code pages.

Families are known only at the end of the stream (a later document can merge two), which is why
corpus.py spools the documents before splitting them. The one-pass alternative, "each document
joins the family of the earliest document it matches, whose first document has already decided
the split", cannot merge: on the stdlib at J >= 0.5 it left 16 documents bridging two families, and
for 2 of 10 seeds 13 val documents with a J >= 0.5 copy in train, more than the id-hash split's 3-8.

Library, measured on the stdlib corpus (730 documents, 11 MB, Python 3.11, one core of a 2-core
machine; 128 permutations, 5-word shingles, 16 bands; each document shingled, signed, queried and
inserted in turn; the `\\w+` shingling alone takes 0.5-0.7 s of it):
| library | stream time | peak RSS added | index per document (200k documents) |
| --- | --- | --- | --- |
| rensa 0.5.0 (Rust) | 0.79 s | 6 MB | 1.4 KB (2.7 KB at 32 bands) |
| datasketch 2.0.0 (numpy) | 2.43 s | 29 MB | 6.0 KB (11.4 KB at 32 bands) |
| datatrove 0.10.1 (signature step, numpy) | 3.87 s | 65 MB | on disk |
rensa and datasketch both estimate Jaccard within ~0.035 (sd) of the exact value over the 1,071
stdlib pairs with J >= 0.3. datatrove's clustering is a four-step on-disk batch pipeline (signatures,
sorted buckets, union-find, filter) built for clusters of machines, and it brings huggingface_hub,
loguru and multiprocess along. rensa is the fastest and the leanest; its costs are that signatures
change between its algorithm versions (hence the `<0.6` pin; the version is in the manifest) and
that LSH bands must divide `num_perm`.

Cost: documents are never held here, but the index grows with the corpus: ~3.4 KB per document
at the defaults while indexing (mostly rensa's 32 LSH bands, which the threshold sets; then a uint32
signature per document for checking candidates, and union-find), measured over 200k documents; 64
slots still cost 3.1 KB, since the threshold then needs 32 bands of 2 rows. That is ~2.5 MB for the
stdlib, ~0.2 GB for a 300 MB OpenWebText subset (~64k documents) and ~27 GB for all of OpenWebText
(8M documents): cap that with data.max_bytes or set data.near_dup_threshold to null. Time: ~19 MB/s
of text on one core (shingling in Python dominates), 0.6 s for the stdlib. Exact copies (every slot
equal to an indexed document's) are not indexed, which bounds the index for corpora full of copies.
`labels()` frees the index.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
from typing import Any

import numpy as np
from rensa import RMinHash, RMinHashLSH

__all__ = ["NearDuplicateFamilies", "candidate_probability", "choose_bands", "shingles"]

log = logging.getLogger(__name__)

_WORD = re.compile(r"\w+")
# The families are a property of the corpus, not of the split seed: one fixed MinHash seed keeps
# them the same whichever data seed places them.
_MINHASH_SEED = 0
# A pair at exactly the threshold becomes a candidate with at least this probability; fewer bands
# would save memory but miss it. At the defaults (J >= 0.5, 128 slots) this picks 32 bands of 4 rows
# (0.87); 64 bands of 2 would make even a pair at J = 0.2 a candidate 93% of the time, and every
# candidate costs a signature comparison.
_MIN_CANDIDATE_PROBABILITY = 0.85
# Documents per growth step of the signature table (then doubling).
_INITIAL_CAPACITY = 1024


def shingles(text: str, size: int) -> list[str]:
    """The runs of `size` consecutive words of `text` (repeats kept: MinHash ignores them).

    A text with fewer words is one shingle of all of them; one with no word at all (only
    punctuation) is its stripped self, so such texts group only with identical ones.
    """
    words = _WORD.findall(text)
    if len(words) <= size:
        return [" ".join(words) if words else text.strip()]
    return list(map(" ".join, zip(*(words[i:] for i in range(size)), strict=False)))


def candidate_probability(similarity: float, bands: int, rows: int) -> float:
    """The chance that two documents of this Jaccard similarity share a band (the LSH S-curve)."""
    return 1.0 - (1.0 - similarity**rows) ** bands


def choose_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows == num_perm: the fewest bands that make a pair at the threshold
    a candidate with probability >= 0.85 (all num_perm bands of one row if none does)."""
    for bands in range(1, num_perm + 1):
        if num_perm % bands == 0 and candidate_probability(threshold, bands, num_perm // bands) >= (
            _MIN_CANDIDATE_PROBABILITY
        ):
            return bands, num_perm // bands
    return num_perm, 1


class NearDuplicateFamilies:
    """Labels streamed documents with near-duplicate families: call `add` per document, then `labels()`.

    Families are the connected components of the "at or above the threshold" relation (single
    linkage, with union-find), so a document that matches two earlier families merges them.
    """

    def __init__(self, threshold: float, *, num_perm: int = 128, shingle: int = 5):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if num_perm < 1 or shingle < 1:
            raise ValueError(f"num_perm and shingle must be positive, got {num_perm} and {shingle}")
        self.threshold, self.num_perm, self.shingle = threshold, num_perm, shingle
        self.bands, self.rows = choose_bands(threshold, num_perm)
        self._lsh: RMinHashLSH | None = RMinHashLSH(threshold=threshold, num_perm=num_perm, num_bands=self.bands)
        # Per indexed document ("row"): its signature, its union-find parent row, its document number.
        self._signatures = np.empty((_INITIAL_CAPACITY, num_perm), dtype=np.uint32)
        self._parent = np.empty(_INITIAL_CAPACITY, dtype=np.int64)
        self._doc_of_row = np.empty(_INITIAL_CAPACITY, dtype=np.int64)
        self._rows = 0
        self._row_of_doc = np.empty(_INITIAL_CAPACITY, dtype=np.int64)  # per document: its row, or its copy's
        self.documents = 0
        self._labels: np.ndarray | None = None

    def add(self, text: str) -> None:
        """Sign the next document of the stream and join it to every family it matches."""
        if self._lsh is None:
            raise RuntimeError("labels() was already called; make a new NearDuplicateFamilies")
        sketch = RMinHash(num_perm=self.num_perm, seed=_MINHASH_SEED)
        sketch.update(shingles(text, self.shingle))
        signature = np.asarray(sketch.digest(), dtype=np.uint32)  # (num_perm,)
        similar, copy_of = self._similar_rows(sketch, signature)
        if copy_of is not None:  # every slot equal: indexing it would add nothing, it stands for its copy
            row = copy_of
        else:
            row = self._index(sketch, signature)
        for other in similar.tolist():
            self._union(row, other)
        self._row_of_doc = _grown(self._row_of_doc, self.documents)
        self._row_of_doc[self.documents] = row
        self.documents += 1

    def labels(self) -> np.ndarray:
        """Per document, in stream order, the number of its family's first document; frees the index.

        A document that starts a family (or is alone) is labelled with its own number.
        """
        if self._labels is None:
            roots = self._parent[: self._rows].copy()  # (rows,)
            while not np.array_equal(roots[roots], roots):  # pointer jumping: parents only point back
                roots = roots[roots]
            # a root is its family's smallest row (see _union), whose document came first
            self._labels = self._doc_of_row[roots][self._row_of_doc[: self.documents]]
            self._lsh = None  # the index is needed no more: free it (slicing would keep the buffers alive)
            self._signatures = np.empty((0, self.num_perm), dtype=np.uint32)
            self._parent = self._doc_of_row = self._row_of_doc = np.empty(0, dtype=np.int64)
            groups = _family_sizes(self._labels)
            log.info(
                "near-duplicates (J >= %g over %d-word shingles): %d families of 2+ hold %d of %d documents "
                "(largest %d); the split keeps each on one side",
                self.threshold,
                self.shingle,
                groups.size,
                groups.sum(),
                self.documents,
                groups.max(initial=0),
            )
        return self._labels

    def _similar_rows(self, sketch: RMinHash, signature: np.ndarray) -> tuple[np.ndarray, int | None]:
        """Indexed rows at or above the threshold, and one whose signature equals this one (or None)."""
        assert self._lsh is not None
        rows = np.asarray(self._lsh.query(sketch), dtype=np.int64)  # (candidates,)
        if not rows.size:
            return rows, None
        agreement = (self._signatures[rows] == signature).mean(axis=1)  # (candidates,) estimated Jaccard
        copies = rows[agreement == 1.0]
        return rows[agreement >= self.threshold], int(copies.min()) if copies.size else None

    def _index(self, sketch: RMinHash, signature: np.ndarray) -> int:
        assert self._lsh is not None
        row = self._rows
        self._signatures = _grown(self._signatures, row)
        self._parent = _grown(self._parent, row)
        self._doc_of_row = _grown(self._doc_of_row, row)
        self._signatures[row] = signature
        self._parent[row] = row
        self._doc_of_row[row] = self.documents
        self._lsh.insert(row, sketch)
        self._rows += 1
        return row

    def _find(self, row: int) -> int:
        parent = self._parent
        while parent[row] != row:
            parent[row] = parent[parent[row]]  # path halving
            row = int(parent[row])
        return row

    def _union(self, a: int, b: int) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra != rb:  # the smaller row stays the root, so a root is always its family's earliest row
            self._parent[max(ra, rb)] = min(ra, rb)

    def summary(self) -> dict[str, Any]:
        """Settings and counts (families of 2 or more documents, the documents in them, the largest)."""
        groups = _family_sizes(self.labels())
        return {
            "method": "minhash-lsh",
            "library": f"rensa {importlib.metadata.version('rensa')} (algorithm {RMinHash.ALGORITHM_VERSION})",
            "threshold": self.threshold,
            "num_perm": self.num_perm,
            "shingle_words": self.shingle,
            "bands": self.bands,
            "rows": self.rows,
            "candidate_probability_at_threshold": round(
                candidate_probability(self.threshold, self.bands, self.rows), 3
            ),
            "documents": self.documents,
            "families": int(groups.size),
            "grouped_documents": int(groups.sum()),
            "largest_family_documents": int(groups.max(initial=0)),
        }


def _family_sizes(labels: np.ndarray) -> np.ndarray:
    """The number of documents of each family of 2 or more, from per-document labels."""
    sizes = np.bincount(labels)  # (documents,) members per family, indexed by its first document
    return sizes[sizes > 1]


def _grown(array: np.ndarray, index: int) -> np.ndarray:
    """`array`, doubled along its first axis if `index` is past its end."""
    if index < len(array):
        return array
    return np.concatenate([array, np.empty_like(array)])
