"""A team's experiments through one tracking server on PostgreSQL, with the real tools, as docs/team.md says.

Two clones of the project (a bare git repository stands in for the team's remote) run an
experiment each at the same time with MLFLOW_TRACKING_URI pointing at one `mlflow server` on
a real PostgreSQL: clone A with `dvc exp run`, clone B through its queue (`dvc exp run --queue`,
then `dvc queue start`). Every run lands once and whole; `nanollm register --best` picks the
better; `nanollm serve --model-uri models:/nanollm@champion` run from a third folder serves it
to the openai client. Then the faults of a shared server: the server stopped mid-pretrain, and
PostgreSQL restarted between two stages.

The pipeline is test_team_dvc's shrunk one (TEAM), with tracking on.
"""

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import test_team_mlflow
import torch
import yaml
from conftest import stop_process_group, tool_env
from test_pipeline_e2e import _run as run_tool
from test_pipeline_e2e import copy_project
from test_serve import _greedy_text, _nanollm_serve, _served_text
from test_team_dvc import TEAM, _exp_names
from test_team_mlflow import PASSWORD, mlflow_server

from nanollm.tokenizer import load_tokenizer

# the PostgreSQL and the tracking server of test_team_mlflow, one of each for this module too
postgres, server = test_team_mlflow.postgres, test_team_mlflow.server

DVC = [sys.executable, "-m", "dvc"]
NANOLLM = str(Path(sys.executable).parent / "nanollm")
EXPERIMENT = "team"
PARAMS = {**TEAM, "tracking": {"enabled": True, "experiment": EXPERIMENT}}
RUNS = {"a-lr1": ("a", "0.001"), "b-lr2": ("b", "0.002")}  # experiment -> (clone, train.lr)


def _env(uri: str, **extra: str) -> dict[str, str]:
    return tool_env(MLFLOW_TRACKING_URI=uri, OMP_NUM_THREADS="1", **extra)


def _run(args: list[str], cwd: Path, uri: str) -> str:
    return run_tool(args, cwd, env=_env(uri))


@pytest.fixture(scope="module")
def team(server, tmp_path_factory) -> dict:
    """Two clones, each running an experiment at the same time, A directly and B through `dvc queue start`."""
    base = tmp_path_factory.mktemp("team-exp")
    seed, origin = base / "seed", base / "origin.git"
    seed.mkdir()
    copy_project(seed, PARAMS)
    for args in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "baseline"]):
        _run(args, seed, server.uri)
    _run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], base, server.uri)
    _run(["git", "push", "-q", str(origin), "main"], seed, server.uri)
    clones = {}
    for name in ("a", "b"):
        _run(["git", "clone", "-q", str(origin), str(base / name)], base, server.uri)
        clones[name] = base / name

    started = time.monotonic()
    direct = subprocess.Popen(
        [*DVC, "exp", "run", "-n", "a-lr1", "-S", "train.lr=0.001"], cwd=clones["a"], env=_env(server.uri),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    _run([*DVC, "exp", "run", "--queue", "-n", "b-lr2", "-S", "train.lr=0.002"], clones["b"], server.uri)
    _run([*DVC, "queue", "start"], clones["b"], server.uri)
    queued = _run([*DVC, "queue", "logs", "--follow", "b-lr2"], clones["b"], server.uri)
    output = direct.communicate(timeout=600)[0]
    assert direct.returncode == 0, output[-5000:]
    seconds = time.monotonic() - started
    status = _run([*DVC, "queue", "status"], clones["b"], server.uri)
    _run([*DVC, "queue", "stop", "--kill"], clones["b"], server.uri)
    return {"clones": clones, "base": base, "queued": queued, "status": status, "seconds": seconds}


def _runs(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id]) if experiment else []


def test_two_clones_at_once_each_land_one_complete_run(team, server):
    from mlflow.tracking import MlflowClient

    assert "b-lr2" in team["status"] and "Success" in team["status"], team["status"] + team["queued"][-2000:]
    client = MlflowClient(server.uri)
    by_experiment = {}
    for run in _runs(server.uri):
        by_experiment.setdefault(run.data.tags.get("dvc.experiment"), []).append(run)
    assert sorted(by_experiment) == sorted(RUNS), {k: len(v) for k, v in by_experiment.items()}
    for name, (_, lr) in RUNS.items():
        (run,) = by_experiment[name]  # once: no run missing, none twice
        assert run.info.status == "FINISHED"
        assert run.data.params["train.lr"] == lr  # its own params, not the other clone's
        history = client.get_metric_history(run.info.run_id, "loss/train")
        assert [m.step for m in history] == [TEAM["train"]["max_steps"]]  # log_interval = max_steps
        assert "eval/bits_per_byte" in run.data.metrics  # evaluate's, in the same run
        assert any(k.startswith("speed/") for k in run.data.metrics), sorted(run.data.metrics)  # bench_kvcache's
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        assert client.list_artifacts(run.info.run_id)
    # the artifacts are on the server's side only, under the runs' ids
    for run in _runs(server.uri):
        assert any(run.info.run_id in str(p) for p in server.artifacts.rglob("*")), run.info.run_id


def test_register_best_then_serve_it_from_a_third_folder(team, server, tmp_path):
    runs = {run.data.tags["dvc.experiment"]: run for run in _runs(server.uri)}
    best = min(runs.values(), key=lambda run: run.data.metrics["eval/bits_per_byte"])
    register = [NANOLLM, "register", "--best", "eval/bits_per_byte", "--alias", "champion"]
    output = _run(register, team["clones"]["a"], server.uri)  # its params.yaml names the experiment
    assert f"registered run {best.info.run_id} as nanollm" in output, output

    # the third folder has nothing but the server's URL; the served text is the best experiment's model's
    clone = team["clones"][RUNS[best.data.tags["dvc.experiment"]][0]]
    _run([*DVC, "exp", "apply", best.data.tags["dvc.experiment"]], clone, server.uri)
    checkpoint, tokenizer = clone / "models" / "checkpoint", clone / "data" / "tokenizer"
    (tmp_path / "tmp").mkdir()
    env = _env(server.uri, TMPDIR=str(tmp_path / "tmp"))
    third = tmp_path / "elsewhere"
    third.mkdir()
    with _nanollm_serve("--model-uri", "models:/nanollm@champion", cwd=third, env=env) as (_, url):
        served = _served_text(url, "def ", 6)
    assert served == _greedy_text(checkpoint, load_tokenizer(tokenizer / "tokenizer.json"), "def ", 6)
    assert list(third.iterdir()) == []


def test_the_server_stopped_mid_pretrain_training_goes_on_and_says_so_once(team, postgres, tmp_path):
    clone = team["clones"]["a"]
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["train"].update(max_steps=400, log_interval=20, eval_interval=200, checkpoint_interval=50)
    (clone / "long.yaml").write_text(yaml.safe_dump(params))
    with mlflow_server(postgres.uri(PASSWORD), tmp_path) as doomed:
        command = [NANOLLM, "--params", "long.yaml", "pretrain", "--out", "models/long", "--run-record",
                   "models/long.json", "--metrics", "long.json"]  # fmt: skip
        pretrain = subprocess.Popen(
            command, cwd=clone, env=_env(doomed.uri), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + 300
        while not (clone / "models" / "long" / "config.json").is_file():
            assert pretrain.poll() is None and time.monotonic() < deadline, pretrain.communicate()[0][-3000:]
            time.sleep(0.05)
        stop_process_group(doomed.process)  # the server goes away mid-run
        stopped = time.monotonic()
        output = pretrain.communicate(timeout=600)[0]
    assert pretrain.returncode == 0, output[-3000:]
    assert time.monotonic() - stopped < 120, "training waited on the lost server"
    assert json.loads((clone / "long.json").read_text())["tokens"] > 0  # every output written
    assert (clone / "models" / "long" / "model.pt").is_file()
    lost = [line for line in output.splitlines() if "continuing without tracking" in line]
    assert len(lost) == 1, output[-3000:]
    assert "Traceback" not in output


def test_postgres_restarted_between_stages_the_next_stage_logs_as_before(team, server, postgres):
    from mlflow.tracking import MlflowClient

    clone = team["clones"]["a"]
    _run([*DVC, "exp", "apply", "a-lr1"], clone, server.uri)
    run_id = json.loads((clone / "models" / "run.json").read_text())["run_id"]
    before = MlflowClient(server.uri).get_run(run_id).data.metrics["eval/bits_per_byte"]
    postgres.restart()  # every connection the server holds is now dead
    _run([*DVC, "repro", "--force", "--single-item", "evaluate"], clone, server.uri)
    run = MlflowClient(server.uri).get_run(run_id)
    assert run.data.metrics["eval/bits_per_byte"] == pytest.approx(before)
    history = MlflowClient(server.uri).get_metric_history(run_id, "eval/bits_per_byte")
    assert len(history) == 2  # logged again, after the restart
    assert torch.load(clone / "models" / "checkpoint" / "model.pt", weights_only=True)


# ---------------------------------------------------------------------------- a sweep over several machines

GRID = ["0.001", "0.002", "0.003", "0.004"]  # train.lr: the sweep's grid


def _queue_and_drain(clone: Path, values: list[str], uri: str) -> None:
    """A machine's share of the grid, as docs/team.md runs it: queued as a grid, drained by one DVC queue worker."""
    _run([*DVC, "exp", "run", "--queue", "-S", f"train.lr={','.join(values)}"], clone, uri)
    _run([*DVC, "queue", "start", "--jobs", "1"], clone, uri)
    deadline = time.monotonic() + 900
    while any(word in _run([*DVC, "queue", "status"], clone, uri) for word in ("Queued", "Running")):
        assert time.monotonic() < deadline, _run([*DVC, "queue", "status"], clone, uri)
        time.sleep(2)


def _sweep_clones(base: Path, uri: str, names: list[str]) -> dict[str, Path]:
    """A baseline with a shared DVC remote pushed to a bare git remote, and a clone per machine."""
    seed, origin = base / "seed", base / "origin.git"
    seed.mkdir()
    copy_project(seed, {**PARAMS, "tracking": {"enabled": True, "experiment": "sweep"}})
    _run(["git", "init", "-q", "-b", "main"], seed, uri)
    _run([*DVC, "remote", "add", "-d", "shared", str(base / "dvc-storage")], seed, uri)
    _run(["git", "add", "-A"], seed, uri)
    _run(["git", "commit", "-qm", "baseline"], seed, uri)
    _run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], base, uri)
    _run(["git", "push", "-q", str(origin), "main"], seed, uri)
    for name in names:
        _run(["git", "clone", "-q", str(origin), str(base / name)], base, uri)
    return {name: base / name for name in names}


def test_a_sweep_split_over_two_machines_lands_every_experiment_once(server, tmp_path):
    """Two machines (clones), each draining its half of the grid with its own DVC queue worker, all reporting to one
    server and pushing to one git and DVC remote; against one machine draining the whole grid. Prints the wall times."""
    from mlflow.tracking import MlflowClient

    clones = _sweep_clones(tmp_path, server.uri, ["m1", "m2", "alone"])
    shares = {"m1": GRID[:2], "m2": GRID[2:]}

    started = time.monotonic()
    with ThreadPoolExecutor(len(shares)) as pool:  # the two machines at once, each driving its own clone
        list(pool.map(lambda m: _queue_and_drain(clones[m], shares[m], server.uri), shares))
    two_machines = time.monotonic() - started
    for m in shares:
        assert "Failed" not in _run([*DVC, "queue", "status"], clones[m], server.uri)
        _run([*DVC, "exp", "push", "origin", "--rev", "HEAD"], clones[m], server.uri)
        _run([*DVC, "queue", "stop", "--kill"], clones[m], server.uri)
    pushed = {m: _exp_names(clones[m]) for m in shares}

    started = time.monotonic()
    _queue_and_drain(clones["alone"], GRID, server.uri)
    one_machine = time.monotonic() - started
    _run([*DVC, "queue", "stop", "--kill"], clones["alone"], server.uri)
    print(f"\nthe grid of {len(GRID)} experiments: {two_machines:.0f} s on two machines (a DVC queue worker each), "
          f"{one_machine:.0f} s on one: x{one_machine / two_machines:.2f}")  # fmt: skip

    # every experiment of the split landed once in the server with its own grid value, and once in the git remote
    client = MlflowClient(server.uri)
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    split = [run for run in runs if run.data.tags.get("dvc.experiment") in pushed["m1"] | pushed["m2"]]
    assert sorted(run.data.params["train.lr"] for run in split) == GRID, [r.data.tags for r in runs]
    assert len(runs) == 2 * len(GRID)  # the split's and the lone machine's, nothing else
    assert all(run.info.status == "FINISHED" and "eval/bits_per_byte" in run.data.metrics for run in runs)
    listed = set(_run([*DVC, "exp", "list", "origin", "--name-only"], clones["alone"], server.uri).split())
    assert listed == pushed["m1"] | pushed["m2"] and len(listed) == len(GRID)
    # and any machine can bring one back with its outputs, from the two remotes alone
    (last,) = [run.data.tags["dvc.experiment"] for run in split if run.data.params["train.lr"] == GRID[3]]
    _run([*DVC, "exp", "pull", "origin", last], clones["alone"], server.uri)
    _run([*DVC, "exp", "apply", last], clones["alone"], server.uri)
    assert yaml.safe_load((clones["alone"] / "params.yaml").read_text())["train"]["lr"] == float(GRID[3])
    assert "up to date" in _run([*DVC, "status"], clones["alone"], server.uri)
