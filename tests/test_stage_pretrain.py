"""`nanollm pretrain` end to end on tiny token memmaps, with MLflow on a sqlite store in tmp_path."""

import csv
import json
import shutil

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from conftest import tiny_tokens

from nanollm.data.tokens import read_meta
from stages.cli import cli

VOCAB, EOT = 64, 63
PARAMS = {
    "seed": 5,
    "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16},
    "train": {
        "batch_size": 4,
        "max_steps": 12,
        "warmup_steps": 2,
        "lr": 1e-2,
        "min_lr": 1e-3,
        "log_interval": 4,
        "eval_interval": 6,
        "eval_batches": 2,
        "device": "cpu",
    },
    "tracking": {"experiment": "stage-test"},
}


def _documents(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, EOT, rng.integers(20, 60)).tolist() for _ in range(n)]


@pytest.fixture
def project(tmp_path, monkeypatch, empty_store):
    monkeypatch.chdir(tmp_path)
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    tiny_tokens(tmp_path, _documents(60, 0), _documents(10, 1), VOCAB, EOT, train_tokens=6000)
    return tmp_path


def _run(tmp_path, params):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return CliRunner().invoke(cli, ["--params", "params.yaml", "pretrain"], catch_exceptions=False)


def test_pretrain_writes_outputs_and_one_mlflow_run(project):
    from mlflow.tracking import MlflowClient

    result = _run(project, PARAMS)
    assert result.exit_code == 0, result.output

    ckpt = project / "models" / "checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "architecture.json",
        "config.json",
        "model.pt",
        "train_state.pt",
    ]  # the MLflow run is the run record's, beside it
    info = json.loads((ckpt / "config.json").read_text())
    assert info["vocab_size"] == VOCAB and info["step"] == 12 and info["tokens_seen"] == 12 * 4 * 16
    assert info["tokenizer_sha256"] == "a" * 64 and info["corpus_sha256"] == "c" * 64

    metrics = json.loads((project / "metrics" / "pretrain.json").read_text())
    assert set(metrics) == {
        "train_loss", "val_loss", "tokens", "seconds", "tokens_per_s", "params", "mfu", "peak_memory_mb",
        "estimated_memory_mb", "device", "dtype", "dtype_reason", "machine", "threads",
    }  # fmt: skip
    assert metrics["threads"] >= 1
    assert metrics["tokens"] == 768 and metrics["val_loss"] < np.log(VOCAB) + 0.5 and metrics["params"] > 0
    # train.dtype is auto here: which dtype depends on the CPU (tests/test_dtype_matmuls.py pins each branch)
    assert metrics["device"] == "cpu" and metrics["dtype"] in ("float32", "bfloat16")
    assert metrics["dtype_reason"].startswith("auto: ") and metrics["machine"]

    with open(project / "reports" / "train_curve.csv") as f:
        train_rows = list(csv.DictReader(f))
    assert list(train_rows[0]) == ["step", "tokens", "train_loss", "lr"]
    assert [int(r["step"]) for r in train_rows] == [4, 8, 12]
    assert [int(r["tokens"]) for r in train_rows] == [256, 512, 768]
    with open(project / "reports" / "val_curve.csv") as f:
        val_rows = list(csv.DictReader(f))
    assert list(val_rows[0]) == ["step", "tokens", "val_loss"] and [int(r["step"]) for r in val_rows] == [6, 12]
    assert (project / "reports" / "pretrain_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    run_record = json.loads((project / "models" / "run.json").read_text())
    assert run_record["tracking_uri"] == f"sqlite:///{project}/mlflow.db"
    client = MlflowClient(run_record["tracking_uri"])
    run = client.get_run(run_record["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "1L32d-64v-12s"
    assert run.data.params["model.n_layer"] == "1" and run.data.params["train.max_steps"] == "12"
    assert run.data.params["seed"] == "5" and "eval.top_k" in run.data.params  # every params key, flattened
    assert run.data.tags["stage"] == "pretrain" and run.data.tags["data.sha256"] == "c" * 64
    assert run.data.tags["tokenizer.sha256"] == "a" * 64
    assert {k: run.data.tags[k] for k in ("device", "dtype", "dtype_reason")} == {
        k: metrics[k] for k in ("device", "dtype", "dtype_reason")
    }
    splits = read_meta(project / "data" / "tokens").splits  # the run's data metrics come from meta.json
    assert {k: v for k, v in run.data.metrics.items() if k.startswith("tokens/")} == {
        "tokens/vocab_size": VOCAB, "tokens/train_documents": 60, "tokens/val_documents": 10,
        "tokens/train": splits["train"]["tokens"], "tokens/val": splits["val"]["tokens"],
        "tokens/train_bytes_per_token": round(6000 / splits["train"]["tokens"], 4),
        "tokens/val_bytes_per_token": round(1000 / splits["val"]["tokens"], 4),
    }  # fmt: skip
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/train")] == [4, 8, 12]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/val")] == [6, 12]
    for name in ("train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu"):
        assert len(client.get_metric_history(run.info.run_id, name)) == 3
    assert run.data.metrics["train/params"] == metrics["params"]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"params.yaml", "pretrain_loss.png"}


def test_pretrain_without_tracking_records_null_run(project):
    (project / "mlflow.db").unlink()
    result = _run(project, {**PARAMS, "tracking": {"enabled": False}, "train": {**PARAMS["train"], "max_steps": 2}})
    assert result.exit_code == 0, result.output
    run_record = json.loads((project / "models" / "run.json").read_text())
    assert run_record == {"run_id": None, "tracking_uri": None}
    assert not (project / "mlflow.db").exists()


def test_pretrain_reports_a_truncated_token_file_in_one_line(project):
    with open(project / "data" / "tokens" / "train.bin", "r+b") as f:
        f.truncate(100)
    result = _run(project, PARAMS)
    assert result.exit_code == 1
    assert "train.bin" in result.output and "dvc repro tokenize" in result.output and "Traceback" not in result.output
    assert not (project / "models").exists()


def test_a_crashed_run_resumes_into_the_same_mlflow_run(project, monkeypatch):
    from mlflow.tracking import MlflowClient

    import nanollm.training.loop

    params = {**PARAMS, "train": {**PARAMS["train"], "checkpoint_interval": 5}}
    real_lr_at = nanollm.training.loop.lr_at

    def crash_at_step_8(step, cfg):
        if step == 8:
            raise RuntimeError("power cut")
        return real_lr_at(step, cfg)

    monkeypatch.setattr(nanollm.training.loop, "lr_at", crash_at_step_8)
    with pytest.raises(RuntimeError, match="power cut"):
        _run(project, params)
    ckpt = project / "models" / "checkpoint"
    assert json.loads((ckpt / "config.json").read_text())["step"] == 5
    run_id = json.loads((project / "models" / "run.json").read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    assert client.get_run(run_id).info.status == "FAILED"

    monkeypatch.setattr(nanollm.training.loop, "lr_at", real_lr_at)
    result = _run(project, params)
    assert result.exit_code == 0, result.output
    assert json.loads((project / "models" / "run.json").read_text())["run_id"] == run_id  # the same run, re-opened
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_step"] == "5"
    assert [m.step for m in client.get_metric_history(run_id, "loss/train")] == [4, 8, 12]
    assert len(client.search_runs([run.info.experiment_id])) == 1
    with open(project / "reports" / "train_curve.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [4, 8, 12]  # the whole run


def test_changed_params_start_afresh_in_a_new_run(project, caplog):
    from mlflow.tracking import MlflowClient

    short = {**PARAMS, "train": {**PARAMS["train"], "max_steps": 3, "warmup_steps": 1}, "tracking": {"experiment": "x"}}
    assert _run(project, short).exit_code == 0
    first = json.loads((project / "models" / "run.json").read_text())["run_id"]
    with caplog.at_level("INFO"):
        result = _run(project, {**short, "train": {**short["train"], "lr": 5e-3}})
    assert result.exit_code == 0, result.output
    assert "train.lr: 0.01 -> 0.005" in caplog.text and "training from step 0" in caplog.text
    second = json.loads((project / "models" / "run.json").read_text())["run_id"]
    assert second != first and MlflowClient(f"sqlite:///{project}/mlflow.db").get_run(second).info.status == "FINISHED"


def test_unreachable_tracking_server_stops_pretrain_fast_before_any_output(project, monkeypatch):
    import time

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: nothing listens
    started = time.monotonic()
    (project / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    result = CliRunner().invoke(cli, ["--params", "params.yaml", "pretrain"])
    assert time.monotonic() - started < 10
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert line.startswith("Error: MLflow tracking server") and "tracking.enabled: false" in line
    assert not (project / "models").exists() and not (project / "metrics" / "pretrain.json").exists()


def test_store_lost_mid_training_still_writes_every_output(project, monkeypatch):
    from nanollm.training import loop as train_module

    real_train = train_module.train

    def train_then_lose_the_store(*args, **kwargs):
        (project / "mlflow.db").write_bytes(b"gone")  # the store dies once training has started
        return real_train(*args, **kwargs)

    monkeypatch.setattr("nanollm.training.loop.train", train_then_lose_the_store)
    result = _run(project, PARAMS)
    assert result.exit_code == 0, result.output
    assert json.loads((project / "metrics" / "pretrain.json").read_text())["tokens"] == 768
    assert (project / "models" / "checkpoint" / "model.pt").is_file()
    assert (project / "reports" / "train_curve.csv").is_file()
