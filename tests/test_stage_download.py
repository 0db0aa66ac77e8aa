"""`nanollm download` through the real CLI: outputs, metrics, near-duplicate families, one-line errors, dvc.yaml."""

import json
import random
import shlex
from pathlib import Path

import yaml
from click.testing import CliRunner

from nanollm.data.corpus import iter_documents, read_manifest, split_of
from stages.cli import cli

ROOT = Path(__file__).resolve().parents[1]
METRIC_KEYS = {
    "train_documents", "train_mb", "val_documents", "val_mb", "near_duplicate_families", "near_duplicate_documents",
    "replaced_bytes", "empty_documents", "binary_files", "seconds",
}  # fmt: skip


def run(tmp_path: Path, monkeypatch, params: str, *args: str):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(params)
    return CliRunner().invoke(cli, ["--params", "params.yaml", "download", *args])


def test_download_files_writes_corpus_and_metrics(tmp_path, monkeypatch):
    (tmp_path / "docs").mkdir()
    for i in range(40):
        (tmp_path / "docs" / f"{i:02d}.txt").write_text(f"document {i}\n" * 10)
    (tmp_path / "docs" / "bad.txt").write_bytes(b"\xff broken")
    (tmp_path / "docs" / "empty.txt").write_text("")
    (tmp_path / "docs" / "zipped.txt").write_bytes(b"PK\x03\x04\x14\x00\x00\x00")  # binary under a .txt name
    params = "seed: 7\ndata:\n  source: files\n  paths: ['docs/*.txt']\n  val_fraction: 0.25\n"
    result = run(tmp_path, monkeypatch, params, "--out", "out/corpus", "--metrics", "out/download.json")
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "out/corpus")
    metrics = json.loads((tmp_path / "out/download.json").read_text())
    assert set(metrics) == METRIC_KEYS
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert metrics["train_documents"] == train["documents"] and metrics["val_documents"] == val["documents"]
    assert train["documents"] + val["documents"] == 41
    assert metrics["train_mb"] == round(train["bytes"] / 1e6, 3) and metrics["val_mb"] == round(val["bytes"] / 1e6, 3)
    assert metrics["replaced_bytes"] == manifest["replaced_bytes"] == 1
    assert metrics["empty_documents"] == 1
    assert metrics["binary_files"] == {"not_utf8": 0, "nul_byte": 1}
    assert metrics["near_duplicate_families"] == metrics["near_duplicate_documents"] == 0
    assert manifest["seed"] == 7 and manifest["source"]["kind"] == "files"
    assert len(list(iter_documents(tmp_path / "out/corpus", "val"))) == val["documents"]


def test_default_paths_and_stdlib_source(tmp_path, monkeypatch):
    params = "data:\n  max_documents: 60\n  shard_mb: 1\n"
    result = run(tmp_path, monkeypatch, params)
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "data/corpus")
    assert manifest["source"]["kind"] == "stdlib" and manifest["source"]["max_documents"] == 60
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 60
    assert json.loads((tmp_path / "metrics/download.json").read_text())["train_documents"] > 0


def test_errors_are_one_line_and_write_nothing(tmp_path, monkeypatch):
    cases = {  # params -> (exit code: 2 for a params mistake, 1 for anything else; the one line)
        "data:\n  source: files\n  paths: ['nothing/*.txt']\n": (
            2,
            "Error: params.yaml: data.paths: 'nothing/*.txt' matches no files",
        ),
        "data:\n  source: files\n  paths: []\n": (2, "Error: params.yaml: data.paths: got []; must list at least one"),
        "data:\n  source: files\n  paths: ['*.png']\n": (
            2,
            "Error: params.yaml: data.paths: '*.png' matches only binary files (1, e.g. 'logo.png': a NUL byte",
        ),
        "data:\n  near_dup_threshold: 0\n": (2, "Error: params.yaml: data.near_dup_threshold: got 0.0; must be > 0.0"),
        "data:\n  near_dup_num_perm: 8\n": (2, "Error: params.yaml: data.near_dup_num_perm: got 8; must be >= 16"),
        "data:\n  source: hf\n  hf_name: Skylion007/openwebtext\n": (
            1,
            "Error: data.hf_name='Skylion007/openwebtext': the Hugging Face hub is unreachable",
        ),
        "data:\n  source: files\n  paths: ['one.txt']\n": (1, "Error: the val split is empty"),
    }
    (tmp_path / "one.txt").write_text("a single document rarely lands in val")
    (tmp_path / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for params, (code, expected) in cases.items():
        result = run(tmp_path, monkeypatch, params)
        assert result.exit_code == code, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(expected), result.stderr
        assert not (tmp_path / "metrics").exists()
        leftovers = [
            p for p in tmp_path.rglob("*") if p.is_file() and p.name not in ("one.txt", "logo.png", "params.yaml")
        ]
        assert leftovers == [] and not (tmp_path / "data/corpus").exists()


def write_planted_project(root: Path, families: int = 6, copies: int = 3, unrelated: int = 30) -> None:
    """A code project where each of `families` modules was copied `copies` times with 3 of 40 lines changed."""
    rng = random.Random(0)

    def line() -> str:
        a, b, c = ("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=6)) for _ in range(3))
        return f"    {a} = {b}({c})"

    (root / "proj" / "pkg").mkdir(parents=True)
    for f in range(families):
        original = [line() for _ in range(40)]
        for k in range(copies + 1):
            lines = list(original)
            for index in rng.sample(range(40), 3 if k else 0):
                lines[index] = line()
            (root / "proj" / "pkg" / f"fam{f}_{k}.py").write_text("\n".join(lines))
    for i in range(unrelated):
        (root / "proj" / f"solo{i}.py").write_text("\n".join(line() for _ in range(40)))


def test_near_duplicate_families_land_on_one_side_and_are_counted(tmp_path, monkeypatch):
    write_planted_project(tmp_path)
    straddling_by_id = 0
    for seed in range(4):
        params = f"seed: {seed}\ndata:\n  source: files\n  paths: ['proj/**/*.py']\n  val_fraction: 0.3\n"
        result = run(tmp_path, monkeypatch, params, "--out", f"c{seed}", "--metrics", f"m{seed}.json")
        assert result.exit_code == 0, result.output
        metrics = json.loads((tmp_path / f"m{seed}.json").read_text())
        assert (metrics["near_duplicate_families"], metrics["near_duplicate_documents"]) == (6, 24)
        near = read_manifest(tmp_path / f"c{seed}")["near_duplicates"]
        assert (near["families"], near["grouped_documents"], near["threshold"]) == (6, 24, 0.5)
        side = {}
        for split in ("train", "val"):
            manifest = read_manifest(tmp_path / f"c{seed}")
            for shard in manifest["splits"][split]["shards"]:
                side.update({json.loads(line)["id"]: split for line in (tmp_path / f"c{seed}" / shard).open()})
        for f in range(6):
            members = [f"proj/pkg/fam{f}_{k}.py" for k in range(4)]
            assert len({side[m] for m in members}) == 1
            assert side[members[0]] == split_of(members[0], seed, 0.3)  # the first in the stream decides
            straddling_by_id += len({split_of(m, seed, 0.3) for m in members}) == 2
    assert straddling_by_id > 5  # without the families these seeds would split some of them


def test_near_duplicates_are_grouped_for_hf_datasets_too(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # lock files stay here
    write_planted_project(tmp_path, families=4, copies=2, unrelated=20)
    rows = [{"text": p.read_text()} for p in sorted((tmp_path / "proj").rglob("*.py"))]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = "data:\n  source: hf\n  hf_name: rows.jsonl\n  val_fraction: 0.3\n"
    result = run(tmp_path, monkeypatch, params)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics/download.json").read_text())
    assert (metrics["near_duplicate_families"], metrics["near_duplicate_documents"]) == (4, 12)


def test_near_duplicates_off_splits_each_document_by_its_id(tmp_path, monkeypatch):
    write_planted_project(tmp_path)
    params = "data:\n  source: files\n  paths: ['proj/**/*.py']\n  val_fraction: 0.3\n  near_dup_threshold: null\n"
    result = run(tmp_path, monkeypatch, params)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics/download.json").read_text())
    assert metrics["near_duplicate_families"] is None and metrics["near_duplicate_documents"] is None
    manifest = read_manifest(tmp_path / "data/corpus")
    assert manifest["near_duplicates"] is None
    val = [
        json.loads(line)["id"]
        for s in manifest["splits"]["val"]["shards"]
        for line in (tmp_path / "data/corpus" / s).open()
    ]
    expected = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "proj").rglob("*.py"))
    assert val == [i for i in expected if split_of(i, 1337, 0.3) == "val"]


def test_dvc_yaml_passes_the_option_defaults():
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["download"]
    args = shlex.split(stage["cmd"])[2:]
    options = dict(zip(args[::2], args[1::2], strict=True))
    help_text = CliRunner().invoke(cli, ["download", "--help"]).output
    assert options == {"--out": "data/corpus", "--metrics": "metrics/download.json"}
    for option, default in options.items():
        assert option in help_text and default in help_text
    assert options["--out"] in stage["outs"]
