"""Near-duplicate families: planted near-copies stay on one side of the split, unrelated documents alone."""

import json
import random
from pathlib import Path

import pytest

from nanollm.data.corpus import read_manifest, split_of, write_corpus
from nanollm.data.near_duplicates import NearDuplicateFamilies, candidate_probability, choose_bands, shingles
from nanollm.data.sources import Document

SEEDS = range(10)


def jaccard(a: str, b: str, size: int = 5) -> float:
    """The exact Jaccard similarity of two texts' shingle sets (what MinHash estimates)."""
    sa, sb = set(shingles(a, size)), set(shingles(b, size))
    return len(sa & sb) / len(sa | sb)


def code_line(rng: random.Random) -> str:
    """A line of made-up code whose identifiers no other line shares (six random letters each)."""
    a, b, c, d = ("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=6)) for _ in range(4))
    return f"    {a} = {b}.{c}({d}, 1)"


def near_copy(lines: list[str], rng: random.Random, edits: int = 3) -> list[str]:
    """`lines` with `edits` of them rewritten, as when a file is copied and adapted."""
    copy = list(lines)
    for index in rng.sample(range(len(copy)), edits):
        copy[index] = code_line(rng)
    return copy


def planted_corpus(seed: int = 0, families: int = 8, copies: int = 3, unrelated: int = 60) -> list[Document]:
    """`families` originals with `copies` near-copies each (3 of 40 lines edited), mixed with unrelated documents."""
    rng = random.Random(seed)
    docs = []
    for f in range(families):
        original = [code_line(rng) for _ in range(40)]
        docs.append(Document(f"fam{f}-0.py", "\n".join(original)))
        docs += [Document(f"fam{f}-{k}.py", "\n".join(near_copy(original, rng))) for k in range(1, copies + 1)]
    docs += [Document(f"solo{i}.py", "\n".join(code_line(rng) for _ in range(40))) for i in range(unrelated)]
    rng.shuffle(docs)
    return docs


def family_name(doc_id: str) -> str | None:
    return doc_id.split("-")[0] if doc_id.startswith("fam") else None


def label_ids(docs: list[Document], families: NearDuplicateFamilies) -> dict[str, str]:
    """doc id -> id of its family's first document."""
    for doc in docs:
        families.add(doc.text)
    return {doc.id: docs[first].id for doc, first in zip(docs, families.labels(), strict=True)}


def sides(out: Path) -> dict[str, str]:
    manifest = read_manifest(out)
    return {
        json.loads(line)["id"]: split
        for split in ("train", "val")
        for name in manifest["splits"][split]["shards"]
        for line in (out / name).open(encoding="utf-8")
    }


def test_the_planted_corpus_is_what_it_claims():
    docs = {d.id: d.text for d in planted_corpus()}
    assert len(docs) == 8 * 4 + 60
    assert min(jaccard(docs[f"fam{f}-0.py"], docs[f"fam{f}-{k}.py"]) for f in range(8) for k in (1, 2, 3)) > 0.6
    assert jaccard(docs["fam0-0.py"], docs["fam1-0.py"]) == 0 and jaccard(docs["solo0.py"], docs["fam0-1.py"]) == 0


def test_planted_families_are_found_and_unrelated_documents_stay_alone():
    docs = planted_corpus()
    families = NearDuplicateFamilies(0.5)
    first = label_ids(docs, families)
    for doc in docs:
        name = family_name(doc.id)
        if name is None:
            assert first[doc.id] == doc.id  # alone
        else:  # labelled with the member that came first in the stream
            members = [d.id for d in docs if family_name(d.id) == name]
            assert first[doc.id] == members[0]
    assert families.summary() | {"library": None} == {
        "method": "minhash-lsh", "library": None, "threshold": 0.5, "num_perm": 128, "shingle_words": 5,
        "bands": 32, "rows": 4, "candidate_probability_at_threshold": 0.873, "documents": 92,
        "families": 8, "grouped_documents": 32, "largest_family_documents": 4,
    }  # fmt: skip
    assert families.summary()["library"].startswith("rensa 0.5")


@pytest.mark.parametrize("seed", SEEDS)
def test_every_family_lands_whole_on_one_side(tmp_path, seed):
    docs = planted_corpus(seed=seed)
    families = NearDuplicateFamilies(0.5)
    manifest = write_corpus(
        docs, tmp_path / "c", seed=seed, val_fraction=0.25, shard_bytes=10**6,
        source_description={"kind": "test"}, families=families,
    )  # fmt: skip
    placed = sides(tmp_path / "c")
    assert sorted(placed) == sorted(d.id for d in docs)
    by_family: dict[str, set[str]] = {}
    for doc_id, split in placed.items():
        name = family_name(doc_id)
        if name is None:
            assert split == split_of(doc_id, seed, 0.25)  # a document that matches nothing keeps its id's split
        else:
            by_family.setdefault(name, set()).add(split)
    assert all(len(s) == 1 for s in by_family.values()), by_family
    near = manifest["near_duplicates"]
    assert (near["families"], near["grouped_documents"]) == (8, 32)
    assert [p.name for p in (tmp_path / "c").iterdir() if p.name.startswith("stream")] == []  # the spool is gone


def test_the_seeds_tried_would_split_families_by_id_and_put_families_in_val():
    """The test above is not vacuous: per-id hashing splits some family, and grouped families do reach val."""
    straddling = in_val = 0
    for seed in SEEDS:
        docs = planted_corpus(seed=seed)
        for f in range(8):
            member_sides = {split_of(d.id, seed, 0.25) for d in docs if family_name(d.id) == f"fam{f}"}
            straddling += len(member_sides) == 2
        first = label_ids(docs, NearDuplicateFamilies(0.5))
        in_val += sum(split_of(first[f"fam{f}-0.py"], seed, 0.25) == "val" for f in range(8))
    assert straddling > 20 and in_val > 10


def test_a_chain_merges_two_families_even_when_the_link_comes_last():
    rng = random.Random(1)
    lines = [code_line(rng) for _ in range(46)]
    a, b, c = "\n".join(lines[0:30]), "\n".join(lines[8:38]), "\n".join(lines[16:46])
    assert jaccard(a, b) > 0.55 and jaccard(b, c) > 0.55 and jaccard(a, c) < 0.35
    families = NearDuplicateFamilies(0.5, num_perm=512)  # sd of the estimates ~0.02
    for text in (a, c, b):  # a and c start two families; b, matching both, merges them
        families.add(text)
    assert families.labels().tolist() == [0, 0, 0]
    assert families.summary()["families"] == 1


def test_copies_join_the_first_and_a_shared_header_is_not_a_near_duplicate():
    rng = random.Random(2)
    header = [f"# Copyright {code_line(rng)}" for _ in range(10)]  # a license header on every file
    files = ["\n".join(header + [code_line(rng) for _ in range(30)]) for _ in range(50)]
    assert max(jaccard(files[0], f) for f in files[1:]) < 0.3
    families = NearDuplicateFamilies(0.5)
    for text in [*files, files[3], files[3], files[7]]:
        families.add(text)
    labels = families.labels().tolist()
    assert labels[:50] == list(range(50)) and labels[50:] == [3, 3, 7]
    assert (families.summary()["families"], families.summary()["grouped_documents"]) == (2, 5)


def test_labels_are_deterministic_and_end_the_stream():
    docs = planted_corpus(seed=3)
    assert label_ids(docs, NearDuplicateFamilies(0.5)) == label_ids(docs, NearDuplicateFamilies(0.5))
    families = NearDuplicateFamilies(0.5)
    families.add("one document")
    assert families.labels().tolist() == [0]
    with pytest.raises(RuntimeError, match="labels\\(\\) was already called"):
        families.add("too late")
    empty = NearDuplicateFamilies(0.5)
    assert empty.labels().tolist() == [] and empty.summary()["families"] == 0


def test_shingles_are_runs_of_words():
    assert shingles("def f(a, b):\n    return a+b", 3) == ["def f a", "f a b", "a b return", "b return a", "return a b"]
    assert shingles("x = y", 5) == ["x y"]  # fewer words than a shingle: one shingle of all
    assert shingles("  }}\n", 5) == ["}}"]  # no word at all: the text itself
    assert shingles("caf\u00e9 na\u00efve", 1) == ["caf\u00e9", "na\u00efve"]


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
@pytest.mark.parametrize("num_perm", [16, 64, 128, 200, 256])
def test_bands_are_the_fewest_that_catch_a_pair_at_the_threshold(threshold, num_perm):
    bands, rows = choose_bands(threshold, num_perm)
    assert bands * rows == num_perm
    assert candidate_probability(threshold, bands, rows) >= 0.85 or (bands, rows) == (num_perm, 1)
    fewer = [b for b in range(1, bands) if num_perm % b == 0]
    assert all(candidate_probability(threshold, b, num_perm // b) < 0.85 for b in fewer)


def test_default_bands_and_bad_settings():
    assert choose_bands(0.5, 128) == (32, 4)
    for kwargs in ({"threshold": 0.0}, {"threshold": 1.5}, {"threshold": 0.5, "num_perm": 0}):
        with pytest.raises(ValueError):
            NearDuplicateFamilies(**kwargs)
