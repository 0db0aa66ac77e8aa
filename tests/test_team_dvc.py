"""Two clones share experiments and their outputs through a git remote and a DVC remote, with the real tools.

A bare git repository stands in for the team's git remote and a local folder for the DVC remote
(`dvc remote add -d shared`, committed in the baseline). Clone A runs an experiment and publishes
it (`dvc exp push origin`, `dvc push`); clone B, with an experiment of its own, fetches A's
(`dvc exp pull origin`), applies it and pulls its outputs (`dvc pull`), after which `dvc status`
has nothing to run. `dvc exp push` and `dvc exp pull` carry the experiment's outputs too (their
default); an experiment pushed with --no-cache and no `dvc push` reaches B as params and metrics
whose outputs no `dvc pull` can fetch.

The pipeline is shrunk (TEAM) until it only exercises the mechanics: a few training steps on a
small corpus, the tiniest bench. Learning is tests/test_pipeline_e2e.py's business.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tool_env
from test_pipeline_e2e import _run, copy_project

DVC = [sys.executable, "-m", "dvc"]
TEAM = {
    "data": {"max_bytes": 200_000, "val_fraction": 0.3},  # 13 documents: 0.05 may hold out none
    "tokenizer": {"vocab_size": 512},
    "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
    "train": {
        "batch_size": 2,
        "max_steps": 5,
        "warmup_steps": 1,
        "eval_interval": 5,
        "eval_batches": 1,
        "log_interval": 5,
        "checkpoint_interval": 0,
    },
    "eval": {"max_tokens": 2048, "sample_tokens": 4, "int8": False},
    "bench": {
        "prompt_lengths": [4],
        "new_tokens": [4],
        "repeats": 1,
        "warmup": 0,
        "compare_transformers": False,
        "batch_sizes": [1],
        "int8": False,
        "compile": False,
        "batch_prompt_len": 4,
        "batch_new_tokens": 4,
    },
    "tracking": {"enabled": False},  # the MLflow side of a team has its own test (tests/test_team_mlflow.py)
}
A_OVERRIDE = ("train.lr", 0.001)
B_OVERRIDE = ("train.lr", 0.002)


def _dvc(args: list[str], cwd: Path, stdout_only: bool = False) -> str:
    return _run([*DVC, *args], cwd, stdout_only=stdout_only)


@pytest.fixture(scope="module")
def team(tmp_path_factory) -> dict[str, Path]:
    """The baseline pushed to a bare git remote, the DVC remote named in it, and two clones of it."""
    base = tmp_path_factory.mktemp("team")
    seed, origin, storage = base / "seed", base / "origin.git", base / "dvc-storage"
    seed.mkdir()
    copy_project(seed, TEAM)
    _run(["git", "init", "-q", "-b", "main"], seed)
    _dvc(["remote", "add", "-d", "shared", str(storage)], seed)
    _run(["git", "add", "-A"], seed)
    _run(["git", "commit", "-qm", "baseline with the shared DVC remote"], seed)
    _run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], base)
    _run(["git", "push", "-q", str(origin), "main"], seed)
    for clone in ("a", "b"):
        _run(["git", "clone", "-q", str(origin), str(base / clone)], base)
    return {"a": base / "a", "b": base / "b", "storage": storage}


def _exp_run(clone: Path, name: str, override: tuple[str, float]) -> None:
    _dvc(["exp", "run", "-n", name, "-S", f"{override[0]}={override[1]}"], clone)


def _exp_names(clone: Path) -> set[str]:
    shown = json.loads(_dvc(["exp", "show", "--json"], clone, stdout_only=True))
    return {exp["name"] for baseline in shown for exp in (baseline.get("experiments") or [])}


@pytest.fixture(scope="module")
def published(team) -> dict:
    """A's experiment, run and pushed (git refs to origin, outputs to the DVC remote); what A recorded."""
    a = team["a"]
    _exp_run(a, "a-lr", A_OVERRIDE)
    _dvc(["exp", "push", "origin", "a-lr"], a)
    _dvc(["push"], a)
    return {
        "evaluate": json.loads((a / "metrics/evaluate.json").read_text()),
        "params": yaml.safe_load((a / "params.yaml").read_text()),
        "model": (a / "models/checkpoint/model.pt").read_bytes(),
    }


def test_exp_pull_shows_the_other_clones_experiment_beside_its_own(team, published):
    b = team["b"]
    _exp_run(b, "b-lr", B_OVERRIDE)
    assert _exp_names(b) == {"b-lr"}
    assert "a-lr" in _dvc(["exp", "list", "origin"], b)
    _dvc(["exp", "pull", "origin", "a-lr"], b)
    assert _exp_names(b) == {"a-lr", "b-lr"}


def test_apply_and_pull_restore_the_other_clones_results_with_nothing_to_run(team, published):
    b = team["b"]
    if "a-lr" not in _exp_names(b):  # run on its own
        _dvc(["exp", "pull", "origin", "a-lr"], b)
    _dvc(["exp", "apply", "a-lr"], b)
    _dvc(["pull"], b)
    params = yaml.safe_load((b / "params.yaml").read_text())
    assert params == published["params"]
    assert params["train"]["lr"] == A_OVERRIDE[1]
    status = _dvc(["status"], b)
    assert "Data and pipelines are up to date." in status, status
    assert json.loads((b / "metrics/evaluate.json").read_text()) == published["evaluate"]
    assert (b / "models/checkpoint/model.pt").read_bytes() == published["model"]


def _dvc_may_fail(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*DVC, *args], cwd=cwd, env=tool_env(), capture_output=True, text=True, timeout=600)


def test_an_experiment_whose_outputs_were_never_pushed_cannot_be_pulled(team, published):
    """The break check kept as a test: git refs pushed (`--no-cache`), outputs left out of the DVC remote."""
    a, b = team["a"], team["b"]
    _exp_run(a, "a-unpushed", ("train.lr", 0.003))
    _dvc(["exp", "push", "--no-cache", "origin", "a-unpushed"], a)  # and no `dvc push`
    _dvc_may_fail(["exp", "pull", "origin", "a-unpushed"], b)
    assert "a-unpushed" in _exp_names(b)  # the refs came: params and metrics are there to see
    applied = _dvc_may_fail(["exp", "apply", "a-unpushed"], b)
    assert applied.returncode != 0 and "models/checkpoint" in applied.stderr, applied.stdout + applied.stderr
    pulled = _dvc_may_fail(["pull"], b)
    assert pulled.returncode != 0 and "models/checkpoint" in pulled.stdout + pulled.stderr, (
        pulled.stdout + pulled.stderr
    )
    status = _dvc(["status"], b)
    assert "up to date" not in status and "pretrain" in status, status
