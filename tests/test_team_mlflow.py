"""A team's MLflow: a real PostgreSQL behind a real `mlflow server --serve-artifacts`, used as docs/team.md says.

One PostgreSQL (Debian's, started from a fresh initdb as the `postgres` user) and one tracking
server per module; the tiny project is test_stage_evaluate's, its runs logged through the server.
What the server's database and artifact folder hold is checked from outside the client.
"""

import contextlib
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from conftest import free_port, stop_process_group, tool_env, wait_for_http
from test_register import LOGGED, _run_with
from test_stage_evaluate import _pretrain_run, _run, make_project

from nanollm.config import TrackingConfig
from nanollm.errors import NanollmError
from nanollm.tracking.models import fetch_model
from nanollm.tracking.runs import make_tracker
from stages.cli import cli

PASSWORD = "team-Secret-7391"  # distinctive, so that finding it in a message cannot be a coincidence
WRONG = "wrong-Secret-5550"
ARCHITECTURE = {"model.n_layer": 1, "model.n_head": 2, "model.n_embd": 32}


def _initdb() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb")]
    return Path(found[-1]) if found[-1] else None


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL's binaries refuse to run as root: as root, run them as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL on 127.0.0.1 with role `nanollm` (password PASSWORD) owning database `mlflow`; .restart() it."""
    initdb = _initdb()
    if initdb is None:
        pytest.skip("needs Debian's postgresql (.ci/run installs it)")
    # under /tmp, not pytest's tmp_path: that one is root's alone, and the server runs as `postgres`
    base = Path(tempfile.mkdtemp(prefix="nanollm-pg-"))
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    data, sockets, port = base / "data", base / "sockets", free_port()
    bin_dir, run = initdb.parent, dict(check=True, capture_output=True, text=True)
    pg_ctl = str(bin_dir / "pg_ctl")
    try:
        subprocess.run(_as_postgres(["mkdir", str(sockets)]), **run)
        # the socket lets the superuser in without a password; TCP asks the role for its password
        auth = ["--auth-local=trust", "--auth-host=scram-sha-256"]
        subprocess.run(_as_postgres([str(initdb), "-D", str(data), "-U", "postgres", *auth]), **run)
        options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1"
        start = [pg_ctl, "-D", str(data), "-o", options, "-l", str(base / "log"), "-w", "start"]
        subprocess.run(_as_postgres(start), **run)
        psql = [str(bin_dir / "psql"), "-h", str(sockets), "-p", str(port), "-U", "postgres", "-d", "postgres"]
        psql += ["-v", "ON_ERROR_STOP=1", "-c", f"CREATE ROLE nanollm LOGIN PASSWORD '{PASSWORD}'"]
        psql += ["-c", "CREATE DATABASE mlflow OWNER nanollm"]
        subprocess.run(_as_postgres(psql), **run)
        # with the options it started with; its log a file, or the server would hold run()'s pipes open
        restart = [pg_ctl, "-D", str(data), "-l", str(base / "log"), "-m", "fast", "-w", "restart"]
        yield SimpleNamespace(
            port=port,
            uri=lambda password: _db_uri(password, port),
            restart=lambda: subprocess.run(_as_postgres(restart), **run),
        )
    finally:
        subprocess.run(_as_postgres([pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"]), capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _db_uri(password: str, port: int) -> str:
    return f"postgresql+psycopg2://nanollm:{password}@127.0.0.1:{port}/mlflow"


@contextlib.contextmanager
def mlflow_server(backend_uri: str, where: Path) -> Iterator[SimpleNamespace]:
    """`mlflow server` on `backend_uri`, serving (proxying) the artifacts it keeps in where/artifacts."""
    artifacts, port, log = where / "artifacts", free_port(), where / "server.log"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri]
    command += ["--artifacts-destination", str(artifacts), "--serve-artifacts"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = tool_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, cwd=where, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", process, log, 90)
        yield SimpleNamespace(uri=f"http://127.0.0.1:{port}", artifacts=artifacts, log=log, process=process)
    finally:
        if process.poll() is None:
            stop_process_group(process)


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    """The module's tracking server on the database."""
    with mlflow_server(postgres.uri(PASSWORD), tmp_path_factory.mktemp("mlflow-server")) as running:
        yield running


@pytest.fixture(scope="module")
def project(server, tmp_path_factory):
    """test_register's project, its runs in the server: pretrain's run evaluated with its model logged, and a
    second run with a model and a lower bits per byte."""
    root = tmp_path_factory.mktemp("team")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", server.uri)
        mp.delenv("DVC_ROOT", raising=False)
        mp.delenv("DVC_EXP_NAME", raising=False)
        torch.set_num_threads(1)
        make_project(root)
        evaluated = _pretrain_run(root)
        tracker = make_tracker(TrackingConfig(experiment="stage-test"), root)
        tracker.resume(evaluated)
        tracker.log_params(ARCHITECTURE)  # as pretrain logs its params
        tracker.end()
        result = _run(root, LOGGED)
        assert result.exit_code == 0, result.output
        bpb = json.loads((root / "metrics" / "evaluate.json").read_text())["bits_per_byte"]
        better = _run_with(root, bpb - 1.0, log_model=True)
        yield SimpleNamespace(root=root, evaluated=evaluated, better=better, bpb=bpb)


def test_a_model_run_lands_in_postgres_and_its_artifacts_in_the_servers_folder(project, server):
    from mlflow.tracking import MlflowClient

    run = MlflowClient(server.uri).get_run(project.evaluated)
    assert run.data.metrics["eval/bits_per_byte"] == pytest.approx(project.bpb)
    assert {k: run.data.params[k] for k in ARCHITECTURE} == {k: str(v) for k, v in ARCHITECTURE.items()}
    assert run.data.tags["eval.device"] == "cpu"
    # proxied: the client never sees the server's folder, only the server's artifact API
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    (output,) = run.outputs.model_outputs  # the model evaluate logged (MLflow 3 keeps it beside the run)
    model = MlflowClient(server.uri).get_logged_model(output.model_id)
    assert model.artifact_location.startswith("mlflow-artifacts:")
    folder = server.artifacts / model.artifact_location.removeprefix("mlflow-artifacts:/")
    assert (folder / "MLmodel").is_file(), sorted(server.artifacts.rglob("MLmodel"))
    samples = server.artifacts.rglob("evaluate/samples.txt")
    assert any(project.evaluated in str(path) for path in samples)  # evaluate's artifacts too
    checkpoints = list(server.artifacts.rglob("model.pt"))
    assert len(checkpoints) >= 2  # the evaluated run's model and the better run's


def test_register_best_through_the_server_and_fetch_through_its_proxy(project, server, tmp_path):
    result = CliRunner().invoke(
        cli, ["--params", "params.yaml", "register", "--best", "eval/bits_per_byte", "--alias", "champion"],
        catch_exceptions=False, env={"MLFLOW_TRACKING_URI": server.uri},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"registered run {project.better} as nanollm" in result.output

    # a client elsewhere: a fresh folder, nothing but the server's URL
    checkpoint, tokenizer = fetch_model("models:/nanollm@champion", server.uri, tmp_path / "fetched")
    assert (checkpoint / "model.pt").is_file()
    assert (tokenizer / "tokenizer.json").is_file()
    assert server.artifacts not in checkpoint.resolve().parents


@pytest.mark.parametrize("how", ["tracker", "register"])
def test_a_wrong_database_password_fails_in_one_line_without_the_password(postgres, tmp_path, monkeypatch, how):
    """nanollm on the database itself (MLFLOW_TRACKING_URI=postgresql+psycopg2://...): at once, the password masked."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", postgres.uri(WRONG))
    started = time.monotonic()
    if how == "tracker":
        with pytest.raises(NanollmError) as err:
            make_tracker(TrackingConfig(experiment="stage-test"), tmp_path)
        message = str(err.value)
    else:
        (tmp_path / "params.yaml").write_text("seed: 1\n")
        result = CliRunner().invoke(cli, ["--params", "params.yaml", "register", "--best", "eval/bits_per_byte"])
        assert result.exit_code != 0
        message = result.output.strip()
    assert time.monotonic() - started < 10  # not MLflow's ~100 s of retries
    assert "\n" not in message and "Traceback" not in message, message
    assert WRONG not in message, message
    assert f"nanollm:***@127.0.0.1:{postgres.port}/mlflow" in message, message
    assert "password authentication failed" in message, message
