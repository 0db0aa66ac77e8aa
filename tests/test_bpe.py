"""The incremental BPE trainer against a naive re-count-everything reference, plus its edge cases."""

import logging
import random
from collections import Counter

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanollm.errors import NanollmError
from nanollm.tokenizer import bpe
from nanollm.tokenizer.patterns import SPLIT_PATTERNS

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
    chunks = [list(c.encode("utf-8")) for t in texts for c in regex.findall(pattern, t)]
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


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    texts=st.lists(st.text(alphabet="abc de\n🙂", max_size=60), max_size=8),
    num_merges=st.integers(0, 40),
    min_frequency=st.integers(1, 3),
)
def test_property_matches_reference(texts, num_merges, min_frequency):
    chunks = bpe.count_chunks(texts, GPT4)
    got = bpe.learn_merges(chunks, num_merges, min_frequency=min_frequency)
    assert got == naive_train(texts, num_merges, GPT4, min_frequency)


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
    assert len(list(bpe._batches(texts, 200))) > bpe._MIN_PARALLEL_BATCHES
    assert bpe.count_chunks(texts, GPT4, workers=2) == serial
    assert sum(n * len(chunk) for chunk, n in serial.items()) == sum(len(t.encode()) for t in texts)
