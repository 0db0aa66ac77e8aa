"""The corpus folder: deterministic stable split, shards, manifest hashes, atomic writes, reading back."""

import hashlib
import json
from pathlib import Path

import pytest

from nanollm.data.corpus import content_sha256, iter_documents, read_manifest, split_of, write_corpus
from nanollm.data.sources import Document
from nanollm.errors import NanollmError

SEED = 1337


def docs(n: int, prefix: str = "doc") -> list[Document]:
    return [Document(f"{prefix}{i}", f"text {i} \u00e9\n") for i in range(n)]


def write(documents, out: Path, **kwargs):
    options = {"seed": SEED, "val_fraction": 0.2, "shard_bytes": 10**6, "source_description": {"kind": "test"}}
    return write_corpus(documents, out, **{**options, **kwargs})


def shard_ids(out: Path, split: str) -> list[str]:
    manifest = read_manifest(out)
    return [json.loads(line)["id"] for name in manifest["splits"][split]["shards"] for line in (out / name).open()]


def test_split_is_the_documented_seeded_hash():
    for doc_id in ["a", "os.py", "train/17"]:
        value = int.from_bytes(hashlib.sha256(f"{SEED}:{doc_id}".encode()).digest()[:8], "big") / 2**64
        assert split_of(doc_id, SEED, 0.3) == ("val" if value < 0.3 else "train")


def test_val_fraction_is_roughly_respected_and_depends_on_the_seed():
    ids = [f"file{i}.py" for i in range(4000)]
    val = [i for i in ids if split_of(i, SEED, 0.1) == "val"]
    assert 320 < len(val) < 480  # 400 expected, sd ~19
    other = [i for i in ids if split_of(i, SEED + 1, 0.1) == "val"]
    assert set(val) != set(other)
    assert set(val) <= {i for i in ids if split_of(i, SEED, 0.2) == "val"}  # a larger fraction only adds


def test_split_is_deterministic_and_stable_when_documents_are_added(tmp_path):
    base = docs(60)
    write(base, tmp_path / "a")
    write(base, tmp_path / "b")
    assert read_manifest(tmp_path / "a") == read_manifest(tmp_path / "b")
    grown = base[:30] + docs(40, prefix="new") + base[30:]
    write(grown, tmp_path / "c")
    base_ids = {d.id for d in base}
    for split in ("train", "val"):
        kept = [i for i in shard_ids(tmp_path / "c", split) if i in base_ids]
        assert kept == shard_ids(tmp_path / "a", split)


def test_manifest_counts_bytes_and_hashes(tmp_path):
    documents = docs(50) + [Document("weird", 'nul \0 "quotes" \u2028 sep\r\n\U0001f600', replaced_bytes=3)]
    documents[0] = Document(documents[0].id, documents[0].text, replaced_bytes=2)
    manifest = write(documents, tmp_path / "corpus", source_description={"kind": "test", "n": 51})
    expected = {s: [d.text for d in documents if split_of(d.id, SEED, 0.2) == s] for s in ("train", "val")}
    assert manifest == read_manifest(tmp_path / "corpus")
    assert manifest["source"] == {"kind": "test", "n": 51}
    assert (manifest["seed"], manifest["val_fraction"], manifest["replaced_bytes"]) == (SEED, 0.2, 5)
    for split, texts in expected.items():
        info = manifest["splits"][split]
        assert info["documents"] == len(texts) > 0
        assert info["bytes"] == sum(len(t.encode()) for t in texts)
        h = hashlib.sha256()
        for t in texts:
            h.update(len(t.encode()).to_bytes(8, "little") + t.encode())
        assert info["sha256"] == h.hexdigest() == content_sha256(texts)
        assert list(iter_documents(tmp_path / "corpus", split)) == texts
    overall = f"train:{manifest['splits']['train']['sha256']}\nval:{manifest['splits']['val']['sha256']}\n"
    assert manifest["sha256"] == hashlib.sha256(overall.encode()).hexdigest()


def test_hash_is_unambiguous_for_texts_with_nul():
    assert content_sha256(["a\0", "b"]) != content_sha256(["a", "\0b"])


def test_shards_rotate_at_shard_bytes(tmp_path):
    documents = [Document(f"d{i}", "x" * 100) for i in range(40)]
    manifest = write(documents, tmp_path / "corpus", shard_bytes=500, val_fraction=0.1)
    train = manifest["splits"]["train"]
    assert train["shards"] == [f"train-{i:05d}.jsonl" for i in range(len(train["shards"]))]
    assert len(train["shards"]) > 5
    assert all((tmp_path / "corpus" / s).stat().st_size <= 500 for s in train["shards"])
    files = sorted(p.name for p in (tmp_path / "corpus").iterdir())
    assert files == sorted(["manifest.json", *train["shards"], *manifest["splits"]["val"]["shards"]])
    assert len(list(iter_documents(tmp_path / "corpus", "train"))) == train["documents"]
    big = [Document(f"b{i}", "y" * 2000) for i in range(20)]  # a document larger than a shard gets its own
    manifest = write(big, tmp_path / "big", shard_bytes=500, val_fraction=0.2)
    assert len(manifest["splits"]["train"]["shards"]) == manifest["splits"]["train"]["documents"]


def test_rewriting_replaces_the_whole_folder(tmp_path):
    write(docs(50), tmp_path / "corpus", shard_bytes=100)
    manifest = write(docs(50), tmp_path / "corpus")
    names = {p.name for p in (tmp_path / "corpus").iterdir()}
    assert names == {"manifest.json", *manifest["splits"]["train"]["shards"], *manifest["splits"]["val"]["shards"]}


def only_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_empty_corpus_is_an_error_and_leaves_nothing(tmp_path):
    with pytest.raises(NanollmError, match="yielded no documents"):
        write([], tmp_path / "corpus")
    assert only_entries(tmp_path) == []


def test_empty_val_split_is_an_error_with_a_fix(tmp_path):
    train_only = [Document(i, "x") for i in (f"d{n}" for n in range(100)) if split_of(i, SEED, 0.2) == "train"][:5]
    with pytest.raises(NanollmError, match=r"val split is empty.*data.val_fraction=0.2; raise data.val_fraction"):
        write(train_only, tmp_path / "corpus")
    assert only_entries(tmp_path) == []


def test_empty_train_split_is_an_error_and_keeps_the_old_corpus(tmp_path):
    write(docs(30), tmp_path / "corpus")
    before = read_manifest(tmp_path / "corpus")
    val_only = [Document(i, "x") for i in (f"d{n}" for n in range(100)) if split_of(i, SEED, 0.5) == "val"][:3]
    with pytest.raises(NanollmError, match="train split is empty.*lower data.val_fraction"):
        write(val_only, tmp_path / "corpus", val_fraction=0.5)
    assert read_manifest(tmp_path / "corpus") == before
    assert only_entries(tmp_path) == ["corpus"]


def test_a_failing_source_leaves_no_partial_output(tmp_path):
    def broken():
        yield from docs(10)
        raise NanollmError("boom")

    with pytest.raises(NanollmError, match="boom"):
        write(broken(), tmp_path / "corpus")
    assert only_entries(tmp_path) == []


def test_read_manifest_errors_say_how_to_rebuild(tmp_path):
    with pytest.raises(NanollmError, match="manifest.json: corpus manifest not found; re-run `dvc repro download`"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{nope")
    with pytest.raises(NanollmError, match="not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"sha256": "x", "splits": {"train": {}}}')
    with pytest.raises(NanollmError, match="not a corpus manifest"):
        read_manifest(tmp_path)


def test_iter_documents_detects_tampering_and_missing_shards(tmp_path):
    manifest = write(docs(40), tmp_path / "corpus")
    shard = tmp_path / "corpus" / manifest["splits"]["train"]["shards"][0]
    lines = shard.read_text(encoding="utf-8").splitlines(keepends=True)
    shard.write_text("".join(lines[:-1]) + json.dumps({"id": "x", "text": "edited"}) + "\n", encoding="utf-8")
    with pytest.raises(NanollmError, match="train shards do not match the manifest"):
        list(iter_documents(tmp_path / "corpus", "train"))
    shard.write_text("".join(lines[:2]) + "{truncated\n", encoding="utf-8")
    with pytest.raises(NanollmError, match=rf"{shard.name}:3: corrupt corpus line"):
        list(iter_documents(tmp_path / "corpus", "train"))
    shard.unlink()
    with pytest.raises(NanollmError, match="listed in the manifest is missing"):
        list(iter_documents(tmp_path / "corpus", "train"))
    assert len(list(iter_documents(tmp_path / "corpus", "val"))) == manifest["splits"]["val"]["documents"]


class FixedFamilies:
    """A DocumentFamilies with given labels, to test the split by family apart from MinHash."""

    def __init__(self, labels):
        self._labels, self.seen = labels, []

    def add(self, text):
        self.seen.append(text)

    def labels(self):
        return self._labels

    def summary(self):
        return {"families": len(set(self._labels))}


def test_a_family_follows_its_first_document(tmp_path):
    documents = docs(60)
    labels = [0] * 20 + list(range(20, 60))  # documents 0-19 form one family, the rest are alone
    for seed in range(6):
        families = FixedFamilies(labels)
        manifest = write(documents, tmp_path / f"c{seed}", seed=seed, val_fraction=0.3, families=families)
        assert families.seen == [d.text for d in documents]
        first_side = split_of("doc0", seed, 0.3)
        for split in ("train", "val"):
            ids = shard_ids(tmp_path / f"c{seed}", split)
            expected = [
                d.id for i, d in enumerate(documents) if (first_side if i < 20 else split_of(d.id, seed, 0.3)) == split
            ]
            assert ids == expected  # stream order kept within a split
        assert manifest["near_duplicates"] == {"families": 41}
        assert only_entries(tmp_path / f"c{seed}") == sorted(
            ["manifest.json", *manifest["splits"]["train"]["shards"], *manifest["splits"]["val"]["shards"]]
        )  # no spool left behind
    assert write(documents, tmp_path / "plain")["near_duplicates"] is None


def test_a_failing_source_with_families_leaves_no_partial_output(tmp_path):
    def broken():
        yield from docs(10)
        raise NanollmError("boom")

    with pytest.raises(NanollmError, match="boom"):
        write(broken(), tmp_path / "corpus", families=FixedFamilies(list(range(10))))
    assert only_entries(tmp_path) == []
