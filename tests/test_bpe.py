"""The incremental BPE trainer against a naive re-count-everything reference, plus its edge cases."""

import logging
import multiprocessing
import random
from collections import Counter

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanollm.errors import NanollmError
from nanollm.tokenizer import bpe
from nanollm.tokenizer.patterns import SPLIT_PATTERNS, without_surrogates

GPT4 = SPLIT_PATTERNS["gpt4"]

CODE = '''
import os
import sys


def main(argv):
    """Print every argument, then exit."""
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            print(f"option {i}: {arg!r}")
        else:
            print(f"value {i}: {arg!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
'''


def _merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def naive_train(texts: list[str], num_merges: int, pattern: str, min_frequency: int = 2) -> list[tuple[int, int]]:
    """minbpe-style: every chunk occurrence kept separately, every pair re-counted for every merge."""
    chunks = [list(c.encode("utf-8")) for t in texts for c in regex.findall(pattern, without_surrogates(t))]
    merges: list[tuple[int, int]] = []
    while len(merges) < num_merges:
        counts: Counter[tuple[int, int]] = Counter()
        for ids in chunks:
            counts.update(zip(ids, ids[1:], strict=False))
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))  # most frequent, then smallest ids
        if counts[pair] < min_frequency:
            break
        merges.append(pair)
        chunks = [_merge(ids, pair, 255 + len(merges)) for ids in chunks]
    return merges


CORPORA = {
    "code": ([CODE] * 3, 200),
    "prose": (["the cat sat on the mat; the hat sat on the cat.", "then the rat ate the hat"] * 4, 60),
    "overlaps": (["aaaa aaa aaaaaaa bbbbbb abababab aaa", "aaaaaa aa a ababa"], 40),
    "unicode": (["héllo wörld 你好世界 你好 🙂🙂 e\u0301e\u0301 mañana mañana", "你好世界 🙂 wörld"], 60),
    "whitespace": (["x\n\n\n    y\n    z\r\n\r\n\t\t w", "  \n  \n    \n"] * 3, 40),
}


@pytest.mark.parametrize("name", CORPORA)
@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_same_merges_as_naive_reference(name, pattern):
    texts, num_merges = CORPORA[name]
    expected = naive_train(texts, num_merges, SPLIT_PATTERNS[pattern])
    assert len(expected) > 5  # the corpus is worth comparing on
    assert bpe.train_bpe(texts, num_merges, SPLIT_PATTERNS[pattern], progress=False) == expected


def test_random_corpus_matches_reference():
    rng = random.Random(0)
    alphabet = "ab c\n\té🙂1"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300))) for _ in range(20)]
    assert bpe.train_bpe(texts, 150, GPT4, progress=False) == naive_train(texts, 150, GPT4)


# Few distinct characters so that pairs repeat and many merges happen; multi-byte ones, letters,
# digits, spaces and newlines so that every branch of both split regexes is taken.
ALPHABET = st.sampled_from(list("aab  c1\n\t'é🙂你") + ["\u0301", "\ud83d", "\ude42", "\udc80"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    texts=st.lists(st.text(alphabet=ALPHABET, max_size=80), max_size=8),
    num_merges=st.integers(0, 60),
    min_frequency=st.integers(1, 3),
    pattern=st.sampled_from(["gpt2", "gpt4"]),
)
def test_property_matches_reference(texts, num_merges, min_frequency, pattern):
    chunks = bpe.count_chunks(texts, SPLIT_PATTERNS[pattern])
    got = bpe.learn_merges(chunks, num_merges, min_frequency=min_frequency)
    assert got == naive_train(texts, num_merges, SPLIT_PATTERNS[pattern], min_frequency)


@settings(max_examples=30, deadline=None)
@given(counts=st.dictionaries(st.text(alphabet="abcé🙂", min_size=1, max_size=12), st.integers(1, 50), max_size=20))
def test_weighted_chunks_equal_repeated_chunks(counts):
    """A chunk counted n times trains exactly like n copies of it (the corpus collapses to a Counter)."""
    copies = [chunk for chunk, n in counts.items() for _ in range(n)]
    weighted = {chunk.encode("utf-8"): n for chunk, n in counts.items()}
    assert bpe.learn_merges(weighted, 30) == naive_train(copies, 30, r"(?s).+")  # one chunk per text


def test_ties_go_to_the_smallest_pair():
    # (' ', 'c'), ('a', 'b') and ('c', 'd') all occur twice; (32, 99) is the smallest pair.
    assert bpe.train_bpe(["ab cd ab cd"], 1, GPT4, progress=False) == [(32, 99)]


def test_overlapping_pairs_merge_left_to_right():
    # `aaa` holds (a, a) twice; the merge makes [aa, a], whose (aa, a) occurs once: stop.
    assert bpe.learn_merges({b"aaa": 1}, 10) == [(97, 97)]
    assert bpe.learn_merges({b"aaaa": 1}, 10, min_frequency=1) == [(97, 97), (256, 256)]


def test_small_corpus_stops_early_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="nanollm.tokenizer.bpe"):
        merges = bpe.train_bpe(["hello hello world"], 1000, GPT4, progress=False)
    assert 0 < len(merges) < 1000
    assert merges == naive_train(["hello hello world"], 1000, GPT4)
    assert f"stopped after {len(merges)} of 1000 merges" in caplog.text


@pytest.mark.parametrize("texts", [[], ["", ""]])
def test_empty_corpus_is_an_error(texts):
    with pytest.raises(NanollmError, match="no text"):
        bpe.train_bpe(texts, 10, GPT4, progress=False)


def test_parallel_counting_equals_serial(monkeypatch):
    texts = [CODE, "ünïcödé text 🙂", "more words here"] * 5
    serial = bpe.count_chunks(texts, GPT4, workers=1)
    monkeypatch.setattr(bpe, "_BATCH_CHARS", 200)  # many small batches, so the process pool runs
    assert len(list(bpe.batched_texts(texts, 200))) > bpe._MIN_PARALLEL_BATCHES
    assert bpe.count_chunks(texts, GPT4, workers=2) == serial
    assert sum(n * len(chunk) for chunk, n in serial.items()) == sum(len(t.encode()) for t in texts)


def test_counting_streams_a_bounded_window(monkeypatch):
    """The pool is fed a few batches ahead of the counting, never the whole corpus (Pool.imap would read it all)."""
    monkeypatch.setattr(bpe, "_BATCH_CHARS", 100)  # each 100-character document is one batch
    read = 0
    lead = []  # documents read minus batches counted, at each count

    def documents():
        nonlocal read
        for i in range(60):
            read += 1
            yield f"document {i:03d} " + "x" * 87

    counted = 0
    add = bpe._add

    def spy(*args):
        nonlocal counted
        counted += 1
        lead.append(read - counted)
        add(*args)

    monkeypatch.setattr(bpe, "_add", spy)
    chunks = bpe.count_chunks(documents(), GPT4, workers=2)
    assert counted == 60 and chunks[b" " + b"x" * 87] == 60
    assert max(lead) <= 2 * bpe._IN_FLIGHT_PER_WORKER  # the window (4) less the batch just counted, plus one read ahead


def test_surrogates_are_cleaned_as_tiktoken_does():
    """Lone surrogates count as U+FFFD and a high+low pair as its character, never as "?" or an error."""
    assert without_surrogates("a\ud800b\ud83d\ude42") == "a\ufffdb🙂"
    assert without_surrogates("plain é 🙂") == "plain é 🙂"
    assert bpe.count_chunks(["x\udc80y \ud83d\ude42"], GPT4) == bpe.count_chunks(["x\ufffdy 🙂"], GPT4)


def test_deterministic_across_worker_counts(monkeypatch):
    monkeypatch.setattr(bpe, "_BATCH_CHARS", 300)
    texts = [CODE, *CORPORA["prose"][0], *CORPORA["unicode"][0]] * 3
    one = bpe.train_bpe(texts, 120, GPT4, workers=1, progress=False)
    assert bpe.train_bpe(texts, 120, GPT4, workers=2, progress=False) == one
    assert multiprocessing.active_children() == []  # the pool is gone
