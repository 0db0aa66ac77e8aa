"""`nanollm ui`: a real MLflow server over the project's store, bound to loopback, seen in a real browser."""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port

from nanollm.config import TrackingConfig
from nanollm.tracking.runs import make_tracker, sectioned
from nanollm.tracking.store import TOKENIZER_RUNS
from nanollm.tracking.ui import ui_command

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LINUX_PROC = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads sockets and processes from /proc")


def _listening_addresses(port: int) -> set[str]:
    """Local addresses listening on `port`, read from /proc/net/tcp (hex little-endian IPv4)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if int(hex_port, 16) == port and state == "0A":  # 0A: LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def _session_processes(sid: int) -> list[str]:
    """`pid state command` of every process in session `sid` (nanollm ui's, and so its children's)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            text = stat.read_text()
            comm, fields = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
            if int(fields[3]) == sid:  # fields: state ppid pgrp session ...
                found.append(f"{stat.parent.name} {fields[0]} {comm}")
    return found


def _log_runs(project: Path) -> dict[str, str]:
    """As the stages log them: a tokenizer run in its own experiment, two model runs. Returns model run ids by name."""
    with make_tracker(TrackingConfig(), root=project, runs=TOKENIZER_RUNS) as tracker:
        tracker.start("tokenizer-bpe-512")
        tracker.log_metrics({"vocab_size": 512, "val_bytes_per_token": 2.5})
    ids = {}
    for name, lr in {"lr-high": 3e-3, "lr-low": 3e-4}.items():
        with make_tracker(TrackingConfig(), root=project) as tracker:
            tracker.start(name)
            tracker.log_params({"model.n_layer": 2, "train.lr": lr})
            tracker.log_metrics(sectioned("data", {"vocab_size": 512, "train_tokens": 9000}))
            for step in (10, 20):
                tracker.log_metrics(sectioned("train", {"train_loss": 5 - lr * 100 * step, "lr": lr}), step=step)
                tracker.log_metrics(sectioned("train", {"val_loss": 5.1 - lr * 100 * step}), step=step)
            tracker.log_metrics(sectioned("eval", {"bits_per_byte": 4 - lr * 100, "val_loss": 4.9}))
            tracker.log_metrics(sectioned("bench", {"max_speedup": 3.0}))
        ids[name] = tracker.run_id
    return ids


@contextlib.contextmanager
def running_ui(project: Path):
    """`nanollm ui` started for real in `project`; yields (its process, the URL it printed), which answers at once."""
    (project / "params.yaml").write_text("seed: 1\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    log = project / "ui.log"  # a file, not a pipe: nobody reads uvicorn's access log, and a full pipe blocks it
    with open(log, "wb") as out:
        ui = subprocess.Popen(
            [sys.executable, "-c", "from stages.cli import main; main()", "ui", "--port", str(port)],
            cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not (printed := re.search(r"^open (http://\S+)", log.read_text(), re.M)):
            assert ui.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "MLflow UI did not come up"
            time.sleep(0.2)
        # at once, no retry: the link is printed only once the server answers (a browser opened on it
        # at once was refused when it was printed first)
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).close()
        yield ui, printed.group(1)
    finally:
        if ui.poll() is None:
            ui.send_signal(signal.SIGTERM)  # nanollm ui passes it on to mlflow server and uvicorn
            try:
                ui.wait(timeout=30)
            except subprocess.TimeoutExpired:
                for line in _session_processes(ui.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(line.split()[0]), signal.SIGKILL)


def _port(url: str) -> int:
    return int(re.match(r"http://[^/:]+:(\d+)/", url).group(1))


def chromium(url: str, *args: str, profile: Path) -> str:
    """Headless Chromium on a loopback page; the flags keep it off the (closed) network."""
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--window-size=1400,1000", "--virtual-time-budget=20000", *args, url,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_ui_command_binds_loopback_with_one_worker(tmp_path):
    command = ui_command(TrackingConfig(), tmp_path)
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("--workers") + 1] == "1"
    assert command[command.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


@LINUX_PROC
def test_ui_prints_the_models_runs_page_and_serves_the_store_on_loopback(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _log_runs(tmp_path)
    with running_ui(tmp_path) as (_, url):
        port = _port(url)
        assert _listening_addresses(port) == {"127.0.0.1"}
        experiment_id = re.search(r"#/experiments/(\d+)/runs\?", url).group(1)
        assert url == (
            f"http://localhost:{port}/#/experiments/{experiment_id}/runs"
            "?workflowType=machine_learning&viewStateShareKey=nanollm"
        )
        body = json.dumps({"experiment_ids": [experiment_id]}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search", body, {"Content-Type": "application/json"}
        )
        runs = json.load(urllib.request.urlopen(request, timeout=10))["runs"]
    assert sorted(r["info"]["run_name"] for r in runs) == ["lr-high", "lr-low"]  # no tokenizer run among them


def test_ui_over_a_tracking_server_says_to_open_it_instead(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from stages.cli import cli

    (tmp_path / "params.yaml").write_text("seed: 1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    result = CliRunner().invoke(cli, ["ui"])
    assert result.exit_code == 1
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert "is an MLflow server already" in line and not (tmp_path / "mlflow.db").exists()


@LINUX_PROC
def test_on_an_empty_project_ui_creates_the_linked_experiment_and_sigterm_stops_the_server_too(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with running_ui(tmp_path) as (ui, url):
        port = _port(url)
        serving = _session_processes(ui.pid)
        assert any("uvicorn" in Path(f"/proc/{line.split()[0]}/cmdline").read_text() for line in serving), serving
        ui.send_signal(signal.SIGTERM)  # to nanollm ui alone, as `kill` or a process manager sends it
        assert ui.wait(timeout=30) == 128 + signal.SIGTERM
        assert _session_processes(ui.pid) == []  # mlflow server and uvicorn are gone, not orphaned
        assert _listening_addresses(port) == set()
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
    # the printed link points at an experiment that exists, though no stage ever ran
    experiment_id = re.search(r"#/experiments/(\d+)/runs\?", url).group(1)
    experiment = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_experiment(experiment_id)
    assert experiment.name == "nanollm" and experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def _section_headers(dom: str) -> list[str]:
    """The metric sections of an MLflow charts page, top to bottom."""
    return re.findall(r'data-testid="experiment-view-compare-runs-section-header".*?white-space: pre;">([^<]+)<', dom)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_the_printed_link_opens_the_models_table_and_runs_show_bits_per_byte_and_losses_first(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ids = _log_runs(tmp_path)
    with running_ui(tmp_path) as (_, url):
        table = chromium(url, "--dump-dom", profile=tmp_path / "fresh-profile")  # a first visit
        run_page = url.replace("/runs?", f"/runs/{ids['lr-high']}/model-metrics?")
        charts = chromium(run_page, "--dump-dom", profile=tmp_path / "fresh-profile-2")
        experiment_id = re.search(r"#/experiments/(\d+)/", url).group(1)
        runs = urllib.parse.quote(json.dumps(list(ids.values())))
        compare_page = f"{url.split('#')[0]}#/compare-runs?runs={runs}&experiments=[%22{experiment_id}%22]"
        compare = chromium(compare_page, "--dump-dom", profile=tmp_path / "fresh-profile-3")
    # the runs table of the model-training view: the models, not the tokenizer, with the saved view's columns
    assert "lr-high" in table and "lr-low" in table and "tokenizer-bpe-512" not in table
    for column in ("eval/bits_per_byte", "eval/val_loss", "loss/val"):  # the grid renders the columns in sight only
        assert f'col-id="metrics.`{column}`"' in table, column
    assert "Detect issues" not in table  # what the GenAI overview greeted a new user with
    # one run's metric charts: sections in reading order (un-prefixed metrics, none here, would come last)
    assert _section_headers(charts) == ["eval", "loss", "speed", "tokens", "train", "Model metrics"]
    # ticked and compared: params and final metrics side by side
    assert "Comparing 2 Runs" in compare
    for text in ("train.lr", "eval/bits_per_byte", "lr-high", "lr-low"):
        assert text in compare, text
