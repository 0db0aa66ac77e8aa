"""`nanollm evaluate` on a real tiny corpus, tokenizer, memmaps and checkpoint, re-opening a sqlite MLflow run."""

import json
import math

import pytest
import torch
import yaml
from click.testing import CliRunner

from nanollm.checkpoint import save_checkpoint
from nanollm.config import ModelConfig, TokenizerConfig, TrackingConfig
from nanollm.data.corpus import iter_documents, write_corpus
from nanollm.data.sources import Document
from nanollm.data.tokens import encode_documents, write_tokens
from nanollm.model import Transformer
from nanollm.tokenizer import create_tokenizer
from nanollm.tracking.runs import make_tracker
from stages.cli import cli

PARAMS = {
    "seed": 3,
    "eval": {"batch_size": 4, "prompts": ["def ", ""], "sample_tokens": 12, "temperature": 0.9, "top_k": 20},
    "tracking": {"experiment": "stage-test"},
}
UNTRACKED = {**PARAMS, "tracking": {"enabled": False}}


def _texts(n):
    """Small Python-like documents, varied enough to train a few hundred BPE merges."""
    return [
        f"def f{i}(x, y={i % 7}):\n    '''Return {i} times x.'''\n    return x * {i} + y - {i % 3}\n" * (1 + i % 3)
        for i in range(n)
    ]


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    torch.set_num_threads(1)
    return tmp_path, make_project(tmp_path)


def make_project(tmp_path):
    """What evaluate reads, under tmp_path: corpus, tokenizer (320 tokens), memmaps, an untrained 1-layer
    checkpoint and pretrain's run record without a run; returns the corpus manifest. Also used by test_register."""
    corpus = tmp_path / "data" / "corpus"
    docs = [Document(id=f"doc{i}", text=t) for i, t in enumerate(_texts(80))]
    manifest = write_corpus(docs, corpus, seed=0, val_fraction=0.25, shard_bytes=1 << 20, source_description={})
    tok = create_tokenizer(
        TokenizerConfig(vocab_size=320),
        iter_documents(corpus, "train"),
        tmp_path / "data" / "tokenizer",
        progress=False,
    )
    write_tokens(
        tmp_path / "data" / "tokens",
        {s: encode_documents(tok, iter_documents(corpus, s)) for s in ("train", "val")},
        vocab_size=tok.vocab_size,
        eot_id=tok.eot_id,
        tokenizer_sha256=tok.sha256,
        corpus_sha256=manifest["sha256"],
        progress=False,
    )
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32), tok.vocab_size)
    save_checkpoint(
        tmp_path / "models" / "checkpoint",
        model,
        train_state={"step": 7, "tokens_seen": 0},
        info={"tokenizer_sha256": tok.sha256, "corpus_sha256": manifest["sha256"]},
    )
    (tmp_path / "models" / "run.json").write_text(json.dumps({"run_id": None, "tracking_uri": None}))
    return manifest


def _pretrain_run(root):
    """Create the MLflow run pretrain would have made and record it as pretrain does; returns its id."""
    tracker = make_tracker(TrackingConfig(experiment="stage-test"), root)
    tracker.start(run_name="pretrain")
    tracker.end()
    run = {"run_id": tracker.run_id, "tracking_uri": tracker.uri}
    (root / "models" / "run.json").write_text(json.dumps(run))
    return tracker.run_id


def _run(root, params):
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return CliRunner().invoke(cli, ["--params", "params.yaml", "evaluate"], catch_exceptions=False)


def test_evaluate_writes_metrics_samples_and_extends_the_pretrain_run(project):
    from mlflow.tracking import MlflowClient

    root, manifest = project
    run_id = _pretrain_run(root)
    result = _run(root, PARAMS)
    assert result.exit_code == 0, result.output

    metrics = json.loads((root / "metrics" / "evaluate.json").read_text())
    assert set(metrics) >= {
        "val_loss", "perplexity", "bits_per_byte", "accuracy", "val_tokens", "val_bytes",
        "gzip_bits_per_byte", "bz2_bits_per_byte", "lzma_bits_per_byte", "beats_lzma",
        "lzma_train_context_bits_per_byte", "beats_lzma_train_context",
    }  # fmt: skip
    # the val documents are near-copies of train ones here: xz that has seen train does far better
    assert metrics["lzma_train_context_bits_per_byte"] < 0.5 * metrics["lzma_bits_per_byte"]
    assert metrics["device"] == "cpu"  # where it ran (the one text value: the rest are numbers to diff)
    # eval.int8: an int8-weight copy scored on the same tokens; the model itself stays fp32
    assert metrics["int8_bits_per_byte"] != metrics["bits_per_byte"]
    assert metrics["int8_bits_per_byte_delta"] == pytest.approx(
        metrics["int8_bits_per_byte"] - metrics["bits_per_byte"], abs=2e-6
    )
    assert abs(metrics["int8_bits_per_byte_delta"]) < 0.05
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in metrics.items() if k != "device")
    vocab = json.loads((root / "models" / "checkpoint" / "config.json").read_text())["vocab_size"]
    assert abs(metrics["val_loss"] - math.log(vocab)) < 1.0  # an untrained model is close to uniform
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["val_loss"]), rel=1e-3)
    assert metrics["beats_lzma"] == 0  # ...and far worse than xz on text this repetitive
    val = manifest["splits"]["val"]
    # every val byte is scored except those of the very first token, which nothing predicts
    assert val["bytes"] - 8 < metrics["val_bytes"] < val["bytes"]
    meta = json.loads((root / "data" / "tokens" / "meta.json").read_text())
    assert metrics["val_tokens"] == meta["splits"]["val"]["tokens"] - 1

    samples = (root / "reports" / "samples.txt").read_text()
    assert samples.count("sample 1/2: prompt 'def '") == 1 and samples.count("sample 2/2: prompt ''") == 1
    assert samples.split("sample 1/2")[1].split("\n", 1)[1].startswith("def ")

    run = MlflowClient(f"sqlite:///{root}/mlflow.db").get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["eval/bits_per_byte"] == pytest.approx(metrics["bits_per_byte"])
    assert run.data.metrics["eval/lzma_bits_per_byte"] == pytest.approx(metrics["lzma_bits_per_byte"])
    assert run.data.tags["eval.device"] == metrics["device"] == "cpu"  # where the figures came from
    artifacts = {a.path for a in MlflowClient(f"sqlite:///{root}/mlflow.db").list_artifacts(run_id, "evaluate")}
    assert artifacts == {"evaluate/samples.txt", "evaluate/params.yaml"}

    # the same seed gives the same samples and metrics (tracking off: nothing more is logged)
    again = _run(root, UNTRACKED)
    assert again.exit_code == 0, again.output
    assert (root / "reports" / "samples.txt").read_text() == samples
    assert json.loads((root / "metrics" / "evaluate.json").read_text()) == metrics


def test_evaluate_refuses_a_checkpoint_from_another_tokenizer(project):
    root, _ = project
    config = root / "models" / "checkpoint" / "config.json"
    info = json.loads(config.read_text())
    config.write_text(json.dumps({**info, "tokenizer_sha256": "f" * 64}))
    result = _run(root, UNTRACKED)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "models/checkpoint" in lines[0] and "ffffffffffff" in lines[0]
    assert not (root / "metrics" / "evaluate.json").exists()


def test_evaluate_with_max_tokens_scores_a_prefix(project):
    root, _ = project
    params = {**UNTRACKED, "eval": {**PARAMS["eval"], "max_tokens": 50}}
    result = _run(root, params)
    assert result.exit_code == 0, result.output
    metrics = json.loads((root / "metrics" / "evaluate.json").read_text())
    assert metrics["val_tokens"] == 49


def test_log_model_logs_an_mlflow_model_under_the_run(project):
    """tests/test_register.py loads, registers, fetches and serves it; here: it is there, and is the only model."""
    from mlflow.tracking import MlflowClient

    root, _ = project
    run_id = _pretrain_run(root)
    params = {**UNTRACKED, "tracking": {"enabled": True, "experiment": "stage-test", "log_model": True}}
    result = _run(root, params)
    assert result.exit_code == 0, result.output
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    (output,) = run.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert (model.name, model.source_run_id, str(model.status)) == ("model", run_id, "READY")
    assert [a.path for a in client.list_artifacts(run_id)] == ["evaluate"]  # no loose model/ folder beside it
