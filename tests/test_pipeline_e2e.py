"""The whole pipeline for real: `dvc repro` in a temporary git repo, MLflow in its sqlite store.

Tiny overrides keep it to well under a minute of work on 2 cores; everything else is the
shipped dvc.yaml, the real stages, real tiktoken, real memmaps and a real MLflow store.
"""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tool_env

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ["download", "train_tokenizer", "tokenize", "pretrain", "evaluate", "bench_kvcache"]

TINY = {
    "data": {"max_bytes": 600_000, "val_fraction": 0.1},
    "tokenizer": {"vocab_size": 512},
    "model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64},
    "train": {
        "batch_size": 8,
        "max_steps": 30,
        "warmup_steps": 5,
        "eval_interval": 10,
        "eval_batches": 2,
        "log_interval": 5,
    },
    "eval": {"max_tokens": 4000, "sample_tokens": 16},
    "bench": {"prompt_lengths": [8, 32], "new_tokens": [8], "repeats": 1, "warmup": 0},
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def _run(args: list[str], cwd: Path, stdout_only: bool = False) -> str:
    done = subprocess.run(args, cwd=cwd, env=tool_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout if stdout_only else done.stdout + done.stderr


def _ran_stages(output: str) -> list[str]:
    return [name for name in PIPELINE if f"Running stage '{name}'" in output]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("project")
    for name in ["nanollm", "stages", "dvc.yaml", ".dvc", ".dvcignore", ".gitignore", "pyproject.toml"]:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
        else:
            shutil.copy2(src, repo / name)
    params = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "init"], repo)
    return repo


@pytest.fixture(scope="module")
def first_repro(project: Path) -> str:
    return _run([sys.executable, "-m", "dvc", "repro"], project)


def _client(project: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


def _pretrain_runs(project: Path):
    client = _client(project)
    experiment = client.get_experiment_by_name("nanollm")
    runs = client.search_runs([experiment.experiment_id], "tags.stage = 'pretrain'")
    return client, runs


@pytest.mark.slow
def test_repro_runs_every_stage_and_writes_outputs(project, first_repro):
    assert _ran_stages(first_repro) == PIPELINE
    for path in [
        "data/corpus/manifest.json",
        "data/tokenizer/tokenizer.json",
        "data/tokens/train.bin",
        "data/tokens/val.bin",
        "data/tokens/meta.json",
        "models/checkpoint/model.pt",
        "models/checkpoint/config.json",
        "reports/samples.txt",
        "reports/bench_kvcache.png",
        "reports/pretrain_loss.png",
        "reports/train_curve.csv",
        "reports/val_curve.csv",
    ]:
        assert (project / path).is_file(), path
    evaluate = json.loads((project / "metrics/evaluate.json").read_text())
    assert 0 < evaluate["bits_per_byte"] < 8
    for key in ["gzip_bits_per_byte", "bz2_bits_per_byte", "lzma_bits_per_byte", "perplexity", "accuracy"]:
        assert key in evaluate
    assert json.loads((project / "metrics/tokenizer.json").read_text())["vocab_size"] == 512
    assert json.loads((project / "metrics/pretrain.json").read_text())["tokens"] > 0
    assert json.loads((project / "metrics/bench_kvcache.json").read_text())


@pytest.mark.slow
def test_one_mlflow_run_per_model_with_params_and_every_stage_metrics(project, first_repro):
    client, runs = _pretrain_runs(project)
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["model.n_layer"] == "2"
    assert run.data.params["train.max_steps"] == "30"
    assert run.data.params["seed"] == "1337"
    for metric in ["train_loss", "val_loss", "lr", "eval_bits_per_byte"]:
        assert metric in run.data.metrics, metric
    assert any(key.startswith("bench_") for key in run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) >= 2
    assert run.data.tags.get("data.sha256") and run.data.tags.get("tokenizer.sha256")
    inputs = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"corpus-train", "corpus-val"}
    assert run.data.tags["data.sha256"].startswith(inputs["corpus-train"])
    checkpoint_run = json.loads((project / "models/checkpoint/run.json").read_text())["run_id"]
    assert checkpoint_run == run.info.run_id


@pytest.mark.slow
def test_second_repro_is_a_noop_and_model_edit_reruns_exactly_downstream(project, first_repro):
    again = _run([sys.executable, "-m", "dvc", "repro"], project)
    assert _ran_stages(again) == []
    assert len(_pretrain_runs(project)[1]) == 1

    # Rerunning a stage on unchanged inputs rewrites its timings but not its data: nothing
    # downstream may retrain (pretrain reads data/tokens, not metrics/tokenize.json).
    forced = _run([sys.executable, "-m", "dvc", "repro", "--force", "--single-item", "tokenize"], project)
    assert _ran_stages(forced) == ["tokenize"]
    assert _ran_stages(_run([sys.executable, "-m", "dvc", "repro"], project)) == []

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["model"]["n_layer"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = _run([sys.executable, "-m", "dvc", "status"], project)
    changed = [name for name in PIPELINE if f"{name}:" in status]
    assert changed == ["pretrain", "evaluate", "bench_kvcache"], status

    rerun = _run([sys.executable, "-m", "dvc", "repro"], project)
    assert _ran_stages(rerun) == ["pretrain", "evaluate", "bench_kvcache"]
    client, runs = _pretrain_runs(project)
    assert sorted(r.data.params["model.n_layer"] for r in runs) == ["1", "2"]


def _commit(project: Path, message: str) -> None:
    _run(["git", "add", "-A"], project)
    _run(["git", "commit", "-qm", message], project)


@pytest.mark.slow
def test_queued_experiments_run_in_parallel_and_log_to_the_root_store(project, first_repro):
    _run([sys.executable, "-m", "dvc", "repro"], project)  # whatever the earlier tests left, brought up to date
    _commit(project, "baseline")
    before = {r.info.run_id for r in _pretrain_runs(project)[1]}
    for n_layer in (3, 4):
        _run([sys.executable, "-m", "dvc", "exp", "run", "--queue", "-S", f"model.n_layer={n_layer}"], project)
    _run([sys.executable, "-m", "dvc", "queue", "start", "-j", "2"], project)
    deadline = time.monotonic() + 480
    while True:
        status = _run([sys.executable, "-m", "dvc", "queue", "status"], project)
        if not any(word in status for word in ("Queued", "Running")):
            break
        assert time.monotonic() < deadline, status
        time.sleep(3)
    assert status.count("Success") == 2, status
    assert "Failed" not in status

    _, runs = _pretrain_runs(project)
    new = [r for r in runs if r.info.run_id not in before]
    assert sorted(r.data.params["model.n_layer"] for r in new) == ["3", "4"]
    for run in new:  # complete: params, step metrics, evaluate and bench metrics, the DVC experiment name
        assert run.info.status == "FINISHED"
        assert run.data.tags.get("dvc.experiment")
        assert {"train_loss", "val_loss", "eval_bits_per_byte", "bench_max_speedup"} <= set(run.data.metrics)
    assert not list((project / ".dvc" / "tmp").rglob("mlflow.db")), "a run landed in a temporary copy"

    shown = json.dumps(
        json.loads(_run([sys.executable, "-m", "dvc", "exp", "show", "--json"], project, stdout_only=True))
    )
    assert '"n_layer": 3' in shown and '"bits_per_byte"' in shown
    names = [r.data.tags["dvc.experiment"] for r in new]
    diff = _run([sys.executable, "-m", "dvc", "metrics", "diff", *names], project)
    assert "bits_per_byte" in diff
    plots = _run([sys.executable, "-m", "dvc", "plots", "diff", *names, "-o", str(project / "plots-diff")], project)
    assert (project / "plots-diff" / "index.html").is_file(), plots


@pytest.mark.slow
def test_local_remote_push_then_pull_in_a_fresh_clone_restores_without_rerunning(project, first_repro, tmp_path):
    _run([sys.executable, "-m", "dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote")], project)
    _commit(project, "remote")
    _run([sys.executable, "-m", "dvc", "push"], project)
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    _run([sys.executable, "-m", "dvc", "pull"], clone)
    assert (clone / "models/checkpoint/model.pt").is_file()
    assert (clone / "data/tokens/train.bin").read_bytes() == (project / "data/tokens/train.bin").read_bytes()
    status = _run([sys.executable, "-m", "dvc", "status"], clone)
    assert "up to date" in status, status
    assert _ran_stages(_run([sys.executable, "-m", "dvc", "repro"], clone)) == []
