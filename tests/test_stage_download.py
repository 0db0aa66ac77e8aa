"""`nanollm download` through the real CLI: outputs, metrics, one-line errors, the dvc.yaml contract."""

import json
import shlex
from pathlib import Path

import yaml
from click.testing import CliRunner

from nanollm.data.corpus import iter_documents, read_manifest
from stages.cli import cli

ROOT = Path(__file__).resolve().parents[1]
METRIC_KEYS = {
    "train_documents", "train_mb", "val_documents", "val_mb", "replaced_bytes", "empty_documents", "seconds",
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
        "data:\n  source: files\n  paths: ['params.yaml']\n": (
            2,
            "Error: params.yaml: data.paths: 'params.yaml' (from 'params.yaml') is not .txt, .jsonl or .parquet",
        ),
        "data:\n  source: hf\n  hf_name: Skylion007/openwebtext\n": (
            1,
            "Error: data.hf_name='Skylion007/openwebtext': the Hugging Face hub is unreachable",
        ),
        "data:\n  source: files\n  paths: ['one.txt']\n": (1, "Error: the val split is empty"),
    }
    (tmp_path / "one.txt").write_text("a single document rarely lands in val")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for params, (code, expected) in cases.items():
        result = run(tmp_path, monkeypatch, params)
        assert result.exit_code == code, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(expected), result.stderr
        assert not (tmp_path / "metrics").exists()
        leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and p.name not in ("one.txt", "params.yaml")]
        assert leftovers == [] and not (tmp_path / "data/corpus").exists()


def test_dvc_yaml_passes_the_option_defaults():
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["download"]
    args = shlex.split(stage["cmd"])[2:]
    options = dict(zip(args[::2], args[1::2], strict=True))
    help_text = CliRunner().invoke(cli, ["download", "--help"]).output
    assert options == {"--out": "data/corpus", "--metrics": "metrics/download.json"}
    for option, default in options.items():
        assert option in help_text and default in help_text
    assert options["--out"] in stage["outs"]
