"""`nanollm train_tokenizer` and `nanollm tokenize` end to end through the real CLI and a real MLflow store."""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from nanollm.data.corpus import iter_documents, read_manifest, write_corpus
from nanollm.data.sources import Document
from nanollm.data.tokens import open_split, read_meta
from nanollm.tokenizer import load_tokenizer
from stages.cli import cli

TEXTS = [
    "def f(x):\n    return x * 2\n",
    "class A:\n    pass\n",
    "print('hello, world')\n",
    "for i in range(3):\n    print(i)\n",
    "héllo wörld 🙂 — naïve café\n",
    "import os\nimport sys\n",
    "x = {'a': 1, 'b': [1, 2, 3]}\n",
    "# a comment <|endoftext|> in text\n",
] * 4


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project folder with a small corpus in data/corpus and an MLflow sqlite store."""
    docs = [Document(id=f"doc{i}", text=f"{text}# {i}\n") for i, text in enumerate(TEXTS)]
    write_corpus(docs, tmp_path / "data/corpus", seed=0, val_fraction=0.2, shard_bytes=400, source_description={})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    return tmp_path


def invoke(project: Path, params: str, *args: str):
    (project / "params.yaml").write_text(params)
    return CliRunner().invoke(cli, ["--params", "params.yaml", *args])


def _fake_gpt2_cache(monkeypatch) -> None:
    """Pretend tiktoken's GPT-2 files are cached, with a stand-in of the 256 bytes only: one token per byte."""
    import tiktoken

    from nanollm.tokenizer import SPLIT_PATTERNS, gpt2

    ranks = {bytes([b]): b for b in range(256)}
    bytes_only = tiktoken.Encoding("gpt2", pat_str=SPLIT_PATTERNS["gpt2"], mergeable_ranks=ranks, special_tokens={})
    monkeypatch.setattr(gpt2, "is_cached", lambda: True)
    monkeypatch.setattr(gpt2, "load_encoding", lambda: bytes_only)


def test_train_tokenizer_then_tokenize(project, monkeypatch):
    from mlflow.tracking import MlflowClient

    _fake_gpt2_cache(monkeypatch)
    result = invoke(project, "tokenizer:\n  vocab_size: 300\n", "train_tokenizer")
    assert result.exit_code == 0, result.output
    tok = load_tokenizer(project / "data/tokenizer")
    assert tok.vocab_size == 300 and tok.eot_id == 299
    metrics = json.loads((project / "metrics/tokenizer.json").read_text())
    assert set(metrics) == {
        "vocab_size", "val_bytes_per_token", "gpt2_val_bytes_per_token", "train_seconds", "train_mb_per_s"
    }  # fmt: skip
    assert metrics["gpt2_val_bytes_per_token"] == 1.0  # the reference, measured on the same val texts
    assert metrics["train_seconds"] > 0 and metrics["train_mb_per_s"] > 0
    val = list(iter_documents(project / "data/corpus", "val"))
    val_bytes = sum(len(t.encode()) for t in val)
    assert metrics["vocab_size"] == 300
    assert metrics["val_bytes_per_token"] == round(val_bytes / sum(len(tok.encode(t)) for t in val), 4) > 1.0

    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    assert client.get_experiment_by_name("nanollm") is None  # the models' experiment: no tokenizer runs in it
    experiment = client.get_experiment_by_name("nanollm-tokenizers")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tokenizer-bpe-300"
    assert run.data.params["tokenizer.vocab_size"] == "300" and run.data.params["tokenizer.split_pattern"] == "gpt4"
    assert run.data.params["seed"] == "1337"
    assert run.data.metrics == metrics
    assert run.data.tags["stage"] == "train_tokenizer" and run.data.tags["tokenizer.sha256"] == tok.sha256
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["tokenizer.json"]

    result = invoke(project, "tokenizer:\n  vocab_size: 300\n", "tokenize")
    assert result.exit_code == 0, result.output
    meta = read_meta(project / "data/tokens")
    assert meta.tokenizer_sha256 == tok.sha256
    assert meta.corpus_sha256 == read_manifest(project / "data/corpus")["sha256"]
    for split in ("train", "val"):
        texts = list(iter_documents(project / "data/corpus", split))
        data = np.asarray(open_split(project / "data/tokens", split))
        ends = np.flatnonzero(data == tok.eot_id)
        assert len(ends) == len(texts) == meta.splits[split]["documents"] and ends[-1] == len(data) - 1
        assert [tok.decode(d) for d in np.split(data, ends + 1)[:-1]] == [t + "<|endoftext|>" for t in texts]
    metrics = json.loads((project / "metrics/tokenize.json").read_text())
    assert set(metrics) == {"train_tokens", "val_tokens", "bytes_per_token", "mb_per_s", "seconds"}
    assert metrics["train_tokens"] == meta.splits["train"]["tokens"] and metrics["val_tokens"] == len(data)
    text_tokens = sum(s["tokens"] - s["documents"] for s in meta.splits.values())
    assert metrics["bytes_per_token"] == round(sum(s["bytes"] for s in meta.splits.values()) / text_tokens, 4)


def test_explicit_paths_and_no_tracking(project, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(project / "empty-cache"))
    params = "tokenizer:\n  vocab_size: 280\n  split_pattern: gpt2\ntracking:\n  enabled: false\n"
    args = ["--corpus", "data/corpus", "--out", "out/tok", "--metrics", "out/tok.json"]
    result = invoke(project, params, "train_tokenizer", *args)
    assert result.exit_code == 0, result.output
    assert "gpt2_val_bytes_per_token" not in json.loads((project / "out/tok.json").read_text())  # GPT-2 not cached
    assert json.loads((project / "out/tok/tokenizer.json").read_text())["pattern_name"] == "gpt2"
    result = invoke(project, params, "tokenize", "--tokenizer", "out/tok", "--out", "out/tokens", "--metrics", "m.json")
    assert result.exit_code == 0, result.output
    assert read_meta(project / "out/tokens").vocab_size == 280
    assert not (project / "mlflow.db").exists()


def _error_line(result) -> str:
    """The one `Error:` line the CLI prints (MLflow may log INFO lines around it), and no traceback."""
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    return line


def test_errors_are_one_line_and_write_nothing(project, monkeypatch):
    result = invoke(project, "tracking:\n  enabled: false\n", "tokenize")
    assert _error_line(result).startswith("Error: cannot read tokenizer data/tokenizer/tokenizer.json")
    assert not (project / "data/tokens").exists()

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(project / "empty-cache"))
    result = invoke(project, "tokenizer:\n  kind: gpt2\n", "train_tokenizer")
    assert "not in tiktoken's cache" in _error_line(result)
    assert not (project / "data/tokenizer").exists() and not (project / "metrics").exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("nanollm-tokenizers").experiment_id])
    assert run.info.status == "FAILED" and run.info.run_name == "tokenizer-gpt2"
