"""How many val documents have a near-copy in train: the plain id-hash split against the near-duplicate families.

The peer of nanollm.data.near_duplicates is the split it replaces (each document by a seeded
hash of its id). Both are scored against the exact truth: every pair of documents whose word
shingles have a Jaccard similarity at or above --leak-threshold (exact sets, not MinHash; the
candidates come from an LSH index at a lower threshold, so no true pair is missed in practice).
A leak is a val document with such a partner in train. Summed over --seeds seeds, for each
grouping threshold given.

    python benchmarks/split_leaks.py                                  # the stdlib corpus, 21 seeds
    python benchmarks/split_leaks.py --thresholds 0.5,0.6,0.7         # the grouping threshold's effect
    python benchmarks/split_leaks.py --max-documents 120 --seeds 3    # a smoke run
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

from nanollm.data.corpus import split_of
from nanollm.data.near_duplicates import NearDuplicateFamilies, shingles
from nanollm.data.sources import stdlib_source
from nanollm.hardware import describe_machine


def main() -> int:
    args = _parse()
    docs = list(stdlib_source(max_documents=args.max_documents))
    sets = [set(shingles(d.text, args.shingle)) for d in docs]
    start = time.perf_counter()
    pairs = _exact_pairs(docs, sets, args.leak_threshold, args.shingle)
    seconds = time.perf_counter() - start
    seeds = [*range(args.seeds - 1), 1337] if args.seeds > 1 else [1337]
    print(f"command: python benchmarks/split_leaks.py {' '.join(sys.argv[1:])}")
    print(f"machine: {describe_machine()}")
    print(
        f"corpus: stdlib, {len(docs)} documents; {len(pairs)} pairs with exact Jaccard >= {args.leak_threshold} "
        f"({args.shingle}-word shingles, found in {seconds:.1f} s); val_fraction {args.val_fraction}; "
        f"seeds {seeds[0]}..{seeds[-2] if len(seeds) > 1 else seeds[0]} and 1337"
    )
    print("\n| split | families (documents) | val documents with a near-copy in train, over all seeds |")
    print("| --- | --- | ---: |")
    print(f"| each document by its id | - | {_leaks(docs, pairs, seeds, args.val_fraction, None)} |")
    for threshold in args.thresholds:
        families = NearDuplicateFamilies(threshold, shingle=args.shingle)
        for doc in docs:
            families.add(doc.text)
        labels = families.labels()
        summary = families.summary()
        first = [docs[label].id for label in labels]  # the family's first document decides the split
        leaks = _leaks(docs, pairs, seeds, args.val_fraction, first)
        grouped = f"{summary['families']} ({summary['grouped_documents']})"
        print(f"| by near-duplicate family, J >= {threshold} | {grouped} | {leaks} |")
    return 0


def _exact_pairs(docs: list, sets: list[set[str]], threshold: float, shingle: int) -> list[tuple[int, int]]:
    """Pairs (i, j) of documents whose exact shingle Jaccard is >= threshold; candidates from LSH at half of it."""
    candidates = NearDuplicateFamilies(max(0.05, threshold / 2), shingle=shingle)
    for doc in docs:
        candidates.add(doc.text)
    labels = candidates.labels()
    groups: dict[int, list[int]] = {}
    for i, label in enumerate(labels.tolist()):
        groups.setdefault(label, []).append(i)
    pairs = []
    for members in groups.values():
        for i, j in itertools.combinations(members, 2):
            union = len(sets[i] | sets[j])
            if union and len(sets[i] & sets[j]) / union >= threshold:
                pairs.append((i, j))
    return pairs


def _leaks(docs: list, pairs: list[tuple[int, int]], seeds: list[int], val_fraction: float, keys: list | None) -> int:
    total = 0
    for seed in seeds:
        side = [split_of(keys[i] if keys else d.id, seed, val_fraction) for i, d in enumerate(docs)]
        total += len({x for i, j in pairs if side[i] != side[j] for x in (i, j) if side[x] == "val"})
    return total


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--thresholds", default="0.5", help="grouping thresholds, comma-separated")
    parser.add_argument("--leak-threshold", type=float, default=0.5, help="exact Jaccard that makes a near-copy")
    parser.add_argument("--seeds", type=int, default=21, help="seeds 0..n-2 and 1337")
    parser.add_argument("--shingle", type=int, default=5, help="words per shingle (the pipeline's default)")
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--max-documents", type=int, default=None, help="the first N stdlib files only")
    args = parser.parse_args()
    args.thresholds = [float(t) for t in args.thresholds.split(",")]
    return args


if __name__ == "__main__":
    raise SystemExit(main())
