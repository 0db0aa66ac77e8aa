"""Document sources: stdlib, local files (any text, .jsonl, .parquet; binary skipped), Hugging Face datasets."""

import codecs
import json
import logging
import sysconfig
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanollm.config import ConfigError, DataConfig
from nanollm.data import sources
from nanollm.data.sources import (
    Document,
    binary_reason,
    decode_utf8,
    expand_paths,
    files_source,
    hf_source,
    open_source,
    stdlib_files,
    stdlib_source,
)
from nanollm.errors import NanollmError


def _count_replaced(err: UnicodeDecodeError) -> tuple[str, int]:
    _count_replaced.total += err.end - err.start  # type: ignore[attr-defined]
    return "\ufffd", err.end


codecs.register_error("test-count-replaced", _count_replaced)


def reference_decode(data: bytes) -> tuple[str, int]:
    """Python's own replace semantics, counting through a codec error handler."""
    _count_replaced.total = 0  # type: ignore[attr-defined]
    text = data.decode("utf-8", errors="test-count-replaced")
    return text, _count_replaced.total  # type: ignore[attr-defined]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- decoding


@pytest.mark.parametrize(
    "data",
    [
        b"plain ascii",
        "caf\u00e9 \u2603 \U0001f600".encode(),
        b"\xff\xfe bad start",
        b"truncated \xe2\x82",
        b"surrogate \xed\xa0\x80 encoded",
        b"overlong \xc0\x80",
        "genuine \ufffd kept".encode() + b" and \x80 bad",
        b"\xf5\x80\x80\x80 out of range",
    ],
)
def test_decode_utf8_matches_python_replace_and_counts_bytes(data):
    assert decode_utf8(data) == reference_decode(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64) | st.text(max_size=16).map(lambda s: s.encode() + b"\xe2\x82"))
def test_decode_utf8_counts_replaced_bytes_for_any_input(data):
    assert decode_utf8(data) == reference_decode(data)


# ---------------------------------------------------------------------------- stdlib


def test_stdlib_files_skip_tests_site_packages_and_outside_links(tmp_path):
    root = tmp_path / "lib"
    outside = tmp_path / "outside.py"
    outside.write_text("x = 1\n")
    for rel in [
        "os.py",
        "json/__init__.py",
        "json/decoder.py",
        "test/test_os.py",
        "idlelib/editor.py",
        "idlelib/idle_test/test_editor.py",
        "lib2to3/tests/data/fixer.py",
        "unittest/test/test_case.py",
        "site-packages/numpy/__init__.py",
        "README.txt",
    ]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("pass\n")
    (root / "linked.py").symlink_to(outside)
    assert stdlib_files(root) == ["idlelib/editor.py", "json/__init__.py", "json/decoder.py", "os.py"]


def test_real_stdlib_is_read_lazily_with_relative_ids():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    assert "os.py" in files and "json/__init__.py" in files
    assert files == sorted(files)
    assert not [f for f in files if {"test", "tests", "idle_test", "site-packages"} & set(f.split("/"))]
    source = stdlib_source(max_documents=25)
    docs = list(source)
    assert len(docs) == 25 and source.stats.truncated
    assert [d.id for d in docs] == sorted(d.id for d in docs)
    assert all(d.text.strip() for d in docs)
    assert docs[0].text == (root / docs[0].id).read_text(encoding="utf-8")
    assert source.description["kind"] == "stdlib" and source.description["max_documents"] == 25


# ---------------------------------------------------------------------------- local files


def test_files_source_reads_txt_jsonl_parquet_in_pattern_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("a.txt").write_text("alpha\n")
    write_jsonl(tmp_path / "b.jsonl", [{"text": "one", "n": 1}, {"text": "two"}])
    pq.write_table(pa.table({"text": ["row0", "row1"], "n": [0, 1]}), "c.parquet")
    docs = list(files_source(["a.txt", "b.jsonl", "c.parquet"]))
    assert docs == [
        Document("a.txt", "alpha\n"),
        Document("b.jsonl:1", "one"),
        Document("b.jsonl:2", "two"),
        Document("c.parquet:0", "row0"),
        Document("c.parquet:1", "row1"),
    ]


def test_text_field_picks_the_column(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "a.jsonl", [{"body": "x", "text": "wrong"}])
    pq.write_table(pa.table({"body": ["y"]}), "b.parquet")
    assert [d.text for d in files_source(["a.jsonl", "b.parquet"], text_field="body")] == ["x", "y"]


def test_parquet_is_read_in_batches(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    n = sources._BATCH_ROWS * 2 + 5
    pq.write_table(pa.table({"text": [f"doc {i}" for i in range(n)]}), "big.parquet", row_group_size=700)
    docs = list(files_source(["big.parquet"]))
    assert [d.text for d in docs] == [f"doc {i}" for i in range(n)]
    assert docs[-1].id == f"big.parquet:{n - 1}"


def test_globs_expand_recursively_sorted_and_without_repeats(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for rel in ["corpus/b.txt", "corpus/a.txt", "corpus/sub/deep/c.txt", "corpus/skip.md"]:
        Path(rel).parent.mkdir(parents=True, exist_ok=True)
        Path(rel).write_text(rel)
    files = expand_paths(["corpus/**/*.txt", "corpus/a.txt"])
    assert [p.as_posix() for p in files] == ["corpus/a.txt", "corpus/b.txt", "corpus/sub/deep/c.txt"]


@pytest.mark.parametrize(
    ("patterns", "expected"),
    [
        (["nothing/*.txt"], "'nothing/*.txt' matches no files"),
        (["missing.txt"], "'missing.txt' matches no files"),
        (["d"], "'d' is a folder; use a glob such as 'd/**/*'"),
        ([], "data.paths: got []; must list at least one"),
        (["img/*"], "'img/*' matches only binary files (2, e.g. 'img/a.png': a NUL byte in the first 8 KB); narrow"),
        (
            ["d/*", "img/b.*"],
            "'img/b.*' matches only binary files (1, e.g. 'img/b.bin': over a quarter of the first 8 KB not UTF-8)",
        ),
    ],
)
def test_bad_paths_are_one_line_errors(tmp_path, monkeypatch, patterns, expected):
    monkeypatch.chdir(tmp_path)
    Path("d").mkdir()
    Path("d/x.csv").write_text("x")
    Path("img").mkdir()
    Path("img/a.png").write_bytes(PNG_HEAD)
    Path("img/b.bin").write_bytes(bytes(range(128, 256)) * 4)
    with pytest.raises(ConfigError) as err:  # a params mistake: the CLI exits 2, as for any other
        files_source(patterns)
    assert expected in str(err.value) and "\n" not in str(err.value)


# The first bytes of a real PNG: signature, then the IHDR chunk's length (0x0000000d).
PNG_HEAD = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00"


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        (b"", None),
        (b"def f():\n    return 1\n", None),
        (
            "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, na\u00efve fa\u00e7ade\n".encode("latin-1") * 20,
            None,
        ),  # ~9% not UTF-8
        (
            "\u03ba\u03b1\u03bb\u03b7\u03bc\u03ad\u03c1\u03b1 \u03ba\u03cc\u03c3\u03bc\u03b5\n".encode("iso8859_7")
            * 20,
            "not_utf8",
        ),
        ("\u00e9t\u00e9 \u2603 \U0001f600 \u65e5\u672c\n".encode() * 100, None),  # multi-byte UTF-8 is text
        (PNG_HEAD, "nul_byte"),
        ("text".encode("utf-16-le"), "nul_byte"),
        (bytes(range(128, 256)) * 8, "not_utf8"),
        (b"x" * 8191 + b"\xe2\x82", None),  # a character cut at the 8 KB boundary is not evidence
    ],
)
def test_binary_reason(head, reason):
    assert binary_reason(head) == reason


def test_any_text_file_is_one_document_binary_files_are_skipped_and_counted(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    files = {
        "proj/app.py": b"def main():\n    print('hi')\n",
        "proj/README.md": "# proj\n\nna\u00efve text\n".encode(),
        "proj/data.csv": b"a,b\n1,2\n",
        "proj/latin1.txt": "caf\u00e9\n".encode("latin-1"),  # 1 invalid byte of 5: read, replaced, counted
        "proj/logo.png": PNG_HEAD + b"rest of the image",
        "proj/notes-utf16.txt": "hello".encode("utf-16"),
        "proj/__pycache__/app.cpython-311.pyc": b"\xa7\r\r\n\x00\x00\x00\x00",
        "proj/greek.txt": "\u03ba\u03b1\u03bb\u03b7\u03bc\u03ad\u03c1\u03b1\n".encode("iso8859_7"),
        "proj/rows.jsonl": b'{"text": "record one"}\n',
        "proj/.hidden.py": b"never matched by **: glob skips dot files",
    }
    for rel, data in files.items():
        Path(rel).parent.mkdir(parents=True, exist_ok=True)
        Path(rel).write_bytes(data)
    caplog.set_level(logging.INFO, logger="nanollm.data.sources")
    source = files_source(["proj/**/*"])
    docs = list(source)
    assert [d.id for d in docs] == [
        "proj/README.md", "proj/app.py", "proj/data.csv", "proj/latin1.txt", "proj/rows.jsonl:1",
    ]  # fmt: skip
    assert docs[1].text == "def main():\n    print('hi')\n" and docs[3] == Document("proj/latin1.txt", "caf\ufffd\n", 1)
    assert source.stats.binary_files == {"nul_byte": 3, "not_utf8": 1}
    assert source.stats.documents == 5 and source.stats.replaced_bytes == 1
    assert "skipped 3 binary file(s) with a NUL byte in the first 8 KB" in caplog.text
    assert "skipped 1 binary file(s) with over a quarter of the first 8 KB not UTF-8" in caplog.text
    assert "e.g. proj/greek.txt" in caplog.text
    assert list(source) == docs and source.stats.binary_files["nul_byte"] == 3  # counted afresh per pass


def test_binary_check_reads_only_the_head(tmp_path, monkeypatch):
    """A NUL past the first 8 KB does not make a file binary (as for git), and a binary file is not read past it."""
    monkeypatch.chdir(tmp_path)
    Path("late-nul.txt").write_bytes(b"x" * 9000 + b"\0")
    Path("big.bin").write_bytes(b"\0" * 10**6)
    reads: list[int] = []
    real_open = open

    def counting_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if str(path).endswith("big.bin"):
            real_read = f.read
            f.read = lambda n=-1: reads.append(n) or real_read(n)
        return f

    source = files_source(["*"])  # big.bin, then late-nul.txt
    monkeypatch.setattr("builtins.open", counting_open)
    assert [(d.id, len(d.text)) for d in source] == [("late-nul.txt", 9001)]
    assert reads == [8192] and source.stats.binary_files["nul_byte"] == 1


def test_bad_jsonl_line_names_file_line_and_field(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("a.jsonl").write_text('{"text": "ok"}\n\n{"text": broken\n')
    with pytest.raises(NanollmError) as err:
        list(files_source(["a.jsonl"]))
    assert str(err.value).startswith("a.jsonl:3: not valid JSON") and "'text'" in str(err.value)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"body": "x"}', "no 'text' field"),
        ("[1, 2]", "no 'text' field"),
        ('{"text": 3}', "field 'text' is a int, not a string"),
    ],
)
def test_jsonl_line_without_a_text_string_is_an_error(tmp_path, monkeypatch, line, expected):
    monkeypatch.chdir(tmp_path)
    Path("a.jsonl").write_text(line + "\n")
    with pytest.raises(NanollmError, match=f"^a.jsonl:1: {expected}"):
        list(files_source(["a.jsonl"]))


def test_parquet_missing_or_non_string_column_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pq.write_table(pa.table({"body": ["x"], "n": [1]}), "a.parquet")
    with pytest.raises(NanollmError, match=r"^a.parquet: no column 'text' \(columns: body, n\)"):
        list(files_source(["a.parquet"]))
    with pytest.raises(NanollmError, match="column 'n' holds int64, not strings"):
        list(files_source(["a.parquet"], text_field="n"))
    Path("bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(NanollmError, match="^bad.parquet: not a readable parquet file"):
        list(files_source(["bad.parquet"]))


def test_invalid_utf8_is_replaced_and_counted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("bad.txt").write_bytes(b"ok \xff\xfe then more text \xe2\x82")  # 2 + 2 invalid bytes of 26: text
    Path("bad.jsonl").write_bytes(b'{"text": "caf\xe9"}\n{"text": "lone \\ud800 surrogate"}\n')
    source = files_source(["bad.txt", "bad.jsonl"])
    docs = list(source)
    assert [d.replaced_bytes for d in docs] == [4, 1, 1]
    assert docs[0].text == "ok \ufffd\ufffd then more text \ufffd" and docs[1].text == "caf\ufffd"
    assert docs[2].text == "lone \ufffd surrogate"
    assert source.stats.replaced_bytes == 6
    for doc in docs:
        doc.text.encode("utf-8")  # everything downstream can write it


def test_empty_documents_are_skipped_and_counted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("empty.txt").write_text("")
    Path("blank.txt").write_text(" \n\t\n")
    Path("full.txt").write_text("x")
    write_jsonl(tmp_path / "a.jsonl", [{"text": ""}, {"text": None}, {"text": "y"}])
    Path("bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "z"}\n')
    source = files_source(["*.txt", "*.jsonl"])
    assert [d.text for d in source] == ["x", "y", "z"]
    assert source.stats.empty_documents == 4 and source.stats.documents == 3


def test_max_documents_stops_reading_early(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("a.jsonl").write_text('{"text": "1"}\n{"text": "2"}\nnot json: never read\n')
    source = files_source(["a.jsonl"], max_documents=2)
    assert [d.text for d in source] == ["1", "2"]
    assert source.stats.truncated
    with pytest.raises(NanollmError, match="a.jsonl:3"):
        list(files_source(["a.jsonl"], max_documents=3))


def test_max_bytes_keeps_the_crossing_document_whole(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "a.jsonl", [{"text": "\u00e9" * 5}] * 10)  # 10 UTF-8 bytes each
    source = files_source(["a.jsonl"], max_bytes=25)
    assert len(list(source)) == 3 and source.stats.bytes == 30
    source = files_source(["a.jsonl"], max_bytes=20)
    assert len(list(source)) == 2 and source.stats.truncated
    source = files_source(["a.jsonl"], max_bytes=1000)
    assert len(list(source)) == 10 and not source.stats.truncated


def test_a_source_can_be_iterated_twice(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}, {"text": "b"}])
    source = files_source(["a.jsonl"])
    assert list(source) == list(source) and source.stats.documents == 2


# ---------------------------------------------------------------------------- Hugging Face datasets


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep `datasets`' lock files out of the home directory."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def test_hf_local_json_and_parquet_files_work_offline(tmp_path, monkeypatch, hf_cache):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "a.jsonl", [{"text": "one", "meta": 1}, {"text": "two", "meta": 2}, {"text": ""}])
    pq.write_table(pa.table({"content": ["p0", "p1"]}), "b.parquet")
    source = hf_source("a.jsonl", split="train")
    assert list(source) == [Document("train/0", "one"), Document("train/1", "two")]
    assert source.stats.empty_documents == 1
    assert [d.text for d in hf_source("b.parquet", split="validation", text_field="content")] == ["p0", "p1"]
    with pytest.raises(NanollmError, match=r"no column 'text' \(columns: content\)"):
        hf_source("b.parquet")


def test_hf_saved_dataset_folder_and_split(tmp_path, monkeypatch, hf_cache):
    import datasets

    monkeypatch.chdir(tmp_path)
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["t0", "t1"]}),
            "test": datasets.Dataset.from_dict({"text": ["v"]}),
        }
    ).save_to_disk("saved")
    assert [d.text for d in hf_source("saved", split="test")] == ["v"]
    with pytest.raises(ConfigError, match="data.hf_split: got 'valid'; saved has splits train, test"):
        hf_source("saved", split="valid")


def test_hf_source_through_config_with_limits(tmp_path, monkeypatch, hf_cache):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "a.jsonl", [{"text": f"doc {i}"} for i in range(10)])
    source = open_source(DataConfig(source="hf", hf_name="a.jsonl", max_documents=4))
    assert len(list(source)) == 4
    assert source.description == {
        "kind": "hf", "name": "a.jsonl", "config": None, "split": "train", "text_field": "text",
        "max_documents": 4, "max_bytes": None,
    }  # fmt: skip


def test_hf_missing_local_path_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"data.hf_name: got 'data/x.parquet'; no such file or folder"):
        hf_source("data/x.parquet")


def test_hf_hub_name_offline_fails_fast_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(NanollmError) as err:
        hf_source("openwebtext")
    assert time.perf_counter() - start < 5
    assert str(err.value) == (
        "data.hf_name='openwebtext': the Hugging Face hub is unreachable (HF_HUB_OFFLINE=1); "
        "set data.source to stdlib or files, or go online"
    )


def test_hf_hub_name_without_network_fails_fast(monkeypatch):
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    start = time.perf_counter()
    with pytest.raises(
        NanollmError,
        match=r"^data.hf_name='Skylion007/openwebtext': the Hugging Face hub is unreachable \(no connection to http://127.0.0.1:9",
    ):  # noqa: E501
        hf_source("Skylion007/openwebtext")
    assert time.perf_counter() - start < 5


def test_open_source_dispatches_on_data_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("a.txt").write_text("hello")
    assert [d.text for d in open_source(DataConfig(source="files", paths=("a.txt",)))] == ["hello"]
    assert open_source(DataConfig(max_documents=1)).description["kind"] == "stdlib"
