"""The MLflow UI over the project's store: the `mlflow server` command line behind `nanollm ui` and its page.

Owns the server's command line and environment (light enough for a laptop), the page that lists
the models' runs with the project's saved view, and the wait until the server answers, so the
link is printed only once it opens. Supervising the process (signals, its process group) is the
stage's (stages/ui.py); which store and experiment are store.py's.
"""

from __future__ import annotations

import os
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from nanollm.config import TrackingConfig
from nanollm.tracking.store import MODEL_RUNS, VIEW_KEY, artifact_folder, open_experiment, tracking_uri, unusable_store


def ui_experiment(cfg: TrackingConfig, root: Path) -> str:
    """The id of the models' experiment in the store `nanollm ui` serves, created and tagged if needed."""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = tracking_uri(cfg, root)
    try:
        return open_experiment(
            MlflowClient(tracking_uri=uri), MODEL_RUNS.experiment(cfg), MODEL_RUNS, artifact_folder(uri, root)
        )
    except Exception as err:  # MlflowException, or sqlalchemy errors from a bad database
        raise unusable_store(uri, err) from None


def runs_url(base: str, experiment_id: str) -> str:
    """The page of MLflow's UI (3.17) that lists an experiment's runs as model training, with the view's columns.

    MLflow 3.17's UI picks GenAI or model training per browser (localStorage, GenAI unless the
    user switched) and, with that switch built in, does not read `mlflow.experimentKind`. So the
    URL says `workflowType=machine_learning` itself: a fresh browser would otherwise land on the
    GenAI overview (traces, latency, "Detect issues"). `viewStateShareKey` opens the saved view.
    """
    query = urllib.parse.urlencode({"workflowType": "machine_learning", "viewStateShareKey": VIEW_KEY})
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def ui_command(cfg: TrackingConfig, root: Path, *, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """The `mlflow server` command line that serves this project's store, light enough for a laptop.

    One worker (the default four take ~2.6 GB and ~15 s to start; one takes ~0.5 GB and ~6 s)
    and, through the environment from `ui_environment`, no job runner. Artifacts are read from
    where each experiment put them (the project's mlartifacts/ for the default sqlite store).
    """
    import sys

    uri = tracking_uri(cfg, root)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    command += ["--host", host, "--port", str(port), "--workers", "1"]
    artifact_root = artifact_folder(uri, root)
    if artifact_root is not None:
        command += ["--artifacts-destination", artifact_root.resolve().as_uri()]
    return command


def ui_environment() -> dict[str, str]:
    """The environment for `ui_command`: telemetry and the server's background job runner off."""
    return {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def wait_until_serving(url: str, alive: Callable[[], bool], *, timeout_s: float = 120.0, poll_s: float = 0.25) -> bool:
    """Poll `url`/health until it answers 200; False as soon as `alive()` says the server is gone or on timeout.

    `mlflow server` binds its port only after its app has imported (seconds): a link printed
    before that opens on "connection refused".
    """
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            return False
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(poll_s)
    return False
