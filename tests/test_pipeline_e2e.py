"""The whole pipeline for real: `dvc repro` in a temporary git repo, MLflow in its sqlite store.

Small overrides (TINY) keep the module to ~3 minutes on 2 cores (2 min 56 s measured, on cores
shared with other work); everything else is the shipped dvc.yaml, the real stages, real
tiktoken, real memmaps and a real MLflow store. The first model must learn (beat gzip and the
unigram entropy on its val bytes); the later runs only exercise the pipeline's mechanics, so
they train for a few steps (MECHANICS_STEPS).
"""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import free_port, stop_process_group, tool_env, wait_for_http

from nanollm.data.tokens import open_split, read_meta

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ["download", "train_tokenizer", "tokenize", "pretrain", "evaluate", "bench_kvcache"]

# Sized so that the first model learns in ~20-40 s of training on 2 cores, measured on an
# AVX2 EPYC (fp32) with the stdlib corpus of Python 3.11:
# - data: the first 1 MB of the stdlib, of which val_fraction 0.05 holds out one document,
#   asyncio/events.py (28 KB, ordinary code: gzip -9 1.81 bits per byte). At 600 KB and 0.1 the
#   only val document was _compat_pickle.py, a table of names that no small model predicts
#   (val loss 0.7 nats above train).
# - vocab 2048: 3.77 val bytes per token, so each predicted token covers more text; the
#   unigram entropy of the val tokens is 2.21 bits per byte (3.34 at vocab 512, 2.72 at 1024).
# - untied embeddings: 1.82 bits per byte against 1.94 tied after the same 300 steps.
# - 500 steps of 4 x 128 tokens (256k tokens, ~0.9 epoch) at lr 2e-3: 1.63 bits per byte
#   (gzip 1.81, xz 1.76, unigram 2.21), in 23 s.
#   Fewer, larger steps learn less for the same tokens (16 x 128: 1.78 after 120 steps at
#   lr 3e-3), lr 5e-3..2e-2 learns less than 2e-3..3e-3, and 300 steps reach only 1.82.
TINY = {
    "data": {"max_bytes": 1_000_000, "val_fraction": 0.05},
    "tokenizer": {"vocab_size": 2048},
    "model": {"n_layer": 2, "n_head": 4, "n_embd": 128, "block_size": 128, "tie_embeddings": False},
    "train": {
        "batch_size": 4,
        "max_steps": 500,
        "lr": 2e-3,
        "min_lr": 2e-4,
        "warmup_steps": 10,
        "eval_interval": 250,
        "eval_batches": 2,
        "log_interval": 25,  # 20 rows: each is an MLflow write
    },
    "eval": {"max_tokens": None, "sample_tokens": 16},  # all of val: the bytes gzip and the unigram see
    # The race against transformers has its stage test (tests/test_stage_bench.py); here it would
    # add ~4.5 s (its import and two generate() caches) to each of the module's four bench runs.
    "bench": {
        "prompt_lengths": [8, 32],
        "new_tokens": [8],
        "repeats": 1,
        "warmup": 0,
        "compare_transformers": False,
        "compile": False,
    },  # the compiled step has its stage tests; here it would add a compile per shape
}
MECHANICS_STEPS = 20  # the reruns and experiments after the first test what DVC and MLflow do, not learning


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def _run(args: list[str], cwd: Path, stdout_only: bool = False, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(args, cwd=cwd, env=env or tool_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout if stdout_only else done.stdout + done.stderr


def _unigram_bits_per_byte(tokens_dir: Path, split: str) -> float:
    """Empirical entropy of the split's token frequencies (bits per token) over its bytes per token."""
    meta = read_meta(tokens_dir)
    tokens = open_split(tokens_dir, split, meta)  # read-only memmap
    counts = np.bincount(tokens, minlength=meta.vocab_size)
    p = counts[counts > 0] / len(tokens)
    bits_per_token = float(-(p * np.log2(p)).sum())
    return bits_per_token * meta.splits[split]["tokens"] / meta.splits[split]["bytes"]


def _ran_stages(output: str) -> list[str]:
    return [name for name in PIPELINE if f"Running stage '{name}'" in output]


def copy_project(repo: Path, overrides: dict) -> None:
    """This project's code, pipeline and DVC config into `repo`, with params.yaml merged with `overrides`."""
    for name in ["nanollm", "stages", "dvc.yaml", ".dvc", ".dvcignore", ".gitignore", "pyproject.toml"]:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
        else:
            shutil.copy2(src, repo / name)
    params = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("project")
    copy_project(repo, TINY)
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
    for key in ["gzip_bits_per_byte", "bz2_bits_per_byte", "lzma_bits_per_byte", "perplexity", "accuracy"]:
        assert key in evaluate
    # The model learned: on the val bytes it spends fewer bits than gzip -9 and than the unigram
    # entropy of the val tokens (the val split's own token frequencies, which no model trained
    # on train knows: a stricter bar than any unigram model fitted on train).
    unigram = _unigram_bits_per_byte(project / "data/tokens", "val")
    assert evaluate["bits_per_byte"] < evaluate["gzip_bits_per_byte"], (evaluate, unigram)
    assert evaluate["bits_per_byte"] < unigram, (evaluate, unigram)
    assert json.loads((project / "metrics/tokenizer.json").read_text())["vocab_size"] == TINY["tokenizer"]["vocab_size"]
    assert json.loads((project / "metrics/pretrain.json").read_text())["tokens"] > 0
    assert json.loads((project / "metrics/bench_kvcache.json").read_text())


@pytest.mark.slow
def test_one_mlflow_run_per_model_with_params_and_every_stage_metrics(project, first_repro):
    client, runs = _pretrain_runs(project)
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["model.n_layer"] == "2"
    assert run.data.params["train.max_steps"] == str(TINY["train"]["max_steps"])
    assert run.data.params["seed"] == "1337"
    for metric in ["loss/train", "loss/val", "train/lr", "eval/bits_per_byte"]:  # nanollm.tracking.sectioned
        assert metric in run.data.metrics, metric
    assert any(key.startswith("speed/") for key in run.data.metrics)  # bench_kvcache's
    assert len(client.get_metric_history(run.info.run_id, "loss/train")) >= 2
    assert run.data.tags.get("data.sha256") and run.data.tags.get("tokenizer.sha256")
    inputs = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"corpus-train", "corpus-val"}
    assert run.data.tags["data.sha256"].startswith(inputs["corpus-train"])
    checkpoint_run = json.loads((project / "models/run.json").read_text())["run_id"]
    assert checkpoint_run == run.info.run_id


@pytest.mark.slow
def test_the_default_run_registers_and_serves_with_no_params_edit(project, first_repro, tmp_path):
    """After `dvc repro` with the shipped tracking settings: `nanollm register --best eval/bits_per_byte`,
    then `nanollm serve --model-uri models:/nanollm@champion` from another folder answers the openai client
    with the text `nanollm generate --temperature 0` writes."""
    import openai

    registered = _run(["nanollm", "register", "--best", "eval/bits_per_byte"], project)
    assert "models:/nanollm@champion" in registered
    generated = _run(["nanollm", "generate", "--prompt", "def ", "--temperature", "0",
                      "--max-new-tokens", "12", "--threads", "1"], project, stdout_only=True)  # fmt: skip
    port = free_port()
    env = tool_env(MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}", OMP_NUM_THREADS="1")
    elsewhere = tmp_path / "elsewhere"  # no params.yaml, no checkpoint: the registry is all it has
    elsewhere.mkdir()
    command = ["nanollm", "serve", "--model-uri", "models:/nanollm@champion", "--port", str(port), "--threads", "1"]
    with open(tmp_path / "serve.log", "wb") as log:
        server = subprocess.Popen(command, cwd=elsewhere, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # fmt: skip
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", server, tmp_path / "serve.log")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        answer = client.completions.create(model="nanollm", prompt="def ", max_tokens=12, temperature=0)
        assert "def " + answer.choices[0].text + "\n" == generated
    finally:
        stop_process_group(server, grace_s=30)


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
    params["train"]["max_steps"] = MECHANICS_STEPS  # also a pretrain param: the same stages rerun
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = _run([sys.executable, "-m", "dvc", "status"], project)
    changed = [name for name in PIPELINE if f"{name}:" in status]
    assert changed == ["pretrain", "evaluate", "bench_kvcache"], status

    rerun = _run([sys.executable, "-m", "dvc", "repro"], project)
    assert _ran_stages(rerun) == ["pretrain", "evaluate", "bench_kvcache"]
    client, runs = _pretrain_runs(project)
    assert sorted(r.data.params["model.n_layer"] for r in runs) == ["1", "2"]

    # A training-only change retrains and re-evaluates; the bench measures the architecture,
    # which is the same, so it is left alone (a train.* sweep costs no bench time).
    params["train"]["lr"] = params["train"]["lr"] / 2
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran_stages(_run([sys.executable, "-m", "dvc", "repro"], project)) == ["pretrain", "evaluate"]


def _commit(project: Path, message: str) -> None:
    _run(["git", "add", "-A"], project)
    _run(["git", "commit", "-qm", message], project)


@pytest.mark.slow
def test_queued_experiments_run_in_parallel_and_log_to_the_root_store(project, first_repro):
    _run([sys.executable, "-m", "dvc", "repro"], project)  # whatever the earlier tests left, brought up to date
    _commit(project, "baseline")
    before = {r.info.run_id for r in _pretrain_runs(project)[1]}
    for n_layer in (3, 4):
        _run(
            [sys.executable, "-m", "dvc", "exp", "run", "--queue", "-S", f"model.n_layer={n_layer}",
             "-S", f"train.max_steps={MECHANICS_STEPS}"],
            project,
        )  # fmt: skip
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
        assert {"loss/train", "loss/val", "eval/bits_per_byte", "speed/max_speedup"} <= set(run.data.metrics)
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
