"""`nanollm ui`: a real MLflow server over the project's store, bound to loopback, seen in a real browser."""

import contextlib
import json
import os
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

from nanollm.config import TrackingConfig
from nanollm.tracking import make_tracker, ui_command

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening_addresses(port: int) -> set[str]:
    """Local addresses listening on `port`, read from /proc/net/tcp (hex little-endian IPv4)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if int(hex_port, 16) == port and state == "0A":  # 0A: LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def _logged_runs(project: Path, runs: dict[str, int]) -> tuple[str, list[str]]:
    """Log one run per name with its model.n_layer; returns (experiment id, run ids)."""
    ids = []
    for name, n_layer in runs.items():
        tracker = make_tracker(TrackingConfig(), root=project)
        with tracker:
            tracker.start(name)
            tracker.log_params({"model.n_layer": n_layer, "train.lr": 0.003})
            for step in (10, 20):
                tracker.log_metrics({"val_loss": 3.0 / n_layer + 1 / step}, step=step)
        ids.append(tracker.run_id)
    return tracker.experiment_id, ids


@contextlib.contextmanager
def running_ui(project: Path):
    """`nanollm ui` started for real in `project`; yields its port once /health answers."""
    (project / "params.yaml").write_text("seed: 1\n")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    server = subprocess.Popen(
        [sys.executable, "-c", "from stages.cli import main; main()", "ui", "--port", str(port)],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None, server.stdout.read().decode()[-2000:]
                assert time.monotonic() < deadline, "MLflow UI did not come up"
                time.sleep(0.5)
        yield port
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


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


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from Linux /proc")
def test_ui_serves_the_project_store_on_loopback(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    experiment_id, _ = _logged_runs(tmp_path, {"visible-run": 2})
    with running_ui(tmp_path) as port:
        assert _listening_addresses(port) == {"127.0.0.1"}
        body = json.dumps({"experiment_ids": [experiment_id]}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search", body, {"Content-Type": "application/json"}
        )
        runs = json.load(urllib.request.urlopen(request, timeout=10))["runs"]
    assert [r["info"]["run_name"] for r in runs] == ["visible-run"]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_compare_view_in_a_real_browser_shows_the_differing_param(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    experiment_id, ids = _logged_runs(tmp_path, {"two-layers": 2, "four-layers": 4})
    runs = urllib.parse.quote(json.dumps(ids))
    with running_ui(tmp_path) as port:
        url = f"http://127.0.0.1:{port}/#/compare-runs?runs={runs}&experiments=[%22{experiment_id}%22]"
        dom = chromium(url, "--dump-dom", profile=tmp_path / "profile-dom")
        screenshot = tmp_path / "mlflow-compare.png"
        chromium(url, f"--screenshot={screenshot}", profile=tmp_path / "profile-shot")
    assert "Comparing 2 Runs" in dom
    for text in ("model.n_layer", "val_loss", "two-layers", "four-layers"):
        assert text in dom, text
    assert screenshot.stat().st_size > 10_000  # a rendered page, kept in tmp_path for a look
