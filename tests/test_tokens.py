"""Token memmaps: write/read round trip, dtype choice, sidecar checks, atomic output."""

import json

import numpy as np
import pytest

from nanollm.config import TokenizerConfig
from nanollm.data.tokens import (
    META,
    check_compatible,
    encode_documents,
    open_split,
    read_meta,
    token_dtype,
    write_tokens,
)
from nanollm.errors import NanollmError
from nanollm.tokenizer import Tokenizer, create_tokenizer

DOCS = {
    "train": ["import os\nprint(os.getcwd())\n", "héllo wörld 🙂", "", "x = [i * i for i in range(10)]\n" * 4],
    "val": ["print('<|endoftext|> is just text here')", "🙂 bye"],
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    cfg = TokenizerConfig(vocab_size=300)
    return create_tokenizer(cfg, DOCS["train"] * 3, tmp_path_factory.mktemp("tok"), progress=False)


def _write(tok: Tokenizer, out, docs=DOCS, **kwargs):
    return write_tokens(
        out,
        {split: encode_documents(tok, texts, **kwargs) for split, texts in docs.items()},
        vocab_size=tok.vocab_size,
        eot_id=tok.eot_id,
        tokenizer_sha256=tok.sha256,
        corpus_sha256="c" * 64,
        progress=False,
    )


def test_round_trip(tok, tmp_path):
    out = tmp_path / "tokens"
    meta = _write(tok, out, batch_chars=16)  # several batches per split
    assert read_meta(out) == meta
    assert meta.dtype == "uint16" and meta.vocab_size == tok.vocab_size and meta.eot_id == tok.eot_id
    assert meta.tokenizer_sha256 == tok.sha256 and meta.corpus_sha256 == "c" * 64
    for split, texts in DOCS.items():
        data = open_split(out, split)
        assert isinstance(data, np.memmap) and data.dtype == np.uint16 and not data.flags.writeable
        expected = [i for text in texts for i in [*tok.encode(text), tok.eot_id]]
        assert data.tolist() == expected
        # the eot separators give the documents back, "<|endoftext|>" written as text included
        docs = np.split(np.asarray(data), np.flatnonzero(data == tok.eot_id) + 1)[:-1]
        assert [tok.decode(d[:-1]) for d in docs] == texts
        info = meta.splits[split]
        assert info == {"tokens": len(expected), "bytes": sum(len(t.encode()) for t in texts), "documents": len(texts)}
    assert json.loads((out / META).read_text())["splits"] == meta.splits


def test_encode_documents_batches(tok):
    batches = list(encode_documents(tok, DOCS["train"], batch_chars=20, num_threads=2))
    assert len(batches) > 1
    assert [ids.tolist() for docs, _ in batches for ids in docs] == [tok.encode(t) for t in DOCS["train"]]
    assert sum(n for _, n in batches) == sum(len(t.encode()) for t in DOCS["train"])


def test_encode_documents_keeps_order_across_threads_and_tasks(tok, monkeypatch):
    from nanollm.data import tokens

    monkeypatch.setattr(tokens, "_TASK_CHARS", 7)  # several encoder tasks per batch
    texts = [f"doc {i}: " + "print(x)\n" * (i % 5) + "🙂" * (i % 3) for i in range(200)]
    docs = [ids for batch, _ in encode_documents(tok, texts, batch_chars=100, num_threads=3) for ids in batch]
    assert [ids.tolist() for ids in docs] == [tok.encode(t) for t in texts]


def test_encode_documents_reads_a_bounded_window(tok):
    """A consumer that stops early has read only a few batches: the corpus streams, it is never all in memory."""
    read = 0

    def texts():
        nonlocal read
        for i in range(10_000):
            read += 1
            yield f"document {i} " * 8

    batches = encode_documents(tok, texts(), batch_chars=100)
    next(batches)
    batches.close()  # also shuts the encoder threads down
    assert read <= 4 * 2  # the batch handed out, the look-ahead (2) and one being filled; ~2 documents per batch


@pytest.mark.parametrize(("vocab_size", "dtype"), [(300, np.uint16), (65536, np.uint16), (65537, np.uint32)])
def test_dtype_fits_the_vocab(tmp_path, vocab_size, dtype):
    assert token_dtype(vocab_size) == dtype
    top = vocab_size - 1
    batches = {"train": [([[0, 1, top - 1], [top - 1]], 7)], "val": [([[5]], 1)]}
    write_tokens(tmp_path / "t", batches, vocab_size=vocab_size, eot_id=top, tokenizer_sha256="a", corpus_sha256="b")
    data = open_split(tmp_path / "t", "train")
    assert data.dtype == dtype and data.tolist() == [0, 1, top - 1, top, top - 1, top]
    assert (tmp_path / "t" / "train.bin").stat().st_size == 6 * np.dtype(dtype).itemsize


@pytest.mark.parametrize("bad", [70000, 300, -1])
def test_id_outside_the_vocab_is_refused(tmp_path, bad):
    batches = {"train": [([[1, 2], [bad]], 1)]}
    with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary"):
        write_tokens(tmp_path / "t", batches, vocab_size=300, eot_id=0, tokenizer_sha256="a", corpus_sha256="b")
    assert not (tmp_path / "t").exists()


def test_lists_arrays_and_empty_documents_mix(tmp_path):
    docs = [[], np.array([7, 8], dtype=np.uint32), [9], np.zeros(0, dtype=np.uint32)]
    write_tokens(
        tmp_path / "t", {"train": [(docs, 3)]}, vocab_size=300, eot_id=299, tokenizer_sha256="a", corpus_sha256="b"
    )
    assert open_split(tmp_path / "t", "train").tolist() == [299, 7, 8, 299, 9, 299, 299]


def test_empty_split_is_an_empty_read_only_array(tmp_path):
    write_tokens(
        tmp_path / "t", {"train": [], "val": []}, vocab_size=300, eot_id=0, tokenizer_sha256="a", corpus_sha256="b"
    )
    data = open_split(tmp_path / "t", "val")
    assert data.shape == (0,) and data.dtype == np.uint16 and not data.flags.writeable


def _expect_error(fn, *needles):
    with pytest.raises(NanollmError) as err:
        fn()
    message = str(err.value)
    assert "\n" not in message and "dvc repro tokenize" in message
    for needle in needles:
        assert needle in message
    return message


def test_sidecar_mismatches(tok, tmp_path):
    out = tmp_path / "tokens"
    meta = _write(tok, out)
    train = out / "train.bin"
    n = meta.splits["train"]["tokens"]

    train.write_bytes(train.read_bytes()[:-2])  # truncated by one token
    _expect_error(lambda: open_split(out, "train"), str(train), f"{n} uint16 tokens")

    np.arange(n, dtype=np.uint32).tofile(train)  # right count, wrong dtype
    _expect_error(lambda: open_split(out, "train", meta), str(train), f"{n * 4} bytes")

    train.unlink()
    _expect_error(lambda: open_split(out, "train"), str(train), "missing")
    _expect_error(lambda: open_split(out, "test"), "no split 'test'")


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda m: {**m, "dtype": "uint32"}, "dtype uint32 does not match vocab_size 300"),
        (lambda m: {**m, "vocab_size": 70000}, "dtype uint16 does not match vocab_size 70000"),
        (lambda m: {**m, "eot_id": 300}, "eot_id 300"),
        (lambda m: {k: v for k, v in m.items() if k != "tokenizer_sha256"}, "tokenizer_sha256 is missing"),
        (lambda m: {**m, "splits": {"train": {"tokens": -1, "bytes": 0, "documents": 0}}}, "splits.train"),
    ],
)
def test_invalid_meta(tok, tmp_path, edit, needle):
    out = tmp_path / "tokens"
    _write(tok, out)
    meta_path = out / META
    meta_path.write_text(json.dumps(edit(json.loads(meta_path.read_text()))))
    _expect_error(lambda: read_meta(out), str(meta_path), needle)


def test_missing_or_unparsable_meta(tmp_path):
    _expect_error(lambda: read_meta(tmp_path), str(tmp_path / META), "cannot read")
    (tmp_path / META).write_text("{oops")
    _expect_error(lambda: open_split(tmp_path, "train"), "not valid JSON")


def test_check_compatible(tok, tmp_path):
    meta = _write(tok, tmp_path / "tokens")
    check_compatible(meta, tokenizer_sha256=tok.sha256, vocab_size=tok.vocab_size, corpus_sha256="c" * 64)
    check_compatible(meta)
    _expect_error(lambda: check_compatible(meta, tokenizer_sha256="f" * 64), "tokenizer sha256", "ffffffffffff")
    _expect_error(lambda: check_compatible(meta, vocab_size=512), "300-token vocabulary, not 512")
    _expect_error(lambda: check_compatible(meta, corpus_sha256="0" * 64), "corpus sha256")


def test_failure_leaves_the_previous_output(tok, tmp_path):
    out = tmp_path / "tokens"
    before = _write(tok, out)

    def failing():
        yield [[1, 2]], 2
        raise RuntimeError("killed mid-way")

    with pytest.raises(RuntimeError):
        write_tokens(out, {"train": failing()}, vocab_size=300, eot_id=0, tokenizer_sha256="x", corpus_sha256="y")
    assert read_meta(out) == before and open_split(out, "train").tolist()[-1] == tok.eot_id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens"]  # no temporary folder left behind
