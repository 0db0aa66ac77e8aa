"""Byte-level BPE training from scratch: count the regex chunks, then merge pairs incrementally.

Owns the algorithm only and returns the merge list; writing the tokenizer file and encoding
with tiktoken belong to nanollm/tokenizer/tokenizer.py. docs/bpe.md explains it at length.

Why it is fast (vocab 8192 on the ~11 MB stdlib train split in ~2 s on 2 cores, where a
naive trainer that re-counts every pair per merge costs ~0.3 s per merge on 1 MB):
1. BPE never merges across regex chunks, so the corpus collapses to a Counter of distinct
   chunks (~60k distinct, ~0.46 MB for the stdlib split): memory grows with the number of
   distinct chunks, not with the corpus. Counting, the only pass over the text, runs in a
   process pool that is fed a bounded number of batches at a time, so any corpus streams.
2. Pair counts are weighted by chunk frequency and kept up to date: an index pair -> chunks
   holding it means a merge touches only those chunks, and a max-heap with lazy invalidation
   (pop, compare with the live count, re-push if stale) finds the next pair in O(log n).
3. Each chunk is a str whose characters are token ids (chr(id)), so finding a pair is
   `str.find` and rewriting a chunk is `str.replace`, both in C. str.replace rewrites left to
   right without overlaps, which is exactly BPE's rule (`aaa` -> `[aa, a]`).

Conventions: bytes 0..255 are ids 0..255 (tiktoken requires id == rank, and a byte's rank ==
its value), merge i creates id 256 + i. Tie-break: among pairs with equal counts the smallest
(id_a, id_b) wins, so training is deterministic (HF tokenizers' BpeTrainer breaks ties the same
way, on its own ids). A pair occurring fewer than `min_frequency` times ends training early
(with a warning): such merges would memorise single chunks.
"""

from __future__ import annotations

import collections
import functools
import heapq
import itertools
import logging
import multiprocessing
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping

import regex
from tqdm import tqdm

from nanollm.data.corpus import batched_texts
from nanollm.errors import NanollmError
from nanollm.tokenizer.patterns import without_surrogates

log = logging.getLogger(__name__)

Pair = tuple[int, int]

# Documents are counted in batches of ~1 MB of text: big enough that pickling a batch and its
# Counter is cheap next to the regex work (~0.1 s per MB), small enough to spread over workers.
_BATCH_CHARS = 1 << 20
# Below this many batches a process pool costs more to start (~0.1 s) than it saves.
_MIN_PARALLEL_BATCHES = 2
# Batches handed to the pool but not yet counted, per worker: enough to keep every worker busy
# while the main process reads the next batch; bounded so an OpenWebText-size corpus (40 GB)
# holds ~2 MB of text per worker in flight, not the whole corpus.
_IN_FLIGHT_PER_WORKER = 2


def train_bpe(
    documents: Iterable[str],
    num_merges: int,
    pattern: str,
    *,
    min_frequency: int = 2,
    workers: int | None = None,
    progress: bool = True,
) -> list[Pair]:
    """Learn up to `num_merges` merges from `documents`, split with the regex `pattern`.

    Returns the merges in rank order: merge i joins ids (a, b) into id 256 + i. Fewer merges
    come back when the corpus runs out of pairs seen `min_frequency` times. Raises
    NanollmError when the documents hold no text at all.
    """
    chunks = count_chunks(documents, pattern, workers=workers, progress=progress)
    if not chunks:
        raise NanollmError("BPE training got no text: every training document is empty; check the corpus train split")
    return learn_merges(chunks, num_merges, min_frequency=min_frequency, progress=progress)


# ---------------------------------------------------------------------------- chunk counting


def count_chunks(
    documents: Iterable[str], pattern: str, *, workers: int | None = None, progress: bool = False
) -> Counter[bytes]:
    """How often each regex chunk (as UTF-8 bytes) occurs in the documents.

    Uses a pool of `workers` processes (default: all CPUs) when the text spans more than
    two ~1 MB batches; small corpora are counted in-process. Documents are read lazily, at
    most `_IN_FLIGHT_PER_WORKER` batches per worker ahead of the counting. Text holding
    surrogates is cleaned as tiktoken does (patterns.without_surrogates) before it is split.
    """
    workers = workers or os.cpu_count() or 1
    batches = batched_texts(filter(None, documents), _BATCH_CHARS)  # empty texts hold no chunks
    head = list(itertools.islice(batches, _MIN_PARALLEL_BATCHES + 1))
    todo = itertools.chain(head, batches)
    count = functools.partial(_count_batch, pattern)
    totals: Counter[str] = Counter()
    bar = tqdm(desc="bpe chunks", unit="MB", bar_format="{desc}: {n:.1f} {unit} [{elapsed}]", disable=_bar(progress))
    with bar:
        if workers > 1 and len(head) > _MIN_PARALLEL_BATCHES:
            # fork (the Linux default) copies nothing we need; each worker compiles the regex once.
            with multiprocessing.Pool(workers) as pool:
                # Pool.imap would read the whole corpus into its task queue: submit in a bounded window.
                window: collections.deque = collections.deque()
                for batch in todo:
                    window.append(pool.apply_async(count, (batch,)))
                    if len(window) >= workers * _IN_FLIGHT_PER_WORKER:
                        _add(totals, bar, *window.popleft().get())
                while window:
                    _add(totals, bar, *window.popleft().get())
        else:
            for batch in todo:
                _add(totals, bar, *count(batch))
    # Encoding only the distinct chunks is ~100x cheaper than encoding the corpus.
    return Counter({chunk.encode("utf-8"): n for chunk, n in totals.items()})


def _add(totals: Counter[str], bar: tqdm, counts: Counter[str], chars: int) -> None:
    totals.update(counts)
    bar.update(chars / 1e6)


@functools.cache
def _splitter(pattern: str) -> regex.Pattern:
    return regex.compile(pattern)


def _count_batch(pattern: str, texts: list[str]) -> tuple[Counter[str], int]:
    findall = _splitter(pattern).findall
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(findall(without_surrogates(text)))
    return counts, sum(map(len, texts))


def _bar(progress: bool) -> bool | None:
    # tqdm: None shows the bar only on a terminal, True hides it
    return None if progress else True


# ---------------------------------------------------------------------------- merging


def learn_merges(
    chunk_counts: Mapping[bytes, int], num_merges: int, *, min_frequency: int = 2, progress: bool = False
) -> list[Pair]:
    """Merge the most frequent adjacent pair, `num_merges` times, over weighted chunks.

    A pair's count is the number of times its two ids sit side by side, summed over chunks
    and weighted by chunk frequency (so `aaa` holds `(a, a)` twice, as in minbpe). A merge
    rewrites each chunk left to right, so `aaa` becomes `[aa, a]`.

    Internally a chunk is a str of chr(id) and a pair the 2-character str chr(a) + chr(b):
    comparing those orders pairs as (a, b) tuples would, so the tie-break is the same.
    """
    if num_merges < 0:
        raise ValueError(f"num_merges must be >= 0, got {num_merges}")
    # Chunks of one byte hold no pair and can never change: leave them out. latin-1 maps byte b to chr(b).
    kept = [(chunk, n) for chunk, n in chunk_counts.items() if len(chunk) > 1 and n > 0]
    words = [chunk.decode("latin-1") for chunk, _ in kept]
    weights = [n for _, n in kept]
    pair_counts: defaultdict[str, int] = defaultdict(int)
    # pair -> chunks that may hold it. Lazy: an index may repeat or no longer hold the pair;
    # a merge skips those at the cost of one str.find.
    where: defaultdict[str, list[int]] = defaultdict(list)
    for i, (word, n) in enumerate(zip(words, weights, strict=True)):
        for pair in map(str.__add__, word, word[1:]):
            pair_counts[pair] += n
            where[pair].append(i)
    # Heap entries are upper bounds of live counts: counts of existing pairs only fall, and a
    # pair whose count rises (always one holding the new id) is pushed again.
    heap = [(-n, pair) for pair, n in pair_counts.items()]
    heapq.heapify(heap)

    # Every merge yields new token bytes (tiktoken needs them unique): a span of bytes that no
    # token crosses is segmented the same way in every chunk at every step, so once its bytes
    # merge into one token anywhere, they do everywhere, and no later pair can rebuild them.
    merges: list[str] = []
    with tqdm(total=num_merges, desc="bpe merges", unit="merge", disable=_bar(progress)) as bar:
        while len(merges) < num_merges and heap:
            neg_count, pair = heapq.heappop(heap)
            count = pair_counts.get(pair, 0)
            if count != -neg_count:  # stale entry: re-file it under its live count
                if count > 0:
                    heapq.heappush(heap, (-count, pair))
                continue
            if count < min_frequency:
                break
            new = chr(256 + len(merges))
            merges.append(pair)
            for grown in _apply_merge(pair, new, words, weights, pair_counts, where):
                if pair_counts[grown] > 0:  # e.g. (new, a) in `a b a b` grows, then turns into (new, new)
                    heapq.heappush(heap, (-pair_counts[grown], grown))
            bar.update(1)
    if len(merges) < num_merges:
        log.warning(
            "BPE stopped after %d of %d merges: no pair left that occurs at least %d times; "
            "the vocabulary is smaller than requested (add text or lower tokenizer.vocab_size)",
            len(merges),
            num_merges,
            min_frequency,
        )
    return [(ord(pair[0]), ord(pair[1])) for pair in merges]


def _apply_merge(
    pair: str,
    new: str,
    words: list[str],
    weights: list[int],
    pair_counts: defaultdict[str, int],
    where: defaultdict[str, list[int]],
) -> set[str]:
    """Rewrite the chunks holding `pair` as `new` and update the counts of its neighbours' pairs.

    Only the pairs touching an occurrence change: (left, a) becomes (left, new) and
    (b, right) becomes (new, right). When two occurrences touch (`a b a b`), the left
    neighbour of the second is the `new` made by the first, so (new, a) gives way to
    (new, new). Returns the pairs whose counts grew (all of them hold `new`).
    """
    a, b = pair
    grown: set[str] = set()
    for i in where.pop(pair):
        word = words[i]
        at = word.find(pair)
        if at < 0:  # a stale index entry: an earlier merge took the pair out of this chunk
            continue
        weight = weights[i]
        last = len(word) - 2  # the last position a pair can start at
        end = -1  # where the previous occurrence in this chunk ended
        while at >= 0:
            if at > 0:
                left = new if at == end else word[at - 1]
                pair_counts[left + a] -= weight
                gained = left + new
                pair_counts[gained] += weight
                where[gained].append(i)
                grown.add(gained)
            if at < last:
                right = word[at + 2]
                pair_counts[b + right] -= weight
                gained = new + right
                pair_counts[gained] += weight
                where[gained].append(i)
                grown.add(gained)
            end = at + 2
            at = word.find(pair, end)
        words[i] = word.replace(pair, new)
    # All its occurrences are gone (the neighbour updates may have touched it in overlaps
    # like `a a a`), and it can never re-form: ids only ever grow.
    del pair_counts[pair]
    return grown
